"""The service side of the line's learning loop (issue #26) through FastAPI's test client: the review
store and its decisions, the hot model swap and rollback, the drift monitor's endpoint, gauges and log
lines, and the drift reference `export` writes into the deploy model."""

from __future__ import annotations

import errno
import io
import logging
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from steeldefect.runtime.modelfile import read_model_info  # noqa: E402
from steeldefect.serve import review as review_module  # noqa: E402
from steeldefect.serve import service as serve  # noqa: E402
from steeldefect.serve import swap as swap_module  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOKEN = "line-7"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two models of the same input size with their description and rule inside (uploadable), one of
    another size, one with a sidecar only."""
    from tiny_tflite import export_tiny_classifier, export_tiny_with_rule

    def made(name, function, **kwargs):
        return function(tmp_path_factory.mktemp(name), **kwargs)

    return {
        "first": made("first", export_tiny_with_rule, seed=1, accept=0.5),
        "second": made("second", export_tiny_with_rule, seed=2, accept=0.5),
        "other_size": made("size", export_tiny_with_rule, seed=3, size=48),
        "sidecar_only": made("plain", export_tiny_classifier, seed=4),
    }


def strips(n: int, seed: int = 0) -> list[bytes]:
    """``n`` distinct small PNG images."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def make_client(model: Path, tmp_path: Path, **options) -> TestClient:
    options.setdefault("audit_path", tmp_path / "audit.sqlite")
    options.setdefault("workers", 1)
    return TestClient(serve.create_app(model, **options))


def predict(client, data: bytes, **headers):
    return client.post("/v1/predict", content=data, headers={"Content-Type": "image/png", **headers})


def test_export_writes_the_drift_reference_into_the_deploy_model(models):
    meta = read_model_info(models["first"]).metadata
    assert meta["training_class_mix"] == {name: 0.25 for name in ("crazing", "inclusion", "patches", "scratches")}
    # accept=0.5: about half of the out-of-fold training images are above the threshold
    assert 0.4 <= meta["expected_uncertain_rate"] <= 0.6


def test_uncertain_answers_are_kept_by_sha256_and_the_audit_row_links_them(models, tmp_path):
    store = tmp_path / "review"
    images = strips(12)
    with make_client(models["first"], tmp_path, review_dir=store, review_sample=0.0) as client:
        answers = [predict(client, data, **{"X-Client-Id": f"coil-{i}"}).json() for i, data in enumerate(images)]
        predict(client, images[0])  # the same image again: stored once
        queue = client.get("/v1/review/queue").json()
        first = next(a for a in answers if a["uncertain"])
        served = client.get(f"/v1/review/image/{first['image']['sha256']}")
        bad = client.get("/v1/review/image/..%2Faudit.sqlite")
        missing = client.get(f"/v1/review/image/{'0' * 64}")
    uncertain = [a for a in answers if a["uncertain"]]
    assert 0 < len(uncertain) < len(answers)  # accept=0.5: both kinds of answer
    kept = sorted(p.name for p in store.iterdir())
    assert kept == sorted(f"{a['image']['sha256']}.png" for a in uncertain)
    assert all(a["review"] is None for a in answers if not a["uncertain"])
    assert served.status_code == 200 and served.content == images[answers.index(first)]
    assert served.headers["content-type"] == "image/png"
    assert bad.status_code in (404, 422) and "error" in bad.json()
    assert missing.status_code == 404 and missing.json()["error"].startswith(f"image {'0' * 64} is not in the review")
    entries = queue["entries"]
    assert [e["sha256"] for e in entries] == [a["image"]["sha256"] for a in uncertain]
    assert entries[0]["client_id"] == first["client_id"] and entries[0]["answer"]["class"] == first["class"]
    assert entries[0]["audit_id"] == first["audit_id"] and entries[0]["reason"] == "uncertain"
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        links = dict(db.execute("SELECT id, review_file FROM predictions"))
        (store_dir,) = db.execute("SELECT value FROM review_meta WHERE key = 'store_dir'").fetchone()
    assert store_dir == str(store.resolve())
    assert links[first["audit_id"]] == f"{first['image']['sha256']}.png"
    assert sum(value is not None for value in links.values()) == len(uncertain) + bool(answers[0]["uncertain"])


def test_the_sample_of_confident_answers_is_seeded(models, tmp_path):
    images = strips(40, seed=5)
    kept = []
    for run in range(2):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        with make_client(models["first"], folder, review_dir=folder / "review", review_sample=0.5) as client:
            answers = [predict(client, data).json() for data in images]
        kept.append(sorted(p.name for p in (folder / "review").iterdir()))
        reasons = {a["review"]["reason"] for a in answers if a["review"]}
        assert reasons == {"uncertain", "sample"}
    assert kept[0] == kept[1]


def test_decisions_confirm_correct_or_name_a_new_kind_and_are_idempotent(models, tmp_path):
    with make_client(models["first"], tmp_path, review_dir=tmp_path / "review", review_sample=1.0) as client:
        answers = [predict(client, data).json() for data in strips(3, seed=7)]
        a, b, c = (answer["image"]["sha256"] for answer in answers)
        confirm = {"reviewer": "ana", "decided_class": answers[0]["class"], "idempotency_key": "k1"}
        first = client.post(f"/v1/review/{a}", json=confirm)
        again = client.post(f"/v1/review/{a}", json=confirm)  # a retried request: still one row
        unknown = client.post(f"/v1/review/{b}", json={"reviewer": "ana", "decided_class": "oil_stain"})
        new_kind = client.post(
            f"/v1/review/{b}", json={"reviewer": "ana", "decided_class": "oil_stain", "new_kind": True, "note": "shiny"}
        )
        other = next(n for n in ("crazing", "inclusion") if n != answers[2]["class"])
        later = [
            client.post(f"/v1/review/{c}", json={"reviewer": who, "decided_class": name})
            for who, name in (("ana", answers[2]["class"]), ("ben", other))
        ]
        reused = client.post(f"/v1/review/{b}", json=confirm)
        pending = client.get("/v1/review/queue").json()["entries"]
        decided = {e["sha256"]: e for e in client.get("/v1/review/queue?status=decided").json()["entries"]}
        bad_json = client.post(f"/v1/review/{a}", content=b"{not json", headers={"Content-Type": "application/json"})
        bad_sha = client.post("/v1/review/ABC", json=confirm)
    assert first.status_code == 200 and first.json()["repeated"] is False
    assert again.status_code == 200 and again.json()["repeated"] is True and again.json()["id"] == first.json()["id"]
    assert unknown.status_code == 422
    assert set(unknown.json()) == {"error", "status"} and "send new_kind: true" in unknown.json()["error"]
    assert new_kind.status_code == 200 and new_kind.json()["new_kind"] is True
    assert all(r.status_code == 200 for r in later)
    assert reused.status_code == 409 and "already used for another image" in reused.json()["error"]
    assert pending == []
    assert decided[c]["decision"]["reviewer"] == "ben" and decided[c]["decision"]["decided_class"] == other
    assert decided[c]["decisions"] == 2  # the later one wins, both are kept
    assert decided[b]["decision"] == {**decided[b]["decision"], "decided_class": "oil_stain", "new_kind": True}
    assert bad_json.status_code == 422 and bad_sha.status_code == 422
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        rows = db.execute(
            "SELECT image_sha256, reviewer, decided_class, new_kind, model_class FROM review_decisions ORDER BY id"
        ).fetchall()
    assert rows == [
        (a, "ana", answers[0]["class"], 0, answers[0]["class"]),
        (b, "ana", "oil_stain", 1, answers[1]["class"]),
        (c, "ana", answers[2]["class"], 0, answers[2]["class"]),
        (c, "ben", other, 0, answers[2]["class"]),
    ]


def test_the_size_cap_evicts_the_oldest_unreviewed_image_and_a_review_of_it_is_gone(models, tmp_path):
    images = strips(4, seed=9)
    cap = sum(len(d) for d in images[:2]) + 100  # room for two of these images
    with make_client(
        models["first"], tmp_path, review_dir=tmp_path / "review", review_sample=1.0, review_max_bytes=cap
    ) as client:
        shas = []
        for i, data in enumerate(images):
            shas.append(predict(client, data).json()["image"]["sha256"])
            if i == 0:  # reviewed: never evicted
                assert client.post(
                    f"/v1/review/{shas[0]}", json={"reviewer": "ana", "decided_class": "patches"}
                ).is_success
        gone = client.post(f"/v1/review/{shas[1]}", json={"reviewer": "ana", "decided_class": "patches"})
        gone_image = client.get(f"/v1/review/image/{shas[1]}")
    kept = sorted(p.name.split(".")[0] for p in (tmp_path / "review").iterdir())
    assert kept == sorted([shas[0], shas[3]])  # 1 then 2 were evicted, oldest first
    assert gone.status_code == 410 and "no longer in the review store" in gone.json()["error"]
    assert gone_image.status_code == 410


def test_a_full_disk_never_fails_a_prediction(models, tmp_path, monkeypatch, caplog):
    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(review_module, "atomic_write_bytes", full)
    with make_client(models["first"], tmp_path, review_dir=tmp_path / "review", review_sample=1.0) as client:
        with caplog.at_level(logging.WARNING):
            response = predict(client, strips(1)[0])
        queue = client.get("/v1/review/queue").json()
    assert response.status_code == 200 and response.json()["review"] is None and "audit_id" in response.json()
    assert queue["entries"] == []
    assert any("cannot keep image" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records)


def test_review_needs_the_audit_log(models, tmp_path):
    with pytest.raises(serve.ServeError, match="--review needs the audit log"):
        serve.create_app(models["first"], audit_path=None, review_dir=tmp_path / "review")


def upload(client, path: Path, **kwargs):
    return client.post("/v1/model", files={"file": (path.name, path.read_bytes())}, headers=AUTH, **kwargs)


def test_hot_swap_serves_the_uploaded_model_and_rollback_returns(models, tmp_path):
    first, second = (read_model_info(models[k]) for k in ("first", "second"))
    image = strips(1)[0]
    with make_client(models["first"], tmp_path, token=TOKEN, models_dir=tmp_path / "models") as client:
        before = predict(client, image, **AUTH).json()
        swapped = upload(client, models["second"])
        after = predict(client, image, **AUTH).json()
        described = client.get("/v1/model", headers=AUTH).json()
        back = client.post("/v1/model/rollback", headers=AUTH)
        last = predict(client, image, **AUTH).json()
        metrics = client.get("/metrics", headers=AUTH).text
    assert swapped.status_code == 200 and swapped.json()["serving"]["sha256"] == second.sha256
    assert [before["model"]["sha256"], after["model"]["sha256"], last["model"]["sha256"]] == [
        first.sha256,
        second.sha256,
        first.sha256,
    ]
    assert described["sha256"] == second.sha256 and described["previous"]["sha256"] == first.sha256
    assert back.status_code == 200 and back.json()["previous"]["sha256"] == second.sha256
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [f"{second.sha256}.tflite"]
    assert f'sha256="{first.sha256}",variant="fp32"}} 1.0' in metrics
    assert f'sha256="{second.sha256}",variant="fp32"}} 0.0' in metrics
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        named = [row[0] for row in db.execute("SELECT model_sha256 FROM predictions ORDER BY id")]
    assert named == [first.sha256, second.sha256, first.sha256]


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("garbage", 422, "not a TFLite model file"),
        ("truncated", 422, "model refused"),
        ("other_size", 422, "input size 48x48 differs from the served model's 32x32"),
        ("sidecar_only", 422, "no metadata inside the model file"),
        ("full_disk", 507, "the disk is full"),
    ],
)
def test_a_model_that_fails_its_check_is_refused_in_one_line_and_the_old_one_serves_on(
    models, tmp_path, monkeypatch, case, status, message
):
    first = read_model_info(models["first"])
    data = {
        "garbage": b"\x00" * 64,
        "truncated": models["second"].read_bytes()[:2000],
        "other_size": models["other_size"].read_bytes(),
        "sidecar_only": models["sidecar_only"].read_bytes(),
        "full_disk": models["second"].read_bytes(),
    }[case]
    if case == "full_disk":

        def full(path, content):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        monkeypatch.setattr(swap_module, "atomic_write_bytes", full)
    with make_client(models["first"], tmp_path, token=TOKEN, models_dir=tmp_path / "models") as client:
        refused = client.post("/v1/model", content=data, headers={**AUTH, "Content-Type": "application/octet-stream"})
        still = predict(client, strips(1)[0], **AUTH).json()
    assert refused.status_code == status, refused.text
    body = refused.json()
    assert set(body) == {"error", "status"} and message in body["error"] and "\n" not in body["error"]
    assert "still serving" in body["error"] or case == "garbage"
    assert still["model"]["sha256"] == first.sha256
    assert not any((tmp_path / "models").glob("*.tflite")) if (tmp_path / "models").exists() else True


def test_model_upload_needs_a_token_and_rollback_needs_a_previous_model(models, tmp_path):
    with make_client(models["first"], tmp_path, models_dir=tmp_path / "models") as client:
        assert upload(client, models["second"]).status_code == 403
    with make_client(models["first"], tmp_path, token=TOKEN, models_dir=tmp_path / "models") as client:
        assert (
            client.post("/v1/model", content=b"x", headers={"Content-Type": "application/octet-stream"}).status_code
            == 401
        )
        rollback = client.post("/v1/model/rollback", headers=AUTH)
    assert rollback.status_code == 409 and rollback.json()["error"] == "no previous model to roll back to"


def test_a_request_in_flight_during_a_swap_finishes_on_the_old_model(models, tmp_path, monkeypatch):
    first, second = (read_model_info(models[k]) for k in ("first", "second"))
    started, release = threading.Event(), threading.Event()
    original = serve.ClassifierPool.judge

    def held(self, image):
        if self.held:  # only the first model's pool waits: its request stays in flight during the swap
            started.set()
            assert release.wait(30)
        return original(self, image)

    monkeypatch.setattr(serve.ClassifierPool, "judge", held)
    monkeypatch.setattr(serve.ClassifierPool, "held", True, raising=False)
    with make_client(models["first"], tmp_path, token=TOKEN, models_dir=tmp_path / "models", workers=2) as client:
        result = {}
        thread = threading.Thread(target=lambda: result.setdefault("r", predict(client, strips(1)[0], **AUTH)))
        thread.start()
        assert started.wait(30)
        monkeypatch.setattr(serve.ClassifierPool, "held", False, raising=False)  # the new pool answers at once
        assert upload(client, models["second"]).status_code == 200
        during = predict(client, strips(1, seed=3)[0], **AUTH).json()
        release.set()
        thread.join(30)
    assert during["model"]["sha256"] == second.sha256
    assert result["r"].status_code == 200 and result["r"].json()["model"]["sha256"] == first.sha256
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        rows = dict(db.execute("SELECT id, model_sha256 FROM predictions"))
    assert rows[result["r"].json()["audit_id"]] == first.sha256 and rows[during["audit_id"]] == second.sha256


def test_drift_alarm_starts_on_a_skewed_stream_and_shows_in_the_endpoint_gauges_and_log(models, tmp_path, caplog):
    same = strips(1, seed=11)[0]  # one image over and over: one class, where training had four evenly
    with make_client(models["first"], tmp_path, drift_window=100) as client:
        quiet = client.get("/v1/drift").json()
        with caplog.at_level(logging.WARNING, logger="steeldefect.serve.drift"):
            for _ in range(100):
                predict(client, same)
        status = client.get("/v1/drift").json()
        metrics = client.get("/metrics").text
    assert quiet["alarm"] is False and quiet["images"] == 0 and quiet["window"] == 100
    assert status["alarm"] is True and status["images"] == 100 and status["class_mix"]["p_value"] < 1e-6
    assert max(status["class_share"].values()) == 1.0
    assert status["training_class_mix"] == {n: 0.25 for n in ("crazing", "inclusion", "patches", "scratches")}
    assert "steeldefect_drift_alarm 1.0" in metrics and "steeldefect_drift_class_mix_psi" in metrics
    started = [r.getMessage() for r in caplog.records if r.getMessage().startswith("drift alarm")]
    assert len(started) == 1 and started[0].startswith("drift alarm: started after 100 answers")
