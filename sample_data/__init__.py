"""The shipped sample data, installed as ``napari_uga.sample_data`` (see setup.py); no code."""
