"""Archive scoring on real NEU-DET JPEGs (../shared/data/NEU-DET): both engines give today's
`predict` answers, error rows for a missing and a corrupt file, and a resumable output. Skipped when
the images are absent; the pooled-head Lite0 case uses the ``pooled_neu_run`` fixture (a small run
trained for the session, or ``$STEELDEFECT_POOLED_RUN``)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from steeldefect.deploy import batch, batch_io, batch_ray
from steeldefect.deploy.predict import predict_paths
from tiny_tflite import export_tiny_classifier

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NEU_CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")


@pytest.fixture(scope="module")
def manifest(neu_dir, tmp_path_factory):
    """A .csv manifest of 36 NEU JPEGs (6 per class, relative to the manifest's folder), with a
    missing file and a corrupt JPEG (a real one cut in half) listed among them."""
    folder = tmp_path_factory.mktemp("archive")
    images = neu_dir / "IMAGES" if (neu_dir / "IMAGES").is_dir() else neu_dir
    chosen = [images / f"{name}_{i}.jpg" for name in NEU_CLASSES for i in range(1, 7)]
    corrupt = folder / "cut.jpg"
    data = chosen[0].read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    entries = [os.path.relpath(p, folder) for p in chosen]
    entries[10:10] = ["missing/crazing_999.jpg"]
    entries[25:25] = ["cut.jpg"]
    path = folder / "archive.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["camera", "path"])
        writer.writerows([3, entry] for entry in entries)
    return path


@pytest.fixture(scope="module", params=["tiny", "pooled-lite0-int8"])
def model(request, tmp_path_factory):
    if request.param == "tiny":
        return export_tiny_classifier(tmp_path_factory.mktemp("model"), "int8", size=224)
    from steeldefect.core.runfolder import deployable_model

    return deployable_model(request.getfixturevalue("pooled_neu_run"), "int8")


def _check_against_today(rows: list[dict], model: Path, manifest: Path) -> None:
    listing = batch_io.collect_inputs([manifest])
    today = {str(p.path): p for p in predict_paths(model, listing, top_k=3)}
    assert sorted(row["path"] for row in rows) == sorted(map(str, listing))
    errors = {row["path"]: row["error"] for row in rows if row["error"]}
    assert sorted(Path(p).name for p in errors) == ["crazing_999.jpg", "cut.jpg"]
    assert "cannot read file" in errors[str(manifest.parent / "missing/crazing_999.jpg")]
    assert "truncated image data" in errors[str(manifest.parent / "cut.jpg")]
    for row in rows:
        expected = today[row["path"]]
        assert row["error"] == expected.error
        if not expected.error:
            assert list(zip(row["top_classes"], row["top_probabilities"])) == expected.top


def test_local_engine_matches_todays_predict(model, manifest, tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "r.parquet"
    result = batch.score_archive(model, [manifest], out, top_k=3, batch_size=8)
    assert (result.listed, result.failed) == (38, 2)
    _check_against_today(pq.read_table(out).to_pylist(), model, manifest)


def test_ray_engine_matches_todays_predict(model, manifest, tmp_path):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    import pyarrow.parquet as pq

    out = tmp_path / "r.parquet"
    result = batch_ray.score_archive_ray(model, [manifest], out, top_k=3, actors=2, batch_size=8, num_cpus=2)
    assert (result.listed, result.failed, result.details["cluster_cpus"]) == (38, 2, 2)
    _check_against_today(pq.read_table(out).to_pylist(), model, manifest)
