"""segray: distributed semantic segmentation of satellite imagery on Ray."""

__version__ = "0.1.0"
