"""Scoring an image archive (steeldefect.deploy.batch): inputs, the local and Ray engines, the output file,
resume, on a tiny exported model and generated images."""

from __future__ import annotations

import collections
import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from steeldefect import cli
from steeldefect.deploy import batch, batch_io, batch_ray
from steeldefect.deploy.predict import format_predictions, predict_paths
from tiny_tflite import export_tiny_classifier

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return {"fp32": export_tiny_classifier(folder, "fp32"), "int8": export_tiny_classifier(folder, "int8")}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """20 small images (JPEG and PNG), plus a missing and a corrupt file listed between them."""
    from conftest import write_image

    folder = tmp_path_factory.mktemp("images")
    paths = [write_image(folder / f"img{i:02d}{'.jpg' if i % 2 else '.png'}", size=(40, 36), seed=i) for i in range(20)]
    corrupt = folder / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 40)  # a JPEG header, then nothing decodable
    return {"good": paths, "missing": folder / "missing.jpg", "corrupt": corrupt, "folder": folder}


def _table(out: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(out).to_pylist()


def _listing(images) -> list[Path]:
    good = images["good"]
    return [*good[:7], images["missing"], *good[7:14], images["corrupt"], *good[14:]]


def test_manifests_resolve_relative_entries_against_their_folder(tmp_path, images):
    good = images["good"]
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "a.txt").write_text(f"# camera 3\n\n{os.path.relpath(good[0], sub)}\n{good[1]}\n")
    with (sub / "b.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["line", "path"])
        writer.writerow(["3", os.path.relpath(good[2], sub)])
        writer.writerow(["4", str(good[3])])
    found = batch_io.collect_inputs([sub / "a.txt", good[4], sub / "b.csv"])
    assert [p.resolve() for p in found] == [good[0], good[1], good[4], good[2], good[3]]


def test_csv_manifest_without_path_column_is_one_line_error(tmp_path, models, capsys):
    manifest = tmp_path / "list.csv"
    manifest.write_text("file,line\na.jpg,1\n")
    code = cli.main(["--quiet", "predict", str(models["fp32"]), str(manifest), "--out", str(tmp_path / "r.parquet")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"error: {manifest}: manifest has no `path` column (columns: file, line)"
    assert not (tmp_path / "r.parquet").exists() and not (tmp_path / "r.parquet.parts").exists()


def test_local_engine_gives_todays_predictions_and_error_rows(tmp_path, models, images):
    listing = _listing(images)
    reference = predict_paths(models["int8"], listing, top_k=3)
    out = tmp_path / "r.parquet"
    result = batch.score_archive(models["int8"], listing, out, top_k=3, workers=2, threads=1, batch_size=4)
    rows = _table(out)
    assert (result.listed, result.scored, result.failed) == (22, 22, 2)
    assert [row["path"] for row in rows] == [str(p) for p in listing]  # streamed in input order
    for row, ref in zip(rows, reference):
        if ref.error:
            assert row["error"] == ref.error and row["class"] is None and row["top_classes"] is None
        else:
            assert row["error"] is None
            assert list(zip(row["top_classes"], row["top_probabilities"])) == ref.top  # exact floats
            assert (row["class"], row["probability"]) == ref.top[0]
    assert "missing.jpg" in rows[7]["error"] and "corrupt" in rows[15]["error"]
    assert len({row["model_sha256"] for row in rows}) == 1
    assert not batch_io.parts_dir(out).exists()


def test_parquet_schema_is_the_documented_one(tmp_path, models, images):
    import pyarrow.parquet as pq

    out = tmp_path / "r.parquet"
    batch.score_archive(models["fp32"], images["good"][:3], out, workers=1)
    schema = pq.read_schema(out)
    assert schema.names == list(batch_io.PARQUET_COLUMNS)
    assert schema.remove_metadata().equals(batch_io.parquet_schema())
    manual = (REPO / "docs" / "predict.md").read_text()  # the manual's page on predicting and archives
    section = manual.split("## Scoring an image archive", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_0-9]+)` \| `([^`]+)` \|", section, re.MULTILINE)
    assert [name for name, _ in documented] == list(batch_io.PARQUET_COLUMNS)
    assert [kind for _, kind in documented] == [str(schema.field(name).type) for name in batch_io.PARQUET_COLUMNS]


def test_csv_and_jsonl_outputs_are_todays_formats_plus_new_fields(tmp_path, models, images):
    listing = _listing(images)
    reference = predict_paths(models["fp32"], listing, top_k=2)
    sha = batch.read_model_info(models["fp32"]).sha256
    batch.score_archive(models["fp32"], listing, tmp_path / "r.csv", top_k=2, batch_size=5, workers=1)
    rows = list(csv.reader(io.StringIO((tmp_path / "r.csv").read_text())))
    today = list(csv.reader(io.StringIO(format_predictions(reference, "csv"))))
    assert rows[0] == today[0] + ["model_sha256"]
    assert [row[:6] for row in rows] == today
    assert all(row[6] == sha for row in rows[1:])
    batch.score_archive(models["fp32"], listing, tmp_path / "r.jsonl", top_k=2, batch_size=5, workers=1)
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    for record, expected in zip(records, json.loads(format_predictions(reference, "json")), strict=True):
        assert {key: record[key] for key in expected} == expected
        assert record["model_sha256"] == sha and record["uncertain"] is None
        top = expected["predictions"][0] if expected["predictions"] else {"class": None, "probability": None}
        assert (record["class"], record["probability"]) == (top["class"], top["probability"])


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_rerun_skips_what_the_output_holds_and_appends_the_rest(tmp_path, models, images, suffix):
    good = images["good"]
    out = tmp_path / f"r{suffix}"
    first = batch.score_archive(models["fp32"], good[:8], out, batch_size=3, workers=1)
    again = batch.score_archive(models["fp32"], good[:8], out, batch_size=3, workers=1)
    assert (first.scored, again.skipped, again.scored) == (8, 8, 0)
    more = batch.score_archive(models["fp32"], good, out, batch_size=3, workers=1)
    assert (more.skipped, more.scored) == (8, 12)
    once = tmp_path / f"once{suffix}"
    batch.score_archive(models["fp32"], good, once, batch_size=7, workers=1)
    assert out.read_bytes() == once.read_bytes() if suffix != ".parquet" else _table(out) == _table(once)


def test_an_image_listed_three_times_is_scored_three_times_and_resumed_by_count(tmp_path, models, images):
    image = images["good"][0]
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{image}\n{image}\n")
    out = tmp_path / "r.parquet"
    batch.score_archive(models["fp32"], [manifest], out, workers=1)
    manifest.write_text(f"{image}\n{image}\n{image}\n")
    result = batch.score_archive(models["fp32"], [manifest], out, workers=1)
    assert (result.skipped, result.scored) == (2, 1)
    assert [row["path"] for row in _table(out)] == [str(image)] * 3


def test_an_output_of_another_model_is_refused_and_left_untouched(tmp_path, models, images):
    out = tmp_path / "r.parquet"
    batch.score_archive(models["fp32"], images["good"][:4], out, workers=1)
    before = out.read_bytes()
    with pytest.raises(batch_io.OutputError, match=r"r\.parquet: holds results of another model"):
        batch.score_archive(models["int8"], images["good"], out, workers=1)
    assert out.read_bytes() == before and not batch_io.parts_dir(out).exists()


def test_uncertain_column_follows_the_rule_inside_the_model(tmp_path, images, capsys):
    from steeldefect.data.decode import read_image
    from steeldefect.runtime.modelfile import Classifier
    from tiny_tflite import export_tiny_with_rule

    flagged = export_tiny_with_rule(tmp_path, accept=0.5)
    expected = Classifier(flagged).judge(np.stack([read_image(p, (32, 32)) for p in images["good"]])).uncertain
    assert 0 < expected.sum() < len(expected)  # both answers occur, so the comparison means something
    batch.score_archive(flagged, images["good"], tmp_path / "r.parquet", workers=1)
    assert [row["uncertain"] for row in _table(tmp_path / "r.parquet")] == expected.tolist()
    # predict's table: the flagged images say so, and the summary counts them
    assert cli.main(["--quiet", "predict", str(flagged), *map(str, images["good"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [("UNCERTAIN" in line) for line in lines[:-1]] == expected.tolist()
    assert f", {int(expected.sum())} uncertain;" in lines[-1]
    # --accept 1.0 accepts everything an in-distribution image could score
    assert (
        cli.main(["--quiet", "predict", str(flagged), *map(str, images["good"]), "--accept", "1", "--format", "csv"])
        == 0
    )
    rows = capsys.readouterr().out.strip().splitlines()[1:]
    assert sum(row.split(",")[4] == "true" for row in rows) <= expected.sum()


def test_predict_without_out_prints_exactly_todays_output(models, images, capsys):
    listing = _listing(images)
    for fmt in ("table", "csv", "json"):
        code = cli.main(
            [
                "--quiet",
                "predict",
                str(models["int8"]),
                *map(str, listing),
                "--top-k",
                "2",
                "--format",
                fmt,
                "--workers",
                "2",
            ]
        )
        assert code == 1  # two images failed, as today
        assert capsys.readouterr().out.rstrip("\n") == format_predictions(
            predict_paths(models["int8"], listing, top_k=2), fmt
        )


def test_cli_out_reports_and_exits_1_when_an_image_failed(tmp_path, models, images, capsys):
    out = tmp_path / "r.jsonl"
    assert cli.main(["--quiet", "predict", str(models["fp32"]), str(images["folder"]), "--out", str(out)]) == 1
    # the folder holds the 20 images and the corrupt one (the missing one is only listed elsewhere)
    assert "21 images listed, 0 already done, 21 scored" in capsys.readouterr().out
    assert (
        cli.main(
            [
                "--quiet",
                "predict",
                str(models["fp32"]),
                *map(str, images["good"]),
                "--out",
                str(tmp_path / "ok.parquet"),
            ]
        )
        == 0
    )


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
        except OSError:
            continue
    return found


def test_resume_after_sigkill_has_no_duplicates_and_no_gaps(tmp_path, models, images):
    manifest = tmp_path / "archive.txt"
    listing = [str(p) for p in images["good"]] * 150  # 3,000 entries
    manifest.write_text("\n".join(listing) + "\n")
    out = tmp_path / "r.parquet"
    command = [
        sys.executable,
        "-m",
        "steeldefect",
        "--quiet",
        "predict",
        str(models["fp32"]),
        str(manifest),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--workers",
        "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(batch_io.parts_dir(out).glob("part-*.parquet"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.002)
    workers = _children(process.pid)
    process.send_signal(signal.SIGKILL)
    assert process.wait(30) == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert workers and not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived its parent"
    committed = batch_io.read_output_state(out, batch.read_model_info(models["fp32"]).sha256).done
    assert 5 * 16 <= sum(committed.values()) < len(listing), "killed before the end with parts committed"
    assert not out.exists()  # never a half-written output
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    assert f"{sum(committed.values())} already done" in finished.stdout
    paths = [row["path"] for row in _table(out)]
    assert collections.Counter(paths) == collections.Counter(listing)


def test_ray_engine_runs_locally_on_two_cpus_without_dashboard_and_matches(tmp_path, models, images):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    listing = _listing(images)
    reference = {str(p.path): p for p in predict_paths(models["int8"], listing, top_k=2)}
    out = tmp_path / "r.parquet"
    result = batch_ray.score_archive_ray(models["int8"], listing, out, top_k=2, actors=2, batch_size=4, num_cpus=2)
    assert result.details["cluster_cpus"] == 2 and result.details["dashboard_url"] is None
    assert result.details["address"] == "local"
    rows = _table(out)
    assert sorted(row["path"] for row in rows) == sorted(map(str, listing))  # each image exactly once
    for row in rows:
        expected = reference[row["path"]]
        assert row["error"] == expected.error
        if not expected.error:
            assert list(zip(row["top_classes"], row["top_probabilities"])) == expected.top
    assert result.failed == 2 and not batch_io.parts_dir(out).exists()


def test_ray_engine_needs_a_parquet_out(tmp_path, models, images):
    with pytest.raises(ValueError, match="--engine ray writes Parquet"):
        batch_ray.score_archive_ray(models["fp32"], images["good"], tmp_path / "r.csv")


def _descendants_named(prefix: str) -> list[int]:
    """Processes under this test process whose command line starts with ``prefix`` (Ray's actors)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                continue
    found = []
    for pid in parents:
        ancestor = parents.get(pid)
        while ancestor and ancestor != os.getpid():
            ancestor = parents.get(ancestor)
        if ancestor == os.getpid():
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(prefix.encode()):
                    found.append(pid)
            except OSError:
                continue
    return found


def test_ray_actor_killed_mid_job_is_replaced_and_every_image_is_scored_once(tmp_path, models):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    import threading

    from conftest import write_image

    # Large PNGs so that the job runs long enough to kill an actor while it works.
    big = [write_image(tmp_path / f"big{i}.png", size=(900, 900), seed=i) for i in range(8)]
    listing = [str(p) for p in big] * 40
    manifest = tmp_path / "archive.txt"
    manifest.write_text("\n".join(listing) + "\n")
    out = tmp_path / "r.parquet"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome: dict = {}
        job = threading.Thread(
            target=lambda: outcome.update(
                result=batch_ray.score_archive_ray(models["fp32"], [manifest], out, actors=2, batch_size=8)
            )
        )
        job.start()
        killed = None
        deadline = time.monotonic() + 120
        while killed is None and job.is_alive() and time.monotonic() < deadline:
            actors = _descendants_named("ray::MapWorker")
            if len(actors) == 2 and any(batch_io.parts_dir(out).glob("part-*.parquet")):
                killed = actors[0]
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        job.join(300)
    finally:
        ray.shutdown()
    assert killed is not None, "the job ended before an actor could be killed"
    result = outcome["result"]
    assert result.failed == 0 and result.scored == len(listing)
    assert collections.Counter(row["path"] for row in _table(out)) == collections.Counter(listing)


def test_an_interrupted_ray_run_keeps_its_committed_batches_and_resumes(tmp_path, models, images, monkeypatch):
    ray = pytest.importorskip("ray", reason="the ray extra is not installed")
    listing = _listing(images)
    out = tmp_path / "r.parquet"
    real_tqdm = batch_ray.tqdm

    class Interrupted(Exception):
        """The run stops here, as on a crash of the driver. (Not KeyboardInterrupt: raised inside Ray
        Data's iteration, that one can make Ray end the whole pytest process, seen once in CI.)"""

    class InterruptedAfterTwoBatches(real_tqdm):
        committed = 0

        def update(self, n=1):
            super().update(n)
            InterruptedAfterTwoBatches.committed += n
            if self.committed >= 8:  # two batches of 4 committed
                raise Interrupted

    monkeypatch.setattr(batch_ray, "tqdm", InterruptedAfterTwoBatches)
    context = ray.data.DataContext.get_current()
    poll_interval = context.memory_usage_poll_interval_s
    # One local Ray for both runs (as on a cluster): shutting Ray down under a dataset that is being
    # torn down and starting it again at once in the same process made the raylet end the whole
    # test process now and then (exit status 1, no message).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with pytest.raises(Interrupted):
            batch_ray.score_archive_ray(models["int8"], listing, out, top_k=2, actors=2, batch_size=4)
        monkeypatch.undo()
        assert context.memory_usage_poll_interval_s == poll_interval  # the caller's Ray Data settings are back
        assert not out.exists() and len(list(batch_io.parts_dir(out).glob("part-*.parquet"))) == 2
        result = batch_ray.score_archive_ray(models["int8"], listing, out, top_k=2, actors=2, batch_size=4)
    finally:
        ray.shutdown()
    assert (result.skipped, result.scored, result.failed) == (8, len(listing) - 8, 2)
    rows = _table(out)
    assert sorted(row["path"] for row in rows) == sorted(map(str, listing))  # no duplicates, no gaps
    reference = {str(p.path): p for p in predict_paths(models["int8"], listing, top_k=2)}
    for row in rows:
        assert list(zip(row["top_classes"] or [], row["top_probabilities"] or [])) == reference[row["path"]].top
    assert not batch_io.parts_dir(out).exists()


def test_a_damaged_part_is_dropped_and_its_images_scored_again(tmp_path, models, images):
    out = tmp_path / "r.parquet"
    batch_io.parts_dir(out).mkdir()
    (batch_io.parts_dir(out) / "part-000000.parquet").write_bytes(b"PAR1 cut short")  # no footer
    result = batch.score_archive(models["fp32"], images["good"][:5], out, workers=1)
    assert (result.skipped, result.scored) == (0, 5)
    assert [row["path"] for row in _table(out)] == [str(p) for p in images["good"][:5]]


def test_a_kill_during_the_final_merge_is_finished_by_the_next_run(tmp_path, models, images, monkeypatch):
    out = tmp_path / "r.parquet"
    batch.score_archive(models["fp32"], images["good"][:5], out, workers=1)

    # Stop the next run right after its merge is marked complete, before it replaces FILE.
    def killed_after_commit_mark(out):
        if (batch_io.parts_dir(out) / "COMMIT").is_file():
            raise KeyboardInterrupt
        return False

    monkeypatch.setattr(batch_io, "recover_commit", killed_after_commit_mark)
    with pytest.raises(KeyboardInterrupt):
        batch.score_archive(models["fp32"], images["good"][:9], out, workers=1)
    monkeypatch.undo()
    assert len(_table(out)) == 5 and (batch_io.parts_dir(out) / "COMMIT").is_file()
    result = batch.score_archive(models["fp32"], images["good"][:9], out, workers=1)
    assert (result.skipped, result.scored) == (9, 0)
    assert [row["path"] for row in _table(out)] == [str(p) for p in images["good"][:9]]
    assert not batch_io.parts_dir(out).exists()


def test_bad_numbers_are_refused_before_anything_is_written(tmp_path, models, images, capsys):
    out = tmp_path / "r.parquet"
    with pytest.raises(SystemExit) as exit_info:  # refused by the option's check, at parse time
        cli.main(
            ["--quiet", "predict", str(models["fp32"]), str(images["good"][0]), "--out", str(out), "--batch-size", "0"]
        )
    assert exit_info.value.code == 2
    assert "argument --batch-size: must be an integer >= 1, got 0" in capsys.readouterr().err
    assert not out.exists() and not batch_io.parts_dir(out).exists()


def test_engine_ray_without_ray_installed_says_how_to_install_it(tmp_path, models, images, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    out = tmp_path / "r.parquet"
    code = cli.main(
        ["--quiet", "predict", str(models["fp32"]), str(images["good"][0]), "--out", str(out), "--engine", "ray"]
    )
    assert code == 2
    assert capsys.readouterr().err.strip() == "error: --engine ray needs Ray: pip install 'steeldefect[ray]'"
    assert not out.exists()
