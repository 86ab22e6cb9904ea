"""The annotation dock's napari layers: names, colours, and the map layers drawn from the round's stores."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.colormaps import Colormap, DirectLabelColormap

from ..tiles import MapStore, map_levels

if TYPE_CHECKING:
    import napari

PROBABILITY = "uga: probability"
UNCERTAINTY = "uga: uncertainty"
PREDICTION = "uga: prediction"
PROPOSALS = "uga: proposals"
ANNOTATION = "uga: annotation"
CURRENT_EDGE = "#ffffff"
QUEUED_EDGE = "#ffd400"
DONE_EDGE = "#7cfc00"
PREDICTION_COLOR = "#00e5ff"
ANNOTATION_COLOR = "#39ff14"
MAP_LAYERS = (UNCERTAINTY, PROBABILITY, PREDICTION)


def uncertainty_colormap() -> Colormap:
    """Inferno with transparency that rises with the value, so certain areas leave the H&E visible."""
    from matplotlib import colormaps

    t = np.linspace(0, 1, 64)
    colors = colormaps["inferno"](0.15 + 0.85 * t)
    colors[:, 3] = np.clip(t * 1.6, 0, 1)
    return Colormap(colors, name="uga inferno", controls=t)


def outline_colormap() -> Colormap:
    """0 transparent, 1 the prediction's colour: the tumour outline drawn by ``uga: prediction``."""
    from matplotlib.colors import to_rgba

    return Colormap([(0, 0, 0, 0), to_rgba(PREDICTION_COLOR)], name="uga outline")


def one_color(color: str) -> DirectLabelColormap:
    """Label 1 (tumour) in ``color``, everything else transparent."""
    return DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: color})


def level0(layer: Image):
    """Full-resolution data of an image layer (level 0 of a multiscale layer)."""
    return layer.data[0] if layer.multiscale else layer.data


def upsert(viewer: napari.Viewer, kind: type, name: str, data, **kwargs):
    """Update a layer's data in place, or add it the first time."""
    if name in viewer.layers and isinstance(viewer.layers[name], kind):
        layer = viewer.layers[name]
        layer.data = data
        if kind is Shapes:
            layer.features = kwargs["features"]
        return layer
    adders = {Image: viewer.add_image, Labels: viewer.add_labels, Shapes: viewer.add_shapes}
    return adders[kind](data, name=name, **kwargs)


def show_maps(viewer: napari.Viewer, stores: list[MapStore], place: dict) -> None:
    """The three map layers as lazy multiscale views of ``stores`` (newest first; they fill in as tiles arrive)."""
    layers = {
        PROBABILITY: (map_levels(stores, "probability"), {
            "colormap": "viridis", "contrast_limits": (0, 255), "opacity": 0.5, "visible": False}),
        UNCERTAINTY: (map_levels(stores, "entropy"), {
            "colormap": uncertainty_colormap(), "contrast_limits": stores[0].limits(), "opacity": 0.8}),
        PREDICTION: (map_levels(stores, "probability", threshold=128, outline=True), {
            "colormap": outline_colormap(), "contrast_limits": (0, 1), "opacity": 0.9}),
    }  # fmt: skip
    for name, (data, options) in layers.items():
        upsert(viewer, Image, name, data, multiscale=True, **options, **place)


def refresh_maps(viewer: napari.Viewer, store: MapStore | None) -> None:
    """Redraw the map layers from what the store holds now, the uncertainty's contrast following it."""
    if UNCERTAINTY in viewer.layers and store is not None:
        viewer.layers[UNCERTAINTY].contrast_limits = store.limits()
    for name in MAP_LAYERS:
        if name in viewer.layers:
            viewer.layers[name].refresh()
