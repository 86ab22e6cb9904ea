"""Reader, writers and sample data of the plugin, called as napari calls them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tifffile

from napari_uga import _reader, _sample_data, _writer
from napari_uga.io import read_mask, write_array


def _pyramid_tiff(path, image: np.ndarray) -> None:
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, subifds=2, tile=(128, 128), photometric="rgb")
        for level in (1, 2):
            tif.write(image[:: 2**level, :: 2**level], subfiletype=1, tile=(128, 128), photometric="rgb")


def test_pyramid_opens_lazily_as_multiscale(tmp_path, rng):
    image = rng.integers(0, 255, (512, 384, 3), dtype=np.uint8)
    path = tmp_path / "slide.tif"
    _pyramid_tiff(path, image)
    reader = _reader.get_reader(str(path))
    [(levels, meta, kind)] = reader(str(path))
    assert kind == "image" and meta["multiscale"] and meta["rgb"]
    assert [lv.shape for lv in levels] == [(512, 384, 3), (256, 192, 3), (128, 96, 3)]
    assert not isinstance(levels[0], np.ndarray)  # zarr, read tile by tile
    np.testing.assert_array_equal(levels[0][100:140, 50:60], image[100:140, 50:60])
    np.testing.assert_array_equal(levels[2][:], image[::4, ::4])


def test_flat_images_and_masks(tmp_path, sample_dir):
    tile = min((sample_dir / "images").glob("*.png"))
    [(data, meta, kind)] = _reader.read(str(tile))
    assert kind == "image" and data.shape == (256, 256, 3) and meta["name"] == tile.stem
    [(mask, _, kind)] = _reader.read(str(sample_dir / "masks" / tile.name))
    assert kind == "labels" and mask.shape == (256, 256) and set(np.unique(mask)) <= {0, 1}
    assert _reader.get_reader(str(tmp_path / "notes.txt")) is None


def test_labels_tiff_round_trip(tmp_path):
    labels = np.zeros((80, 90), np.uint8)
    labels[10:30, 20:60] = 1
    [written] = _writer.write_labels_tiff(str(tmp_path / "mask"), labels, {"name": "uga: annotation"})
    assert written.endswith(".tif")
    np.testing.assert_array_equal(read_mask(written), labels)


def test_labels_geojson_traces_holes_in_pixel_coordinates(tmp_path):
    labels = np.zeros((100, 120), np.uint8)
    labels[10:50, 20:80] = 1
    labels[20:30, 40:50] = 0
    [written] = _writer.write_labels_geojson(str(tmp_path / "a.geojson"), labels, {"name": "uga: annotation"})
    [feature] = json.loads(Path(written).read_text())["features"]
    assert feature["properties"]["objectType"] == "annotation"
    [[outer, hole]] = feature["geometry"]["coordinates"]
    xs, ys = np.array(outer)[:, 0], np.array(outer)[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (20, 80, 10, 50)
    hx, hy = np.array(hole)[:, 0], np.array(hole)[:, 1]
    assert (hx.min(), hx.max(), hy.min(), hy.max()) == (40, 50, 20, 30)
    placed = {"name": "uga: annotation", "translate": (5000.0, 7000.0), "scale": (1.0, 1.0)}  # a patch on a slide
    [written] = _writer.write_labels_geojson(str(tmp_path / "b.geojson"), labels, placed)
    [[outer, _]] = json.loads(Path(written).read_text())["features"][0]["geometry"]["coordinates"]
    xs, ys = np.array(outer)[:, 0], np.array(outer)[:, 1]
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (7020, 7080, 5010, 5050)  # slide coordinates


def test_shapes_geojson_through_napari(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    rects = [np.array([[100, 200], [356, 456]]), np.array([[0, 0], [256, 256]])]
    layer = viewer.add_shapes(
        rects, shape_type="rectangle", name="uga: proposals", features={"rank": [1, 2]}, text="#{rank}"
    )
    target = tmp_path / "proposals.geojson"
    layer.save(str(target), plugin="napari-uga")
    features = json.loads(target.read_text())["features"]
    assert [f["properties"]["name"] for f in features] == ["#1", "#2"]
    ring = np.array(features[0]["geometry"]["coordinates"][0])
    assert ring[:, 0].min() == 200 and ring[:, 0].max() == 456  # x first, full-resolution pixels
    assert ring[:, 1].min() == 100 and ring[:, 1].max() == 356
    np.testing.assert_array_equal(ring[0], ring[-1])


def test_demo_slide_is_a_pyramid_with_its_truth():
    [(levels, meta, kind)] = _sample_data.camelyon_demo_slide()
    [(truth, truth_meta, truth_kind)] = _sample_data.camelyon_demo_truth()
    assert kind == "image" and meta["multiscale"] and truth_kind == "labels" and truth_meta["name"] == "ground truth"
    h, w = levels[0].shape[:2]
    assert [lv.shape[:2] for lv in levels] == [(h, w), (h // 2, w // 2), (h // 4, w // 4)]
    assert truth[0].shape == (h, w)
    assert 0.05 < truth[0].mean() < 0.5  # the lesion is there, and so is tumour-free tissue


def test_demo_slide_places_tiles_at_their_slide_offsets(sample_dir):
    image, _ = _sample_data.demo_slide()
    a = sample_dir / "images" / "c16_tumor_073_x45277_y61676.png"
    b = sample_dir / "images" / "c16_tumor_073_x45301_y59881.png"
    (ya, xa), (yb, xb) = _sample_data.tile_origin(a), _sample_data.tile_origin(b)
    x0, y0 = 45277, 59881  # top-left of the lesion cluster
    tile = _reader.read(str(b))[0][0]
    np.testing.assert_array_equal(image[yb - y0 : yb - y0 + 256, xb - x0 : xb - x0 + 256], tile)
    assert (ya - y0, xa - x0) == (1795, 0)


def test_written_mask_reopens_as_labels(tmp_path):
    path = write_array(tmp_path / "m.tif", np.eye(70, dtype=np.uint8))
    [(_, _, kind)] = _reader.read(str(path))
    assert kind == "labels"
