"""Inference shared by bulk jobs, Serve and evaluation: one preparation, one model call, one
windowing and one rendering, so a mask made on any path is the same mask.

- :mod:`segray.inference.segmenter`: the :class:`Segmenter` every path calls (check a header,
  prepare, run, join, finish).

- :mod:`segray.inference.tiling`: windows of an image or a scene, and stitching them back.
- :mod:`segray.inference.run`: load a model, prepare a tile as training did, run the model.
- :mod:`segray.inference.render`: logits to masks, fractions, uncertainty, footprints, colours.
"""

from segray.inference.render import (
    NODATA,
    OUTPUTS,
    PALETTE,
    PROBABILITY_MAX,
    UNCERTAINTY_TAGS,
    Output,
    class_fractions,
    footprint_doc,
    mark_nodata,
    mask_legend,
    render,
    render_confidence,
    render_outputs,
    render_uncertainty,
)
from segray.inference.run import (
    BATCH_SIZE,
    check_pixel_type,
    infer,
    infer_images,
    infer_mc,
    infer_stacks,
    load,
    model_size,
    model_window,
    monte_carlo_enabled,
    prepare,
    warm_up,
)
from segray.inference.segmenter import Masks, Segmenter, Windows

__all__ = [
    "BATCH_SIZE",
    "NODATA",
    "OUTPUTS",
    "PALETTE",
    "PROBABILITY_MAX",
    "UNCERTAINTY_TAGS",
    "Masks",
    "Segmenter",
    "Windows",
    "Output",
    "check_pixel_type",
    "class_fractions",
    "footprint_doc",
    "mark_nodata",
    "mask_legend",
    "infer",
    "infer_images",
    "infer_mc",
    "infer_stacks",
    "load",
    "model_size",
    "model_window",
    "monte_carlo_enabled",
    "prepare",
    "render",
    "render_outputs",
    "render_confidence",
    "render_uncertainty",
    "warm_up",
]
