"""Image / mask validation and atomic writes."""

import numpy as np
import pytest

from napari_uga.io import InputError, load_pairs, read_image, read_mask, tissue_mask, to_rgb_uint8, write_array


def test_load_pairs_reads_real_tiles(sample_dir):
    pairs = load_pairs(sample_dir / "images", sample_dir / "masks")
    assert len(pairs) == 32
    assert all(p.image.shape == (256, 256, 3) and p.image.dtype == np.uint8 for p in pairs)
    assert sum(bool(p.mask.any()) for p in pairs) == 16
    assert set(np.unique(np.concatenate([p.mask.ravel() for p in pairs]))) <= {0, 1}


def test_tiff_round_trip_keeps_float32(tmp_path):
    data = np.random.default_rng(0).random((70, 90), dtype=np.float32)
    path = write_array(tmp_path / "map.tif", data)
    import tifffile

    back = tifffile.imread(path)
    assert back.dtype == np.float32 and np.array_equal(back, data)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((100, 100), np.uint8), "expected an RGB image"),
        (np.zeros((100, 100, 2), np.uint8), "expected an RGB image"),
        (np.zeros((100, 100, 3), np.int32), "unsupported dtype"),
        (np.zeros((32, 100, 3), np.uint8), "smaller than 64"),
    ],
)
def test_bad_images_are_refused_with_one_line(array, message):
    with pytest.raises(InputError, match=message) as info:
        to_rgb_uint8(array, "x.png")
    assert "\n" not in str(info.value)


def test_non_image_file_and_missing_file(tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(InputError, match="notes.png: not a readable image"):
        read_image(bad)
    with pytest.raises(InputError, match="no such file"):
        read_mask(tmp_path / "missing.png")


def test_mask_size_mismatch_names_the_file(tmp_path, sample_dir):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    name = min((sample_dir / "images").iterdir()).name
    (tmp_path / "images" / name).write_bytes((sample_dir / "images" / name).read_bytes())
    write_array(tmp_path / "masks" / name, np.zeros((100, 100), np.uint8))
    with pytest.raises(InputError, match=f"{name}: mask is"):
        load_pairs(tmp_path / "images", tmp_path / "masks")


def test_tissue_mask_separates_glass_from_stain(umcu_pairs):
    image = umcu_pairs[0].image.copy()
    image[:, :128] = 240  # white glass on the left half
    tissue = tissue_mask(image)
    assert tissue[:, :120].mean() < 0.05
    assert tissue[:, 136:].mean() > 0.5
