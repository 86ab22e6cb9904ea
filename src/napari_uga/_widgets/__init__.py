"""Qt dock widgets of the napari plugin (imported by napari through ``napari.yaml``)."""
