"""`train --data A --data B`: several dataset roots merged (classes by name), each fingerprinted and
recorded, the merged set fingerprinted, and the re-run check still guarding the run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from steeldefect import cli
from steeldefect.core.files import read_json
from steeldefect.data.dataset import DatasetError, dataset_fingerprint, scan_dataset, scan_datasets
from tiny import TINY, make_dataset, make_pattern_image, register_tiny_backbone

FAST = ["--backbone", TINY, "--learning-rates", "0.01", "--epochs", "2", "--batch-size", "8"]
FAST += ["--folds", "2", "--image-size", "32"]


def reviewed_root(root: Path, per_class: dict[str, int], seed: int = 5) -> Path:
    """A folder like `review export` writes: class folders of <sha256>-style names."""
    rng = np.random.default_rng(seed)
    for cls, (name, count) in enumerate(per_class.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(make_pattern_image(cls % 3, rng, 40)).save(folder / f"{i:064x}.png")
    return root


def test_roots_merge_by_class_name(tmp_path):
    base = make_dataset(tmp_path / "base", per_class=6)  # dots, stripes, flat
    extra = reviewed_root(tmp_path / "reviewed", {"stripes": 2, "oil": 3})  # one known class, one new
    merged, parts = scan_datasets([base, extra])
    assert merged.layout == "merged" and len(parts) == 2
    assert merged.class_names == ("dots", "flat", "oil", "stripes")
    assert merged.counts() == {"dots": 6, "flat": 6, "oil": 3, "stripes": 8}
    oil = [name for name, label in zip(merged.relative_names, merged.labels) if merged.class_names[label] == "oil"]
    assert oil == [f"root2/oil/{i:064x}.png" for i in range(3)]
    assert all(name.startswith("root1/") for name in merged.subset(merged.labels == 0).relative_names)
    # One root is exactly what train always read.
    alone, (same,) = scan_datasets([base])
    assert alone.layout == "folders" and alone.relative_names == scan_dataset(base).relative_names
    assert same is alone


def test_merged_class_counts_are_checked_together(tmp_path):
    base = make_dataset(tmp_path / "base", per_class=6)
    extra = reviewed_root(tmp_path / "reviewed", {"oil": 3})  # one class alone would be refused
    with pytest.raises(DatasetError, match="only one class folder"):
        scan_dataset(extra)
    scan_datasets([base, extra], min_per_class=3)
    with pytest.raises(DatasetError, match=r"class 'oil' \(all --data folders together\) has only 3 image"):
        scan_datasets([base, extra], min_per_class=4)
    with pytest.raises(DatasetError, match="given twice"):
        scan_datasets([base, base])


def test_train_with_two_roots_records_each_and_guards_the_run(tmp_path, monkeypatch, capsys):
    register_tiny_backbone(monkeypatch, tmp_path / "keras")
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    base = make_dataset(tmp_path / "base", per_class=8)
    extra = reviewed_root(tmp_path / "reviewed", {"stripes": 4, "oil": 8})
    run = tmp_path / "run"
    args = ["--quiet", "train", "--data", str(base), "--data", str(extra), *FAST, "--out", str(run)]
    assert cli.main(args) == 0
    record = read_json(run / "dataset.json")
    assert record["class_names"] == ["dots", "flat", "oil", "stripes"]
    assert record["counts"] == {"dots": 8, "flat": 8, "oil": 8, "stripes": 12}
    assert record["root"] == [str(base.resolve()), str(extra.resolve())]
    roots = {Path(entry["root"]): entry for entry in record["roots"]}
    for root in (base, extra):
        alone = scan_dataset(root, min_per_class=1) if root == base else scan_datasets([root, base])[1][0]
        assert roots[root.resolve()]["fingerprint"] == dataset_fingerprint(alone, (32, 32))
    assert record["fingerprint"] not in {entry["fingerprint"] for entry in record["roots"]}
    summary = read_json(run / "summary.json")
    assert summary["dataset"]["roots"] == record["roots"]
    assert read_json(run / "config.json")["commands"]["train"]["options"]["data"] == record["root"]
    model_meta = read_json(next((run / TINY).rglob("final.keras.json")))
    assert model_meta["class_names"] == ["dots", "flat", "oil", "stripes"]
    assert model_meta["dataset_fingerprint"] == record["fingerprint"]

    # The same roots again: the run resumes (nothing changed, nothing refused); `--data A B` is the same.
    again = ["--quiet", "train", "--data", str(base), str(extra), *FAST, "--out", str(run)]
    assert cli.main(again) == 0
    assert read_json(run / "dataset.json")["fingerprint"] == record["fingerprint"]
    # The stages after train re-read every root.
    from steeldefect.study import pipeline

    prepared, _ = pipeline.load_run_data(run, progress=False)
    assert prepared.fingerprint == record["fingerprint"]

    # A new reviewed image changes the merged data: refused in one line, the run folder kept.
    shutil.copy(next((extra / "oil").iterdir()), extra / "oil" / ("f" * 64 + ".png"))
    Image.fromarray(make_pattern_image(2, np.random.default_rng(9), 40)).save(extra / "oil" / ("e" * 64 + ".png"))
    capsys.readouterr()
    assert cli.main(again) == 2
    err = capsys.readouterr().err
    assert "made from other data" in err and err.count("\n") == 1
    assert read_json(run / "dataset.json") == record
