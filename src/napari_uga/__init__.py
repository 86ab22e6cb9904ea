"""napari-uga: uncertainty-guided annotation and delineation-free quality control for histopathology."""

__version__ = "0.1.0"
