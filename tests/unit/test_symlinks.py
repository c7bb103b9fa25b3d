"""Symlinks inside a dataset: followed, each real file counted once, under its own class when it lives
inside the dataset; loops and dangling links skipped with a warning."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

from steeldefect import cli
from steeldefect.data.dataset import SymlinkWarning, scan_dataset

CLASSES = ("crazing", "inclusion", "patches")


@pytest.fixture()
def folders(tmp_path, make_neu_dataset):
    return make_neu_dataset(tmp_path / "data", per_class=4, classes=CLASSES, layout="folders")


def real_files(dataset) -> list[str]:
    return [os.path.realpath(p) for p in dataset.paths]


def scan_quietly(root):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning expected unless a test says so
        return scan_dataset(root)


def test_symlinked_class_folder_adds_nothing_and_takes_nothing(folders, capsys):
    before = scan_quietly(folders).counts()
    (folders / "patches" / "inc_link").symlink_to(Path("..") / "inclusion")
    dataset = scan_quietly(folders)
    assert dataset.counts() == before == {"crazing": 4, "inclusion": 4, "patches": 4}
    assert len(set(real_files(dataset))) == len(dataset) == 12
    assert not any("inc_link" in name for name in dataset.relative_names)

    assert cli.main(["data", "inspect", str(folders)]) == 0
    out = capsys.readouterr().out
    assert "  inclusion  4" in out and "  patches    4" in out
    assert "Exact duplicates (identical decoded pixels): none" in out


def test_top_level_alias_is_not_a_class_but_an_outside_folder_is(folders, tmp_path, make_image):
    (folders / "inc_alias").symlink_to("inclusion")
    outside = tmp_path / "elsewhere" / "rust"
    for i in range(3):
        make_image(outside / f"r{i}.png", seed=i)
    (folders / "rust").symlink_to(outside)
    dataset = scan_quietly(folders)
    assert dataset.class_names == ("crazing", "inclusion", "patches", "rust")
    assert dataset.counts() == {"crazing": 4, "inclusion": 4, "patches": 4, "rust": 3}
    assert [n for n in dataset.relative_names if n.startswith("rust/")] == ["rust/r0.png", "rust/r1.png", "rust/r2.png"]


def test_symlinked_file_counts_once_under_its_real_class_or_where_the_link_is(folders, tmp_path, make_image):
    (folders / "patches" / "looks_like_patches.jpg").symlink_to(folders / "inclusion" / "img 1.jpg")
    stranger = make_image(tmp_path / "outside" / "stranger.png")
    (folders / "crazing" / "stranger.png").symlink_to(stranger)
    dataset = scan_quietly(folders)
    assert dataset.counts() == {"crazing": 5, "inclusion": 4, "patches": 4}
    assert "inclusion/img 1.jpg" in dataset.relative_names
    assert "patches/looks_like_patches.jpg" not in dataset.relative_names
    assert "crazing/stranger.png" in dataset.relative_names


def test_neu_names_reached_twice_are_counted_once(tmp_path, make_neu_dataset):
    root = tmp_path / "neu"
    make_neu_dataset(root / "IMAGES", per_class=3)
    (root / "again").symlink_to("IMAGES")
    dataset = scan_quietly(root)
    assert dataset.layout == "neu-det" and len(dataset) == 18 and set(dataset.counts().values()) == {3}
    assert all(name.startswith("IMAGES/") for name in dataset.relative_names)


def test_loops_and_dangling_links_are_skipped_with_a_warning(folders):
    (folders / "patches" / "loop").symlink_to("..")
    (folders / "crazing" / "self").symlink_to(".")
    (folders / "inclusion" / "gone.jpg").symlink_to(folders / "nowhere.jpg")
    with pytest.warns(SymlinkWarning) as caught:
        dataset = scan_dataset(folders)
    messages = sorted(str(w.message) for w in caught)
    assert dataset.counts() == {"crazing": 4, "inclusion": 4, "patches": 4}
    assert any(m.startswith(f"{folders / 'patches' / 'loop'}: symlink loop") for m in messages)
    assert any(m.startswith(f"{folders / 'crazing' / 'self'}: symlink loop") for m in messages)
    assert any(m.startswith(f"{folders / 'inclusion' / 'gone.jpg'}: dangling symlink") for m in messages)
