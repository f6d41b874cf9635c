"""Training data: labelled layouts, scenes and their chips, held-out sampling, band statistics."""
