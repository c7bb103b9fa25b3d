"""`steeldefect compare OLD NEW --data GATE`: the verdict rule on answers whose outcome is known,
then the command end to end on exported models (classes matched by name, unknown classes wrong,
files written, bad models refused in one line)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from steeldefect import cli
from steeldefect.study.compare import Scored, judge_pair, mcnemar_exact
from tiny_tflite import CLASSES, export_tiny_classifier, export_tiny_with_rule

GATE = ("crazing", "inclusion", "patches")


def scored(predicted, classes=GATE) -> Scored:
    return Scored(Path("m.tflite"), "0" * 64, tuple(classes), list(predicted), None)


def gate_truth(per_class: int = 50) -> list[str]:
    return [name for name in GATE for _ in range(per_class)]


def with_errors(truth: list[str], wrong: dict[str, int]) -> list[str]:
    """``truth`` with the first ``wrong[c]`` images of class c answered as another class."""
    answers, seen = list(truth), {name: 0 for name in GATE}
    for i, name in enumerate(truth):
        if seen[name] < wrong.get(name, 0):
            answers[i] = GATE[(GATE.index(name) + 1) % len(GATE)]
        seen[name] += 1
    return answers


def test_mcnemar_exact_matches_the_binomial_by_hand():
    old = np.array([True] * 10 + [False] * 2 + [True] * 30)
    new = np.array([False] * 10 + [True] * 2 + [True] * 30)
    test = mcnemar_exact(old, new)
    assert (test["old_only_correct"], test["new_only_correct"]) == (10, 2)
    # Two-sided exact binomial: 2 x P(X <= 2 | n = 12, 1/2) = 2 x 79 / 4096.
    assert test["p_value"] == pytest.approx(2 * 79 / 4096)
    assert mcnemar_exact(old, old)["p_value"] == 1.0


def test_worse_beyond_noise_keeps_the_old_model():
    truth = gate_truth()
    old = scored(with_errors(truth, {"crazing": 1}))
    new = scored(with_errors(truth, {"crazing": 1, "inclusion": 10}))
    result = judge_pair(truth, old, new, GATE, max_recall_drop=100)  # only the accuracy rule
    assert result["verdict"] == "keep"
    assert result["mcnemar"]["p_value"] < 0.05 and "accuracy lower beyond noise" in result["reasons"][0]


def test_slightly_worse_within_noise_is_promoted():
    truth = gate_truth()
    old = scored(truth)
    new = scored(with_errors(truth, {"patches": 1}))  # one image: p = 1, 2 points of one class
    result = judge_pair(truth, old, new, GATE)
    assert result["verdict"] == "promote" and result["mcnemar"]["p_value"] == 1.0
    assert result["per_class"][2]["change_points"] == pytest.approx(-2.0)


def test_a_class_losing_more_than_two_points_keeps_the_old_model():
    truth = gate_truth()
    old = scored(truth)
    new = scored(with_errors(truth, {"patches": 2}))  # 4 points: not significant overall, but a class drop
    result = judge_pair(truth, old, new, GATE)
    assert result["mcnemar"]["p_value"] > 0.05
    assert result["verdict"] == "keep"
    assert result["reasons"] == ["recall of patches drops 4.0 points (100.0% -> 96.0%), more than 2"]
    assert judge_pair(truth, old, new, GATE, max_recall_drop=5)["verdict"] == "promote"


def test_a_new_kind_counts_wrong_for_the_model_that_does_not_know_it():
    truth = gate_truth(20)
    old = scored([name if name != "patches" else "crazing" for name in truth], classes=("crazing", "inclusion"))
    new = scored(truth)
    result = judge_pair(truth, old, new, GATE)
    assert result["old"]["unknown_gate_classes"] == ["patches"] and result["old"]["recall"]["patches"] == 0.0
    assert result["old"]["accuracy"] == pytest.approx(2 / 3) and result["new"]["accuracy"] == 1.0
    assert result["verdict"] == "promote"
    row = result["per_class"][2]
    assert (row["old_knows"], row["new_knows"], row["change_points"]) == (False, True, 100.0)
    # The other way round a known class is lost entirely: keep.
    assert judge_pair(truth, new, old, GATE)["verdict"] == "keep"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return export_tiny_classifier(folder, seed=1), export_tiny_with_rule(folder, seed=2)


def test_compare_end_to_end_writes_its_files(models, tmp_path, make_neu_dataset, capsys, monkeypatch):
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    plain, ruled = models
    # The gate has a class neither tiny model knows ("pitted_surface"): wrong for both.
    gate = make_neu_dataset(tmp_path / "gate", per_class=5, classes=(*CLASSES[:3], "pitted_surface"), layout="folders")
    out = tmp_path / "cmp"
    code = cli.main(["--quiet", "compare", str(plain), str(ruled), "--data", str(gate), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "compare.json").read_text())
    lines = stdout.strip().splitlines()
    assert lines[-1] == "written: " + f"{out / 'compare.json'}, {out / 'compare.csv'}"
    assert lines[-2].startswith(f"verdict: {result['verdict']} (")
    assert result["gate"]["n_images"] == 20
    assert result["old"]["recall"]["pitted_surface"] == 0.0 == result["new"]["recall"]["pitted_surface"]
    assert result["old"]["uncertain_share"] is None and 0 <= result["new"]["uncertain_share"] <= 1
    correct = {role: round(result[role]["accuracy"] * 20) for role in ("old", "new")}
    assert correct == {role: result[role]["correct"] for role in ("old", "new")}
    with open(out / "compare.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == sorted([*CLASSES[:3], "pitted_surface"])
    assert {row["class"]: row["old_knows"] for row in rows}["pitted_surface"] == "False"

    # A model compared with itself: equal in everything, promoted with p = 1.
    capsys.readouterr()
    assert cli.main(["--quiet", "compare", str(plain), str(plain), "--data", str(gate)]) == 0
    assert "McNemar exact: 0 only OLD right, 0 only NEW right, p = 1" in capsys.readouterr().out


def test_a_bad_model_is_refused_in_one_line(models, tmp_path, make_neu_dataset, capsys):
    plain, _ = models
    gate = make_neu_dataset(tmp_path / "gate", per_class=2, classes=CLASSES[:2], layout="folders")
    broken = tmp_path / "broken.tflite"
    broken.write_bytes(b"not a model")
    broken.with_name("broken.tflite.json").write_text(plain.with_name(plain.name + ".json").read_text())
    for args in ([str(plain), str(tmp_path / "missing.tflite")], [str(broken), str(plain)]):
        code = cli.main(["--quiet", "compare", *args, "--data", str(gate)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    code = cli.main(["--quiet", "compare", str(plain), str(plain), "--data", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert code == 2 and "dataset folder does not exist" in err
