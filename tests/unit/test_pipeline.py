"""End to end on a tiny generated dataset with the tiny backbone: train -> export -> evaluate ->
report, resumption after an interruption, and 'all' skipping backbones whose weights are missing."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest

from steeldefect import cli
from steeldefect.core.files import read_json
from steeldefect.deploy import export as export_stage
from steeldefect.models import training
from steeldefect.study import pipeline
from tiny import TINY, make_dataset, register_tiny_backbone

FAST = dict(learning_rates=[0.01, 0.001], epochs=4, batch_size=8, n_folds=2, image_size=32, progress=False)


@pytest.fixture()
def tiny_env(tmp_path, monkeypatch):
    register_tiny_backbone(monkeypatch, tmp_path / "keras")
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    return make_dataset(tmp_path / "data")


def test_reproduce_end_to_end_skips_missing_weights(tiny_env, tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = pipeline.reproduce(tiny_env, run, backbones=["all"], runs=3, warmup=1, calibration_samples=12, **FAST)
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert len(skipped) == 3 and all("steeldefect weights install" in message for message in skipped)
    for name in ("mobilenet", "efficientnetb0", "vgg16"):
        assert summary["backbones"][name]["status"] == pipeline.NOT_RUN_WEIGHTS_MISSING
    entry = summary["backbones"][TINY]
    assert entry["status"] == "done"
    assert set(entry["variants"]) == {"keras", "fp32", "fp16", "int8", "int8-mixed"}
    for variant in ("fp32", "fp16", "int8"):
        stats = entry["variants"][variant]
        assert stats["n_models"] == 2
        assert stats["size_mib"]["mean"] > 0 and stats["latency_ms_median"]["mean"] > 0
    # The patterns are easy: a frozen random conv net + head must beat chance (33%) clearly.
    assert entry["variants"]["keras"]["accuracy"]["mean"] > 60
    assert abs(entry["variants"]["fp32"]["accuracy"]["mean"] - entry["variants"]["keras"]["accuracy"]["mean"]) < 1e-6
    report = (run / "report.md").read_text()
    assert "not run: weights missing" in report
    assert (run / "splits.csv").is_file() and (run / "calibration.csv").is_file()
    assert (run / TINY / "quant_debug.csv").is_file() and (run / TINY / "quant_debug.png").is_file()
    config = read_json(run / "config.json")
    assert config["commands"]["train"]["options"]["seed"] == 42

    # One model to deploy: the head refitted on all training images, exported like the folds,
    # evaluated once on the test split, and what `predict RUN` uses.
    deploy = read_json(run / "deploy" / "deploy.json")
    assert deploy["backbone"] == TINY and deploy["learning_rate"] == entry["best_learning_rate"]
    for variant in ("keras", "fp32", "fp16", "int8", "int8-mixed"):
        assert (run / "deploy" / deploy["models"][variant].split("/")[-1]).is_file()
        assert deploy["test"][variant]["accuracy"] > 60
    assert summary["deploy"]["models"]["int8"] == "deploy/model.int8.tflite"
    assert read_json(run / "deploy" / "model.int8.tflite.json")["fold"] == "final"
    from steeldefect.deploy.predict import predict_paths

    via_run = predict_paths(run, [tiny_env / "dots"], top_k=1)
    via_file = predict_paths(run / "deploy" / "model.int8.tflite", [tiny_env / "dots"], top_k=1)
    assert [r.top for r in via_run] == [r.top for r in via_file] and len(via_run) == 12
    # Which code produced the numbers: this checkout's commit (tests run from a git clone).
    source = config["commands"]["train"]["environment"]["source"]
    assert source == "unknown" or len(source.split("+")[0]) == 40

    # Evaluating again with another thread count measures again instead of reusing old timings.
    again = pipeline.evaluate(run, threads=1, warmup=1, runs=2, progress=False)
    assert again["backbones"][TINY]["variants"]["int8"]["threads"] == 1
    assert read_json(run / TINY / "models" / "fold0.int8.tflite.eval.json")["threads"] == 1

    # A variant exported again on its own (here after its file was lost) is rebuilt and evaluated;
    # the recorded variants stay the union, since re-exporting one changes no other number.
    lost = run / TINY / "models" / "fold0.int8-mixed.tflite"
    lost.unlink()
    pipeline.export(run, variants=["int8-mixed"], calibration_samples=12, quant_report=False, progress=False)
    assert lost.is_file()
    variants = read_json(run / "config.json")["commands"]["export"]["options"]["variants"]
    assert variants == ["fp32", "fp16", "int8", "int8-mixed"]
    mixed = pipeline.evaluate(run, threads=1, warmup=1, runs=2, progress=False)["backbones"][TINY]["variants"][
        "int8-mixed"
    ]
    assert mixed["n_models"] == 2 and mixed["accuracy"]["mean"] > 60
    from steeldefect.study.report import write_report

    assert "| int8-mixed |" in write_report(run).read_text()


def test_train_resumes_after_interruption_with_same_numbers(tiny_env, tmp_path, monkeypatch):
    reference = pipeline.train(tiny_env, tmp_path / "uninterrupted", backbones=[TINY], **FAST)

    real_fit = training.fit_head
    calls = {"n": 0}

    def flaky_fit(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C in the third grid cell
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit_head", flaky_fit)
    run = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        pipeline.train(tiny_env, run, backbones=[TINY], **FAST)
    finished = sorted(p.parent.name + "/" + p.parent.parent.name for p in run.glob(f"{TINY}/grid/*/*/metrics.json"))
    assert len(finished) == 2

    trained_again = {"n": 0}

    def counting_fit(*args, **kwargs):
        trained_again["n"] += 1
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(training, "fit_head", counting_fit)
    resumed = pipeline.train(tiny_env, run, backbones=[TINY], **FAST)
    assert trained_again["n"] == 3  # the two unfinished cells of 2 rates x 2 folds, then the final head
    ours, theirs = resumed["backbones"][TINY], reference["backbones"][TINY]
    assert ours["best_learning_rate"] == theirs["best_learning_rate"]
    assert ours["variants"]["keras"] == theirs["variants"]["keras"]


def test_rerun_with_other_options_is_refused(tiny_env, tmp_path):
    run = tmp_path / "run"
    pipeline.train(tiny_env, run, backbones=[TINY], **FAST)
    with pytest.raises(ValueError, match="other options"):
        pipeline.train(tiny_env, run, backbones=[TINY], **{**FAST, "epochs": 5})


def test_named_backbone_with_missing_weights_is_an_error(tiny_env, tmp_path, capsys):
    code = cli.main(
        ["--quiet", "train", "--data", str(tiny_env), "--backbone", "mobilenet", "--out", str(tmp_path / "r")]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "mobilenet_1_0_224_tf_no_top.h5" in err and "steeldefect weights install" in err
    assert not (tmp_path / "r" / "summary.json").exists()


def test_cli_train_then_predict(tiny_env, tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(
        [
            "--quiet",
            "train",
            "--data",
            str(tiny_env),
            "--backbone",
            TINY,
            "--out",
            str(run),
            "--folds",
            "2",
            "--learning-rates",
            "0.01",
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--image-size",
            "32",
        ]
    )
    assert code == 0
    assert json.loads((run / "summary.json").read_text())["backbones"][TINY]["best_learning_rate"] == 0.01
    model = run / TINY / "models" / "fold0.keras"
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    capsys.readouterr()
    code = cli.main(
        ["--quiet", "predict", str(model), str(tiny_env / "dots"), str(tmp_path / "bad.jpg"), "--top-k", "2"]
    )
    out = capsys.readouterr().out.splitlines()
    assert code == 1  # one file failed
    assert any("bad.jpg: ERROR" in line for line in out)
    assert out[-1].startswith("summary: 12 classified, 1 failed")
    assert sum(", " in line and "dots" in line.split(":")[1] for line in out[:-1]) >= 1
    grid = np.genfromtxt(run / TINY / "cv_grid.csv", delimiter=",", names=True)
    assert len(grid) == 2


def test_summary_numbers_unchanged_by_the_restructure(tmp_path, monkeypatch):
    """Every accuracy, precision, recall, CV figure and model size of a tiny reproduce run equals what
    the code before the structure change (commit 997ae84) wrote for the same data, options and seed.

    Sizes are compared without the metadata that issue #14 later embeds in every model file (export
    runs in-process here so the embedding can be switched off; the parallel export writes the same
    bytes, see bench/export_speed.py)."""
    golden = json.loads((Path(__file__).parents[1] / "fixtures" / "golden_tiny_summary.json").read_text())[TINY]
    register_tiny_backbone(monkeypatch, tmp_path / "keras")
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data", per_class=16, seed=3)
    keras.backend.clear_session()  # as the golden run: layer names (and so file sizes) from a fresh session
    monkeypatch.setattr(export_stage, "embed_metadata", lambda flatbuffer, meta, extra_files=None: flatbuffer)
    summary = pipeline.reproduce(
        data,
        tmp_path / "run",
        backbones=[TINY],
        runs=2,
        warmup=1,
        calibration_samples=12,
        workers=1,
        **{**FAST, "learning_rates": [0.01, 0.001]},
    )
    entry = summary["backbones"][TINY]
    assert entry["best_learning_rate"] == golden["best_learning_rate"]
    assert entry["cv"] == golden["cv"]
    assert set(entry["variants"]) == set(golden["variants"])
    for variant, expected in golden["variants"].items():
        assert {key: entry["variants"][variant][key] for key in expected} == expected, variant


def test_deploy_links_leave_no_temporary_file_behind_and_follow_a_new_model(tmp_path):
    """`deploy/` is relinked by every export and evaluate: re-linking the same model must not leave
    `.model.*.tmp` names (rename between two links to one file is a no-op), and a new model replaces
    the old one."""
    source = tmp_path / "models" / "final.int8.tflite"
    source.parent.mkdir()
    source.write_bytes(b"first")
    target = tmp_path / "deploy" / "model.int8.tflite"
    for _ in range(2):
        pipeline._link_or_copy(source, target)
    assert target.read_bytes() == b"first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.int8.tflite"]
    replacement = tmp_path / "models" / "final.int8.tflite.new"
    replacement.write_bytes(b"second")
    replacement.replace(source)  # a re-export writes a new file under the same name
    pipeline._link_or_copy(source, target)
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.int8.tflite"]
