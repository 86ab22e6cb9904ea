"""Whole-slide I/O: pixel size, level choice, tissue skipping, block-wise maps, OME-TIFF pyramids."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tifffile

from napari_uga.io import InputError
from napari_uga.slides import (
    MAP_NAMES,
    Slide,
    pick_level,
    plan_slide,
    process_slide,
    read_mpp,
    read_pyramid,
    slide_name,
    write_pyramid_array,
    write_synthetic_slide,
)
from napari_uga.uncertainty import compute_uncertainty


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A 1600 x 2000 px pyramidal OME-TIFF at 0.243 µm/px, ~15 % tissue."""
    path = tmp_path_factory.mktemp("slide") / "syn.ome.tif"
    return write_synthetic_slide(path, (1600, 2000), mpp=0.243, n_regions=3, tissue_fraction=0.15, seed=1)


def test_slide_levels_and_pixel_size(synthetic):
    with Slide(synthetic) as slide:
        assert [a.shape for a in slide.levels] == [(1600, 2000, 3), (800, 1000, 3)]
        assert slide.mpp == pytest.approx(0.243)
        assert slide.level_mpp(1) == pytest.approx(0.486)
        assert pick_level(slide, 0.486) == (1, pytest.approx(1.0))
        assert pick_level(slide, 0.3) == (0, pytest.approx(0.81))
        tile = np.asarray(slide.levels[1][:256, :256])
        assert tile.dtype == np.uint8 and tile.shape == (256, 256, 3)
        assert slide.dask(1).shape == (800, 1000, 3)
    with Slide(synthetic, mpp=0.5) as slide:
        assert slide.mpp == 0.5


def test_pixel_size_from_resolution_tags_and_none(tmp_path):
    rgb = np.full((64, 64, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "cm.tif", rgb, resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    tifffile.imwrite(tmp_path / "inch.tif", rgb, resolution=(25400 / 0.5, 25400 / 0.5), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "none.tif", rgb)
    with tifffile.TiffFile(tmp_path / "cm.tif") as tif:
        assert read_mpp(tif) == pytest.approx(0.25)
    with tifffile.TiffFile(tmp_path / "inch.tif") as tif:
        assert read_mpp(tif) == pytest.approx(0.5)
    with tifffile.TiffFile(tmp_path / "none.tif") as tif:
        assert read_mpp(tif) is None


def test_bad_slides_raise_input_errors(tmp_path):
    (tmp_path / "junk.tif").write_bytes(b"not a tiff at all")
    tifffile.imwrite(tmp_path / "gray.tif", np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match="junk.tif"):
        Slide(tmp_path / "junk.tif")
    with pytest.raises(InputError, match="RGB"):
        Slide(tmp_path / "gray.tif")
    with pytest.raises(InputError, match="missing.tif"):
        Slide(tmp_path / "missing.tif")


def test_plan_skips_background_blocks(synthetic, tmp_path):
    plan = plan_slide(synthetic, tmp_path / "s.zarr", input_mpp=0.486, block=256, margin=32)
    assert plan.level == 1 and plan.shape == (800, 1000) and plan.source_shape == (1600, 2000)
    assert plan.n_blocks == 4 * 4
    assert 0 < len(plan.blocks) < plan.n_blocks
    assert slide_name(synthetic) == "syn" == plan.name


def test_block_maps_match_whole_image_and_pyramids_round_trip(synthetic, tmp_path, tiny_model):
    summary = process_slide(tiny_model, synthetic, tmp_path, samples=1, block=256, margin=64)
    assert summary["blocks_run"] < summary["blocks_total"] == 16
    assert not (tmp_path / ".scratch" / "syn.zarr").exists()
    with Slide(synthetic) as slide:
        level1 = np.asarray(slide.levels[1])
    whole = compute_uncertainty(tiny_model, level1, samples=1, factor=1.0, output_scale="working").probability
    for key in MAP_NAMES:
        path = tmp_path / f"syn_{key}.ome.tif"
        with tifffile.TiffFile(path) as tif:
            assert tif.is_ome
            levels = tif.series[0].levels
            assert [lv.shape for lv in levels] == [(800, 1000), (400, 500)]
            assert levels[0].dtype == (np.uint8 if key == "prediction" else np.float32)
            page = tif.pages[0]
            assert (page.tilewidth, page.tilelength) == (256, 256) and page.compression == 8
            assert read_mpp(tif) == pytest.approx(0.486)
    prob = tifffile.imread(tmp_path / "syn_probability.ome.tif")
    blocks_run = prob != 0
    assert 0.02 < blocks_run.mean() < 0.9  # background blocks never ran (zero maps)
    # inside the blocks that ran, block-wise maps with a margin agree with one pass over the whole level
    assert np.abs(prob - whole)[blocks_run].mean() < 0.05 * whole[blocks_run].std()
    prediction = tifffile.imread(tmp_path / "syn_prediction.ome.tif")
    assert set(np.unique(prediction)) <= {0, 1}
    np.testing.assert_array_equal(prediction[blocks_run], (prob[blocks_run] >= 0.5).astype(np.uint8))


def test_napari_opens_written_pyramid_multiscale(tmp_path, rng):
    values = rng.random((1100, 700)).astype(np.float32)
    path = write_pyramid_array(tmp_path / "m_probability.ome.tif", values, mpp=0.486, name="m")
    levels = read_pyramid(path)
    assert [lv.shape for lv in levels] == [(1100, 700), (550, 350)]
    np.testing.assert_array_equal(np.asarray(levels[0]), values)
    from napari.components import ViewerModel

    data = levels
    if importlib.util.find_spec("napari_uga._reader") is not None:  # the plugin's reader, once it ships
        from napari_uga import _reader

        data, meta, kind = _reader.read_one(path)
        assert kind == "image" and meta["multiscale"] and not meta["rgb"]
    viewer = ViewerModel()
    layer = viewer.add_image(data, multiscale=True)
    assert layer.multiscale and len(layer.data) == 2 and layer.data[0].shape == (1100, 700)
