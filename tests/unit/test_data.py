"""Unit tests for steeldefect.data.dataset on small images generated in tmp_path."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from steeldefect.data import loading
from steeldefect.data.dataset import (
    CLASS_NAMES_NEU,
    BadImageWarning,
    Dataset,
    DatasetError,
    dataset_fingerprint,
    is_ignored_file,
    scan_dataset,
)
from steeldefect.data.decode import read_image
from steeldefect.data.inspection import format_inspection, inspect_dataset
from steeldefect.data.loading import image_infos, load_images
from steeldefect.data.splits import make_splits

# --------------------------------------------------------------------------------------------------
# Layouts and order
# --------------------------------------------------------------------------------------------------


def test_folders_layout_with_spaces_nested_files_and_natural_order(tmp_path, make_image):
    make_image(tmp_path / "rust spots" / "img 10.png")
    make_image(tmp_path / "rust spots" / "img 2.png")
    make_image(tmp_path / "rust spots" / "deep" / "er" / "img 1.bmp", fmt="BMP")
    make_image(tmp_path / "Clean" / "a.png")
    make_image(tmp_path / "Clean" / "b.tif")

    dataset = scan_dataset(tmp_path)

    assert dataset.layout == "folders"
    assert dataset.class_names == ("Clean", "rust spots")  # Python string sort: upper case first
    assert dataset.relative_names == (
        "Clean/a.png",
        "Clean/b.tif",
        "rust spots/deep/er/img 1.bmp",
        "rust spots/img 2.png",
        "rust spots/img 10.png",
    )
    assert dataset.labels.tolist() == [0, 0, 1, 1, 1]
    assert dataset.labels.dtype == np.int64
    assert dataset.counts() == {"Clean": 2, "rust spots": 3}


def test_neu_det_flat_names_with_side_files_ignored(tmp_path, make_image):
    for name in CLASS_NAMES_NEU:
        for index in (10, 2, 1):
            make_image(tmp_path / "IMAGES" / f"{name}_{index}.jpg")
    (tmp_path / "SHA256SUMS").write_text("abc  IMAGES/crazing_1.jpg\n")
    (tmp_path / "IMAGES" / "README.md").write_text("about\n")
    (tmp_path / "IMAGES" / "notes.txt").write_text("notes\n")
    (tmp_path / "IMAGES" / ".DS_Store").write_bytes(b"\x00junk")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "other.jpg").write_bytes(b"not an image")
    (tmp_path / "ANNOTATIONS").mkdir()
    (tmp_path / "ANNOTATIONS" / "crazing_1.xml").write_text("<annotation/>")

    dataset = scan_dataset(tmp_path)

    assert dataset.layout == "neu-det"
    assert dataset.class_names == CLASS_NAMES_NEU
    assert dataset.relative_names[:3] == ("IMAGES/crazing_1.jpg", "IMAGES/crazing_2.jpg", "IMAGES/crazing_10.jpg")
    assert dataset.counts() == {name: 3 for name in CLASS_NAMES_NEU}
    assert dataset.labels.tolist() == [label for label in range(6) for _ in range(3)]


def test_neu_cls_names(tmp_path, make_neu_dataset):
    make_neu_dataset(tmp_path, per_class=2, layout="neu-cls", suffix=".bmp")

    dataset = scan_dataset(tmp_path)

    assert dataset.layout == "neu-cls"
    assert dataset.class_names == CLASS_NAMES_NEU
    assert dataset.relative_names[:2] == ("Cr_1.bmp", "Cr_2.bmp")
    assert dataset.relative_names[-1] == "Sc_2.bmp"
    by_name = dict(zip(dataset.relative_names, dataset.labels.tolist()))
    assert by_name["PS_1.bmp"] == CLASS_NAMES_NEU.index("pitted_surface")
    assert by_name["RS_2.bmp"] == CLASS_NAMES_NEU.index("rolled-in_scale")


def test_dataset_subset_keeps_class_names(tmp_path, make_neu_dataset):
    dataset = scan_dataset(make_neu_dataset(tmp_path, per_class=2))
    part = dataset.subset([0, 11])
    assert part.relative_names == ("crazing_1.jpg", "scratches_2.jpg")
    assert part.labels.tolist() == [0, 5]
    assert part.class_names == dataset.class_names
    assert part.counts()["inclusion"] == 0
    mask = np.zeros(len(dataset), dtype=bool)
    mask[2] = True
    assert dataset.subset(mask).relative_names == ("inclusion_1.jpg",)


def test_dataset_labels_are_read_only(tmp_path, make_neu_dataset):
    dataset = scan_dataset(make_neu_dataset(tmp_path, per_class=1))
    with pytest.raises(ValueError):
        dataset.labels[0] = 3


# --------------------------------------------------------------------------------------------------
# Structural problems: each names its file or folder, all raised together
# --------------------------------------------------------------------------------------------------


def test_unknown_flat_file_names_are_all_listed(tmp_path, make_image):
    make_image(tmp_path / "photo1.jpg")
    make_image(tmp_path / "scan_2.png")
    make_image(tmp_path / "other.bmp", fmt="BMP")

    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path)

    assert len(caught.value.problems) == 3
    for name in ("photo1.jpg", "scan_2.png", "other.bmp"):
        assert any(
            str(tmp_path / name) in line and "class is unknown" in line and "one sub-folder per class" in line
            for line in caught.value.problems
        )


def test_stray_file_among_neu_names_is_reported_or_skipped(tmp_path, make_neu_dataset, make_image):
    make_neu_dataset(tmp_path, per_class=2)
    make_image(tmp_path / "IMG_0001.jpg")

    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path)
    (line,) = caught.value.problems
    assert line.startswith(str(tmp_path / "IMG_0001.jpg")) and "NEU-DET pattern" in line

    with pytest.warns(BadImageWarning, match="IMG_0001.jpg"):
        dataset = scan_dataset(tmp_path, skip_bad=True)
    assert dataset.layout == "neu-det"
    assert len(dataset) == 12


def test_stray_root_file_next_to_class_folders(tmp_path, make_image):
    make_image(tmp_path / "good" / "a.png")
    make_image(tmp_path / "bad" / "b.png")
    make_image(tmp_path / "preview.png")
    with pytest.raises(DatasetError, match="preview.png"):
        scan_dataset(tmp_path)
    with pytest.warns(BadImageWarning, match="preview.png"):
        assert scan_dataset(tmp_path, skip_bad=True).class_names == ("bad", "good")


def test_skipping_every_flat_file_leaves_nothing(tmp_path, make_image):
    make_image(tmp_path / "photo.jpg")
    with pytest.warns(BadImageWarning), pytest.raises(DatasetError, match="no image files left"):
        scan_dataset(tmp_path, skip_bad=True)


def test_structural_problems_are_reported_together(tmp_path, make_image):
    for index in range(5):
        make_image(tmp_path / "big" / f"{index}.png")
    make_image(tmp_path / "small" / "0.png")
    make_image(tmp_path / "small" / "1.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "only text").mkdir()
    (tmp_path / "only text" / "README.md").write_text("nothing here\n")

    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path, min_per_class=3)

    problems = caught.value.problems
    assert len(problems) == 3
    assert str(caught.value).count("\n") == 2  # one line per problem
    assert any(str(tmp_path / "empty") in line and "no image files" in line for line in problems)
    assert any(str(tmp_path / "only text") in line and "no image files" in line for line in problems)
    assert any(
        str(tmp_path / "small") in line and "only 2 image(s)" in line and "at least 3" in line for line in problems
    )


def test_class_smaller_than_number_of_folds(tmp_path, make_neu_dataset):
    make_neu_dataset(tmp_path, per_class=4)
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path, min_per_class=5)
    assert len(caught.value.problems) == 6
    assert "class 'crazing'" in caught.value.problems[0] and "only 4" in caught.value.problems[0]


def test_missing_neu_class_is_reported(tmp_path, make_neu_dataset):
    make_neu_dataset(tmp_path, per_class=2, classes=("crazing", "inclusion"))
    with pytest.raises(DatasetError) as caught:
        scan_dataset(tmp_path)
    assert len(caught.value.problems) == 4
    assert any("'scratches'" in line and "no image files" in line for line in caught.value.problems)


def test_folder_with_no_images(tmp_path):
    (tmp_path / "README.txt").write_text("empty dataset\n")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DatasetError, match="no image files found") as caught:
        scan_dataset(tmp_path)
    assert str(tmp_path) in str(caught.value)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")


def test_single_class_folder_is_an_error(tmp_path, make_image):
    make_image(tmp_path / "IMAGES" / "crazing_1.jpg")
    make_image(tmp_path / "IMAGES" / "holiday.jpg")
    with pytest.raises(DatasetError, match="only one class folder"):
        scan_dataset(tmp_path)


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_dataset(tmp_path, make_image):
    """Two classes of good images plus one file of each kind of damage, spread over both classes."""
    for index in range(3):
        make_image(tmp_path / "a" / f"good {index}.jpg", seed=index)
        make_image(tmp_path / "b" / f"good {index}.png", seed=10 + index)
    (tmp_path / "a" / "zero.jpg").write_bytes(b"")
    (tmp_path / "a" / "text.jpg").write_text("this is not a picture\n")
    jpeg = make_image(tmp_path / "scratch.jpg", size=(64, 64)).read_bytes()
    (tmp_path / "scratch.jpg").unlink()
    (tmp_path / "b" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "b" / "corrupt.jpg").write_bytes(jpeg[:40] + bytes(range(256)) * 2)
    return tmp_path


def test_all_bad_files_are_listed_in_one_error(bad_dataset):
    dataset = scan_dataset(bad_dataset)  # scanning does not decode, so it passes

    with pytest.raises(DatasetError) as caught:
        load_images(dataset, image_size=(8, 8), cache_dir=False, progress=False)

    problems = caught.value.problems
    assert len(problems) == 4
    expected = {
        "a/zero.jpg": "empty file (0 bytes)",
        "a/text.jpg": "not an image",
        "b/truncated.jpg": "truncated",
        "b/corrupt.jpg": "corrupt JPEG",
    }
    for name, phrase in expected.items():
        matching = [line for line in problems if line.startswith(f"{bad_dataset / name}: ")]
        assert len(matching) == 1, (name, problems)
        assert phrase in matching[0]


def test_skip_bad_excludes_with_warning(bad_dataset):
    dataset = scan_dataset(bad_dataset)

    with pytest.warns(BadImageWarning) as caught:
        loaded, images = load_images(dataset, image_size=(8, 8), cache_dir=False, skip_bad=True, progress=False)

    message = str(caught[0].message)
    assert all(name in message for name in ("zero.jpg", "text.jpg", "truncated.jpg", "corrupt.jpg"))
    assert len(loaded) == 6 and images.shape == (6, 8, 8, 3)
    assert all(name.split("/")[1].startswith("good") for name in loaded.relative_names)
    assert loaded.class_names == ("a", "b")


def test_skip_bad_rechecks_class_counts(tmp_path, make_image):
    make_image(tmp_path / "fine" / "1.png")
    make_image(tmp_path / "fine" / "2.png")
    make_image(tmp_path / "broken" / "1.png")
    (tmp_path / "broken" / "2.png").write_bytes(b"")
    (tmp_path / "gone" / "1.png").parent.mkdir()
    (tmp_path / "gone" / "1.png").write_text("text")

    dataset = scan_dataset(tmp_path, min_per_class=1)
    with pytest.warns(BadImageWarning), pytest.raises(DatasetError) as caught:
        load_images(dataset, image_size=(4, 4), cache_dir=False, skip_bad=True, progress=False, min_per_class=2)
    problems = caught.value.problems
    assert len(problems) == 2
    assert any(str(tmp_path / "gone") in line and "no image files after skipping" in line for line in problems)
    assert any(str(tmp_path / "broken") in line and "only 1 image(s)" in line for line in problems)


def _single_image_dataset(tmp_path: Path, name: str) -> Dataset:
    # A second class "z" makes the folder layout valid; the image under test stays at index 0.
    (tmp_path / "z").mkdir()
    Image.new("L", (3, 3), 0).save(tmp_path / "z" / "other.png")
    dataset = scan_dataset(tmp_path)
    assert dataset.relative_names[0] == name
    return dataset


MODE_CASES = [
    # (mode, how to build it, format, expected RGB at every pixel)
    ("L", lambda: Image.new("L", (5, 4), 100), "PNG", (100, 100, 100)),
    ("LA", lambda: Image.new("LA", (5, 4), (77, 0)), "PNG", (77, 77, 77)),
    ("RGB", lambda: Image.new("RGB", (5, 4), (10, 200, 30)), "PNG", (10, 200, 30)),
    ("RGBA", lambda: Image.new("RGBA", (5, 4), (10, 20, 30, 0)), "PNG", (10, 20, 30)),
    ("P", lambda: Image.new("RGB", (5, 4), (255, 0, 0)).convert("P"), "PNG", (255, 0, 0)),
    ("CMYK", lambda: Image.new("CMYK", (5, 4), (0, 255, 255, 0)), "TIFF", (255, 0, 0)),
    ("I;16", lambda: Image.fromarray(np.full((4, 5), 65535, dtype=np.uint16)), "PNG", (255, 255, 255)),
    ("I;16", lambda: Image.fromarray(np.full((4, 5), 257 * 100, dtype=np.uint16)), "TIFF", (100, 100, 100)),
    ("I", lambda: Image.fromarray(np.full((4, 5), 65535, dtype=np.int32)), "TIFF", (255, 255, 255)),
    ("F", lambda: Image.fromarray(np.full((4, 5), 99.6, dtype=np.float32)), "TIFF", (100, 100, 100)),
    ("F", lambda: Image.fromarray(np.full((4, 5), 1e6, dtype=np.float32)), "TIFF", (255, 255, 255)),
    ("1", lambda: Image.new("1", (5, 4), 1), "BMP", (255, 255, 255)),
]


@pytest.mark.parametrize(
    ("mode", "build", "fmt", "expected"), MODE_CASES, ids=[f"{c[0]}-{c[2]}-{i}" for i, c in enumerate(MODE_CASES)]
)
def test_every_mode_converts_to_rgb_uint8(tmp_path, mode, build, fmt, expected):
    image = build()
    assert image.mode == mode
    (tmp_path / "a").mkdir()
    image.save(tmp_path / "a" / "img.dat", format=fmt)  # the extension is deliberately meaningless
    dataset = _single_image_dataset(tmp_path, "a/img.dat")

    loaded, images = load_images(dataset, image_size=(6, 7), cache_dir=False, progress=False)

    assert images.dtype == np.uint8 and images.shape == (2, 6, 7, 3)
    assert (images[0] == np.array(expected, dtype=np.uint8)).all(), images[0, 0, 0]
    assert image_infos(loaded)[0].mode == mode


def test_sixteen_bit_scaling_rounds(tmp_path):
    values = np.array([[0, 128, 129, 257, 32896, 65535]], dtype=np.uint16)
    (tmp_path / "a").mkdir()
    Image.fromarray(values).save(tmp_path / "a" / "x.png")
    dataset = _single_image_dataset(tmp_path, "a/x.png")
    _, images = load_images(dataset, image_size=(1, 6), cache_dir=False, progress=False)
    assert images[0, 0, :, 0].tolist() == [0, 0, 1, 1, 128, 255]


def test_png_bytes_in_jpg_file_decode_by_content(tmp_path, make_image):
    array = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    make_image(tmp_path / "a" / "really_png.jpg", array=array, fmt="PNG")
    dataset = _single_image_dataset(tmp_path, "a/really_png.jpg")
    _, images = load_images(dataset, image_size=(4, 4), cache_dir=False, progress=False)
    np.testing.assert_array_equal(images[0], array)  # PNG is lossless, same size: exact pixels


def test_resize_uses_height_width_order(tmp_path, make_image):
    make_image(tmp_path / "a" / "wide.png", size=(40, 10))
    dataset = _single_image_dataset(tmp_path, "a/wide.png")
    _, images = load_images(dataset, image_size=(5, 20), cache_dir=False, progress=False)
    assert images.shape == (2, 5, 20, 3)
    expected = np.asarray(Image.open(tmp_path / "a" / "wide.png").convert("RGB").resize((20, 5), Image.BILINEAR))
    np.testing.assert_array_equal(images[0], expected)


def test_read_image_matches_load_images(tmp_path, make_image):
    make_image(tmp_path / "a" / "x.png", size=(30, 20), mode="L")
    dataset = _single_image_dataset(tmp_path, "a/x.png")
    _, images = load_images(dataset, image_size=(7, 9), cache_dir=False, progress=False)
    np.testing.assert_array_equal(read_image(tmp_path / "a" / "x.png", (7, 9)), images[0])
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"empty\.jpg: empty file"):
        read_image(tmp_path / "a" / "empty.jpg")


@pytest.mark.parametrize("grey", [True, False], ids=["grey stored as RGB", "colour"])
def test_a_grey_picture_stored_as_rgb_resizes_to_the_same_pixels_as_a_colour_one(tmp_path, grey):
    """Grey RGB pictures are resized on one band (faster); the pixels are those of Pillow's
    three-band resize, at upscaling, downscaling and odd sizes, as training always saw them."""
    rng = np.random.default_rng(3)
    band = rng.integers(0, 256, (37, 41), dtype=np.uint8)
    pixels = np.stack([band] * 3, axis=2) if grey else rng.integers(0, 256, (37, 41, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "x.png")
    for size in ((224, 224), (20, 30), (41, 37), (64, 50)):
        three_bands = np.asarray(Image.fromarray(pixels).resize(size[::-1], Image.BILINEAR))
        image = read_image(tmp_path / "x.png", size)
        assert image.shape == (*size, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, three_bands)


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        ("README", True),
        ("readme.md", True),
        ("LICENSE.txt", True),
        ("SHA256SUMS", True),
        ("a.csv", True),
        ("x.YAML", True),
        ("crazing_1.xml", True),
        (".DS_Store", True),
        ("a.jpg", False),
        ("notes", False),
    ],
)
def test_is_ignored_file(name, ignored):
    assert is_ignored_file(name) is ignored


def test_progress_bar_shows_counts(tmp_path, make_neu_dataset, capsys):
    dataset = scan_dataset(make_neu_dataset(tmp_path, per_class=1))
    load_images(dataset, image_size=(4, 4), cache_dir=False, progress=True)
    assert "6/6" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Cache and fingerprint
# --------------------------------------------------------------------------------------------------


def test_second_load_reads_the_cache_without_decoding(tmp_path, make_neu_dataset, monkeypatch):
    dataset = scan_dataset(make_neu_dataset(tmp_path / "data", per_class=2))
    cache = tmp_path / "cache"

    first_dataset, first = load_images(dataset, image_size=(16, 16), cache_dir=cache, progress=False)

    def no_decoding(path):
        raise AssertionError(f"decoded {path} although the cache should have been used")

    monkeypatch.setattr(loading, "decode_file", no_decoding)
    second_dataset, second = load_images(dataset, image_size=(16, 16), cache_dir=cache, progress=False)

    np.testing.assert_array_equal(first, second)
    assert second_dataset.relative_names == first_dataset.relative_names
    fingerprint = dataset_fingerprint(dataset, (16, 16))
    meta = json.loads((cache / "images" / f"{fingerprint[:16]}-16x16.json").read_text())
    assert meta["fingerprint"] == fingerprint
    assert meta["files"] == list(dataset.relative_names)
    assert [entry["name"] for entry in meta["images"]] == list(dataset.relative_names)
    assert meta["images"][0]["width"] == 32 and meta["images"][0]["mode"] == "L"
    assert (cache / "images" / f"{fingerprint[:16]}-16x16.npy").is_file()


def test_cache_hit_is_writable_but_never_changes_the_cache(tmp_path, make_neu_dataset):
    dataset = scan_dataset(make_neu_dataset(tmp_path / "data", per_class=1))
    _, first = load_images(dataset, image_size=(8, 8), cache_dir=tmp_path / "cache", progress=False)
    _, second = load_images(dataset, image_size=(8, 8), cache_dir=tmp_path / "cache", progress=False)
    second[:] = 0  # copy-on-write: the caller may scribble on its array
    _, third = load_images(dataset, image_size=(8, 8), cache_dir=tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(third, first)


def test_cache_disabled_writes_nothing(tmp_path, make_neu_dataset, monkeypatch):
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "default-cache"))
    dataset = scan_dataset(make_neu_dataset(tmp_path / "data", per_class=1))
    load_images(dataset, image_size=(4, 4), cache_dir=False, progress=False)
    assert not (tmp_path / "default-cache").exists()
    load_images(dataset, image_size=(4, 4), cache_dir=None, progress=False)
    assert list((tmp_path / "default-cache" / "images").glob("*-4x4.npy"))


def test_fingerprint_tracks_bytes_names_labels_and_size(tmp_path, make_neu_dataset, make_image):
    root = make_neu_dataset(tmp_path / "data", per_class=2)
    dataset = scan_dataset(root)
    original = dataset_fingerprint(dataset, (16, 16))

    assert dataset_fingerprint(scan_dataset(root), (16, 16)) == original
    assert dataset_fingerprint(dataset, (16, 17)) != original
    assert dataset_fingerprint(dataset.subset(range(1, len(dataset))), (16, 16)) != original

    make_image(root / "inclusion_2.jpg", seed=99)  # same name and label, different bytes
    assert dataset_fingerprint(dataset, (16, 16)) != original


def test_changed_file_misses_the_cache(tmp_path, make_neu_dataset, make_image):
    root = make_neu_dataset(tmp_path / "data", per_class=2)
    dataset = scan_dataset(root)
    _, before = load_images(dataset, image_size=(8, 8), cache_dir=tmp_path / "cache", progress=False)
    make_image(root / "crazing_1.jpg", size=(8, 8), seed=5)
    _, after = load_images(dataset, image_size=(8, 8), cache_dir=tmp_path / "cache", progress=False)
    assert not np.array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1:], after[1:])
    assert len(list((tmp_path / "cache" / "images").glob("*.npy"))) == 2


def test_cached_bad_files_are_reported_again_and_skippable_without_decoding(bad_dataset, tmp_path, monkeypatch):
    dataset = scan_dataset(bad_dataset)
    cache = tmp_path.parent / f"{tmp_path.name}-cache"
    with pytest.raises(DatasetError):
        load_images(dataset, image_size=(8, 8), cache_dir=cache, progress=False)

    monkeypatch.setattr(loading, "decode_file", lambda path: pytest.fail(f"decoded {path}"))
    with pytest.raises(DatasetError) as caught:
        load_images(dataset, image_size=(8, 8), cache_dir=cache, progress=False)
    assert len(caught.value.problems) == 4
    with pytest.warns(BadImageWarning):
        loaded, images = load_images(dataset, image_size=(8, 8), cache_dir=cache, skip_bad=True, progress=False)
    assert len(loaded) == len(images) == 6


def test_damaged_cache_is_ignored(tmp_path, make_neu_dataset):
    dataset = scan_dataset(make_neu_dataset(tmp_path / "data", per_class=1))
    cache = tmp_path / "cache"
    _, first = load_images(dataset, image_size=(8, 8), cache_dir=cache, progress=False)
    (array_path,) = (cache / "images").glob("*.npy")
    complete = array_path.read_bytes()
    for damaged in (b"garbage", complete[: len(complete) // 2]):
        array_path.write_bytes(damaged)
        _, again = load_images(dataset, image_size=(8, 8), cache_dir=cache, progress=False)
        np.testing.assert_array_equal(first, again)


# --------------------------------------------------------------------------------------------------
# Image infos and inspection
# --------------------------------------------------------------------------------------------------


def test_pixel_hash_finds_identical_pixels_across_formats(tmp_path, make_image):
    array = np.random.default_rng(0).integers(0, 256, size=(6, 5, 3), dtype=np.uint8)
    make_image(tmp_path / "a" / "one.png", array=array)
    make_image(tmp_path / "a" / "two.bmp", array=array)
    make_image(tmp_path / "b" / "three.png", array=array[::-1].copy())

    infos = image_infos(scan_dataset(tmp_path))

    assert [(i.name, i.width, i.height, i.mode) for i in infos] == [
        ("a/one.png", 5, 6, "RGB"),
        ("a/two.bmp", 5, 6, "RGB"),
        ("b/three.png", 5, 6, "RGB"),
    ]
    assert infos[0].pixel_hash == infos[1].pixel_hash != infos[2].pixel_hash


def _neu_with_duplicate(root: Path, make_neu_dataset) -> Path:
    make_neu_dataset(root, per_class=10)
    (root / "patches_5.jpg").write_bytes((root / "patches_2.jpg").read_bytes())
    return root


def test_inspect_reports_duplicates_and_their_split_roles(tmp_path, make_neu_dataset):
    root = _neu_with_duplicate(tmp_path, make_neu_dataset)
    (tmp_path / "inclusion_3.jpg").write_text("broken")

    report = inspect_dataset(root, test_fraction=0.2, n_folds=2, seed=0)

    assert report["layout"] == "neu-det"
    assert report["n_images"] == 60
    assert report["class_counts"] == {name: 10 for name in CLASS_NAMES_NEU}
    assert report["image_sizes"] == {"32x32": 59}
    assert report["image_modes"] == {"L": 59}
    assert list(report["bad_files"]) == ["inclusion_3.jpg"]
    assert report["split"]["n_test"] + report["split"]["n_train"] == 59
    (group,) = report["duplicate_groups"]
    assert group["files"] == ["patches_2.jpg", "patches_5.jpg"]
    assert group["classes"] == ["patches", "patches"]
    assert not group["conflicting_labels"]

    readable = scan_dataset(root, skip_bad=False).subset(
        [i for i, n in enumerate(scan_dataset(root).relative_names) if n != "inclusion_3.jpg"]
    )
    splits = make_splits(readable.labels, test_fraction=0.2, n_folds=2, seed=0)
    expected_roles = [splits.role_of(readable.relative_names.index(name)) for name in group["files"]]
    assert group["roles"] == expected_roles
    assert group["straddles_split"] == (expected_roles.count("test") == 1)
    json.dumps(report)  # the report is meant to be written as JSON


def test_format_inspection_warns_for_each_straddling_pair(tmp_path, make_neu_dataset):
    root = _neu_with_duplicate(tmp_path, make_neu_dataset)
    # Find a seed whose split puts the two copies on different sides, and one that does not.
    reports = {seed: inspect_dataset(root, test_fraction=0.3, n_folds=2, seed=seed) for seed in range(12)}
    straddling = [r for r in reports.values() if r["duplicate_groups"][0]["straddles_split"]]
    together = [r for r in reports.values() if not r["duplicate_groups"][0]["straddles_split"]]
    assert straddling and together

    text = format_inspection(straddling[0])
    warning_lines = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warning_lines) == 1
    assert "fall on both sides of the train/test split" in warning_lines[0]
    assert "patches_2.jpg" in warning_lines[0] and "patches_5.jpg" in warning_lines[0]
    assert "layout: neu-det" in text.lower() and "patches" in text

    assert not [line for line in format_inspection(together[0]).splitlines() if "both sides" in line]

    across_folds = [r for r in together if r["duplicate_groups"][0]["straddles_folds"]]
    assert across_folds
    assert "NOTE: duplicate images patches_2.jpg, patches_5.jpg are in different cross-validation folds" in (
        format_inspection(across_folds[0])
    )


def test_format_inspection_flags_conflicting_labels(tmp_path, make_image):
    array = np.full((4, 4, 3), 9, dtype=np.uint8)
    for name in ("a", "b"):
        for index in range(4):
            make_image(tmp_path / name / f"{index}.png", seed=index + (10 if name == "b" else 0))
    make_image(tmp_path / "a" / "same.png", array=array)
    make_image(tmp_path / "b" / "same.png", array=array)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn may warn about the tiny folds; not under test
        report = inspect_dataset(tmp_path, test_fraction=0.2, n_folds=2, seed=1)
    assert report["duplicate_groups"][0]["conflicting_labels"]
    assert "different classes" in format_inspection(report)
