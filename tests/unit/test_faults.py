"""Faults and bad options a real user runs into (issue #13, items 1-3, 6, 8, 9): each gives one
clear line naming the file or option, a non-zero exit, no traceback, and leaves an existing run
folder exactly as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from steeldefect import cli
from steeldefect.core import files
from tiny import TINY, make_dataset, make_pattern_image, register_tiny_backbone

TRAIN = [
    "--backbone",
    TINY,
    "--folds",
    "2",
    "--learning-rates",
    "0.01",
    "--epochs",
    "2",
    "--batch-size",
    "8",
    "--image-size",
    "32",
]


@pytest.fixture()
def tiny_env(tmp_path, monkeypatch):
    register_tiny_backbone(monkeypatch, tmp_path / "keras")
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    return make_dataset(tmp_path / "data")


def snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def run_cli(args, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["--quiet", *map(str, args)])
    return code, capsys.readouterr().err


def assert_one_line(err: str, *names: str) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for name in names:
        assert name in lines[0], (name, err)


@pytest.fixture()
def trained(tiny_env, tmp_path, capsys):
    run = tmp_path / "run"
    code, err = run_cli(["train", "--data", tiny_env, "--out", run, *TRAIN], capsys)
    assert code == 0, err
    return run


def test_changed_data_same_options_is_refused_and_the_folder_untouched(tiny_env, trained, capsys):
    before = snapshot(trained)
    image = tiny_env / "dots" / "dots_0.png"
    from PIL import Image

    Image.fromarray(make_pattern_image(0, np.random.default_rng(99))).save(image)
    code, err = run_cli(["train", "--data", tiny_env, "--out", trained, *TRAIN], capsys)
    assert code == 2
    assert_one_line(err, str(trained), "other data", "use a new --out")
    assert snapshot(trained) == before


def test_class_too_small_for_the_test_split_is_refused_by_name(tmp_path, monkeypatch, capsys):
    register_tiny_backbone(monkeypatch, tmp_path / "keras")
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data", per_class=20)
    for extra in sorted((data / "flat").iterdir())[2:]:
        extra.unlink()  # "flat" keeps 2 images
    code, err = run_cli(["train", "--data", data, "--out", tmp_path / "run", *TRAIN], capsys)
    assert code == 2
    assert "flat" in err and "2 image" in err and "at least 7" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("train", "--epochs", "0"),
        ("train", "--learning-rates", "-1"),
        ("train", "--batch-size", "0"),
        ("train", "--test-fraction", "1.5"),
        ("train", "--folds", "1"),
        ("train", "--image-size", "0"),
        ("predict", "--top-k", "0"),
        ("predict", "--top-k", "-3"),
        ("predict", "--threads", "-1"),
        ("evaluate", "--warmup", "0"),
        ("evaluate", "--runs", "0"),
        ("export", "--calibration-samples", "0"),
    ],
)
def test_numeric_options_are_checked_at_parse_time(command, option, value, tmp_path, capsys):
    args = {
        "train": ["train", "--data", tmp_path, "--out", tmp_path / "run"],
        "predict": ["predict", tmp_path / "m.tflite", tmp_path],
        "evaluate": ["evaluate", tmp_path],
        "export": ["export", tmp_path],
    }[command]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*map(str, args), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and value in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_out_that_is_a_file_is_named(tiny_env, tmp_path, capsys):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    code, err = run_cli(["train", "--data", tiny_env, "--out", target, *TRAIN], capsys)
    assert code == 2
    assert_one_line(err, str(target), "not a folder")
    assert target.read_text() == "not a folder"


def test_full_disk_names_the_path_leaves_nothing_partial_and_a_rerun_resumes(tiny_env, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_fsync = os.fsync
    calls = {"n": 0}

    def fsync_then_full(fd):
        calls["n"] += 1
        if calls["n"] > 6:  # the first few files fit, then the disk is full
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync_then_full)
    code, err = run_cli(["train", "--data", tiny_env, "--out", run, *TRAIN], capsys)
    assert code == 2
    assert_one_line(err, "No space left on device", str(tmp_path))
    assert not [p for p in tmp_path.rglob("*.tmp")], "a temporary file was left behind"
    for path in run.rglob("*.json"):
        json.loads(path.read_text())  # every file that exists is complete
    monkeypatch.setattr(files.os, "fsync", real_fsync)
    code, err = run_cli(["train", "--data", tiny_env, "--out", run, *TRAIN], capsys)
    assert code == 0, err
    assert json.loads((run / "summary.json").read_text())["backbones"][TINY]["status"] == "done"


def test_unwritable_parent_is_named(tiny_env, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the same check runs as 'nobody' in test_bad_inputs")
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        code, err = run_cli(["train", "--data", tiny_env, "--out", parent / "run", *TRAIN], capsys)
    finally:
        parent.chmod(0o700)
    assert code == 2
    assert_one_line(err, str(parent / "run"))


def test_a_folder_where_nothing_was_computed_takes_corrected_options(tiny_env, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # What a start that failed before computing anything leaves behind.
    (run / "config.json").write_text(json.dumps({"commands": {"train": {"options": {"test_fraction": 1.5}}}}))
    code, err = run_cli(["train", "--data", tiny_env, "--out", run, *TRAIN, "--test-fraction", "0.15"], capsys)
    assert code == 0, err


@pytest.fixture()
def exported(trained, capsys):
    code, err = run_cli(["export", trained, "--variants", "fp32", "--no-quant-report", "--workers", "1"], capsys)
    assert code == 0, err
    return trained / TINY / "models" / "fold0.fp32.tflite"


def test_predict_names_a_corrupt_model_file(exported, tmp_path, tiny_env, capsys):
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"\x00" * 64 + os.urandom(256))
    shutil.copy(Path(str(exported) + ".json"), Path(str(broken) + ".json"))
    code, err = run_cli(["predict", broken, tiny_env / "dots"], capsys)
    assert code == 2
    assert_one_line(err, str(broken))


@pytest.mark.parametrize("problem", ["not json", "wrong input size", "no class names"])
def test_predict_names_a_bad_sidecar(exported, tmp_path, tiny_env, capsys, problem):
    """A model exported before models described themselves has only its sidecar to go by."""
    import keras

    from steeldefect.models.conversion import convert

    model = tmp_path / "model.tflite"
    model.write_bytes(convert(keras.models.load_model(exported.parent / "fold0.keras"), "fp32"))
    meta = json.loads(Path(str(exported) + ".json").read_text())
    sidecar = Path(str(model) + ".json")
    if problem == "not json":
        sidecar.write_text("{class_names: [")
    elif problem == "wrong input size":
        sidecar.write_text(json.dumps({**meta, "input": {"height": 64, "width": 64}}))
    else:
        sidecar.write_text(json.dumps({**meta, "class_names": []}))
    code, err = run_cli(["predict", model, tiny_env / "dots"], capsys)
    assert code == 2
    assert_one_line(err, str(sidecar))


def test_a_bad_sidecar_beside_a_self_describing_model_is_only_a_warning(exported, tiny_env, capsys):
    sidecar = Path(str(exported) + ".json")
    sidecar.write_text("{class_names: [")
    with pytest.warns(UserWarning, match=str(sidecar)):
        code, err = run_cli(["predict", exported, tiny_env / "dots"], capsys)
    assert code == 0 and "Traceback" not in err


def test_a_folder_made_before_an_option_existed_resumes_as_if_it_had_the_default(tmp_path):
    """config.json of an older run lacks options added since (augment, fine-tune): they were the
    default then; a different value is still refused."""
    import json

    from steeldefect.core import runfolder
    from steeldefect.core.options import TrainOptions

    run = tmp_path / "old-run"
    run.mkdir()
    options = TrainOptions().record()
    older = {key: value for key, value in options.items() if key != "augment"}
    (run / "config.json").write_text(json.dumps({"commands": {"train": {"options": older}}}))
    (run / "summary.json").write_text("{}")  # something was computed: the recorded options bind
    runfolder.record_config(run, "train", options)  # same options, augment at its default: accepted
    with pytest.raises(ValueError, match=r"augment: 0 -> 4"):
        runfolder.record_config(run, "train", {**options, "augment": 4})
