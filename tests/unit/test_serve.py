"""`steeldefect serve` through FastAPI's test client on a small exported model: every endpoint, the
bad inputs of issue #15, the audit log, the token, the limits, and agreement with `predict`."""

from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from serve_helpers import NEU_CLASSES, export_small_classifier, png_declaring  # noqa: E402
from steeldefect import cli  # noqa: E402
from steeldefect.core.files import file_digest as file_sha256  # noqa: E402
from steeldefect.deploy.predict import predict_paths  # noqa: E402
from steeldefect.runtime.litert import ModelFileError  # noqa: E402
from steeldefect.runtime.modelfile import Classifier  # noqa: E402
from steeldefect.serve import service as serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return export_small_classifier(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """One file per kind the service must answer: formats, odd sizes, 16-bit grey, CMYK, grey."""
    from conftest import write_image

    folder = tmp_path_factory.mktemp("images")
    ramp = (np.linspace(0, 65535, 40 * 30).reshape(30, 40)).astype(np.uint16)
    return {
        "jpeg": write_image(folder / "a.jpg", size=(32, 32), seed=1),
        "png_wrong_size": write_image(folder / "b.png", size=(200, 120), seed=2),
        "bmp": write_image(folder / "c.bmp", size=(64, 64), seed=3),
        "tiff": write_image(folder / "d.tif", size=(45, 33), seed=4),
        "grey16": write_image(folder / "e16.png", array=ramp),
        "cmyk": write_image(folder / "f.jpg", size=(48, 48), mode="CMYK", seed=5),
        "grey": write_image(folder / "g.png", size=(20, 20), mode="L", seed=6),
    }


def make_client(model: Path, tmp_path: Path, **options) -> TestClient:
    options.setdefault("audit_path", tmp_path / "audit.sqlite")
    return TestClient(serve.create_app(model, **options))


@pytest.fixture
def client(model, tmp_path):
    with make_client(model, tmp_path) as client:
        yield client


def post_file(client, path: Path, **params):
    return client.post("/v1/predict", files={"file": (path.name, path.read_bytes())}, params=params)


def test_predictions_equal_steeldefect_predict_on_the_same_files(client, model, images):
    """Every format and oddity (wrong size, 16-bit, CMYK) is answered exactly as `predict` answers it."""
    expected = {r.path: r.top for r in predict_paths(model, list(images.values()), top_k=6)}
    for kind, path in images.items():
        response = post_file(client, path, top_k=6)
        assert response.status_code == 200, (kind, response.text)
        body = response.json()
        got = [(entry["class"], entry["probability"]) for entry in body["top_k"]]
        assert [name for name, _ in got] == [name for name, _ in expected[path]], kind
        np.testing.assert_allclose([p for _, p in got], [p for _, p in expected[path]], atol=1e-5)
        assert body["class"] == expected[path][0][0]
        assert body["image"] == {
            "sha256": __import__("hashlib").sha256(path.read_bytes()).hexdigest(),
            "bytes": path.stat().st_size,
        }
        assert body["model"] == {"name": model.name, "variant": "fp32", "sha256": file_sha256(model)}
        assert body["uncertain"] is None and body["confidence"] is None  # the model carries neither
        assert body["server_ms"] > 0


def test_raw_body_is_answered_like_a_multipart_upload(client, images):
    data = images["jpeg"].read_bytes()
    multipart = client.post("/v1/predict", files={"file": ("x.jpg", data, "image/jpeg")}).json()
    for content_type in ("image/jpeg", "application/octet-stream", "image/png"):  # decoded by content
        raw = client.post("/v1/predict", content=data, headers={"Content-Type": content_type})
        assert raw.status_code == 200
        assert raw.json()["top_k"] == multipart["top_k"]
    assert len(multipart["top_k"]) == serve.DEFAULT_TOP_K


@pytest.mark.parametrize(
    ("make_body", "content_type", "status", "words"),
    [
        (lambda jpeg: b"", "image/jpeg", 422, "empty image"),
        (lambda jpeg: jpeg[: len(jpeg) // 2], "image/jpeg", 422, "truncated"),
        (lambda jpeg: b"coil 42, line 3\n" * 20, "application/octet-stream", 422, "not an image"),
        (lambda jpeg: jpeg, "text/plain", 415, "unsupported content type 'text/plain'"),
        (lambda jpeg: jpeg, "application/x-www-form-urlencoded", 415, "unsupported content type"),
        (lambda jpeg: b"\x89PNG\r\n\x1a\n" + b"\0" * 50, "image/png", 422, "corrupt PNG"),
        (lambda jpeg: png_declaring(60000, 60000), "image/png", 413, "the limit is 50,000,000 pixels"),
        (lambda jpeg: png_declaring(8000, 8000), "image/png", 413, "8000x8000 = 64,000,000 pixels"),
    ],
    ids=[
        "empty",
        "truncated-jpeg",
        "text-file",
        "text-content-type",
        "form-urlencoded",
        "corrupt-png",
        "pixel-bomb-60000x60000",
        "over-pixel-limit-8000x8000",
    ],
)
def test_bad_input_gets_a_json_error_naming_it_and_the_service_keeps_serving(
    client, images, make_body, content_type, status, words
):
    jpeg = images["jpeg"].read_bytes()
    response = client.post("/v1/predict", content=make_body(jpeg), headers={"Content-Type": content_type})
    assert response.status_code == status
    body = response.json()
    assert words in body["error"] and "Traceback" not in response.text
    assert client.post("/v1/predict", content=jpeg, headers={"Content-Type": "image/jpeg"}).status_code == 200


def test_a_text_file_uploaded_as_file_part_is_refused_by_name(client):
    response = client.post("/v1/predict", files={"file": ("notes.txt", b"hello", "text/plain")})
    assert response.status_code == 422
    assert response.json()["error"].startswith("notes.txt: not an image")


def test_multipart_without_a_file_part_and_bad_top_k(client, images):
    response = client.post("/v1/predict", data={"client_id": "c1"}, files={"other": ("a.jpg", b"x")})
    assert response.status_code == 422 and "'file'" in response.json()["error"]
    response = post_file(client, images["jpeg"], top_k=7)
    assert response.status_code == 422 and "top_k must be between 1 and 6" in response.json()["error"]
    response = post_file(client, images["jpeg"], top_k="many")
    assert response.status_code == 422 and "top_k" in response.json()["error"]


def test_malformed_multipart_body_is_a_400_naming_it(client, images):
    response = client.post(
        "/v1/predict",
        content=b"--x\r\nnot a part header at all",
        headers={"Content-Type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code in (400, 422)
    assert response.json()["error"].startswith(("malformed multipart body", "multipart body"))
    assert post_file(client, images["jpeg"]).status_code == 200


def test_unknown_route_and_wrong_method_are_json_errors(client):
    response = client.get("/v1/nothing")
    assert response.status_code == 404
    assert response.json() == {"error": "no such endpoint: GET /v1/nothing", "status": 404}
    response = client.get("/v1/predict")
    assert response.status_code == 405 and "not allowed" in response.json()["error"]


def test_uploads_over_the_limit_get_413_declared_or_streamed(model, tmp_path, images):
    limit = 20_000
    with make_client(model, tmp_path, max_upload_bytes=limit) as client:
        big = b"\xff\xd8\xff" + b"\0" * (limit + 1)
        declared = client.post("/v1/predict", content=big, headers={"Content-Type": "image/jpeg"})
        assert declared.status_code == 413 and f"limit is {limit} bytes" in declared.json()["error"]

        def chunks():  # no Content-Length: the limit must hold while the body streams in
            for _ in range(10):
                yield b"\0" * 5_000

        streamed = client.post("/v1/predict", content=chunks(), headers={"Content-Type": "image/jpeg"})
        assert streamed.status_code == 413
        multipart = client.post("/v1/predict", files={"file": ("big.jpg", big)})
        assert multipart.status_code == 413
        assert post_file(client, images["jpeg"]).status_code == 200  # below the limit: answered


def test_fifty_megabyte_upload_is_refused_with_the_default_limit(client):
    response = client.post("/v1/predict", content=b"\0" * (50 * 2**20), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 413


def test_batch_answers_in_order_and_a_bad_image_gets_its_own_error(client, model, images):
    order = [images["jpeg"], images["cmyk"], None, images["grey16"]]
    broken = ("broken.jpg", b"\xff\xd8\xff\xe0junk", "image/jpeg")
    parts = [("file", (p.name, p.read_bytes(), "image/jpeg") if p else broken) for p in order]
    response = client.post("/v1/predict/batch", files=parts, data={"client_id": "coil-9"}, params={"top_k": 2})
    assert response.status_code == 200
    body = response.json()
    assert (body["answered"], body["failed"]) == (3, 1)
    results = body["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert [r["filename"] for r in results] == ["a.jpg", "f.jpg", "broken.jpg", "e16.png"]
    assert results[2]["error"].startswith("broken.jpg: ") and "class" not in results[2]
    expected = predict_paths(model, [p for p in order if p], top_k=2)
    for result, prediction in zip([results[0], results[1], results[3]], expected):
        assert [e["class"] for e in result["top_k"]] == [c for c, _ in prediction.top]
        assert result["client_id"] == "coil-9"
    history = client.get("/v1/history").json()["entries"]
    assert [entry["id"] for entry in history] == [results[i]["audit_id"] for i in (0, 1, 3)]


def test_batch_needs_multipart_with_files(client):
    assert client.post("/v1/predict/batch", content=b"x", headers={"Content-Type": "image/jpeg"}).status_code == 415
    response = client.post("/v1/predict/batch", data={"client_id": "x"}, files={"nope": ("a", b"a")})
    assert response.status_code == 422 and "no file parts" in response.json()["error"]


def test_audit_log_records_every_answer_and_pages_through_them(model, tmp_path, images):
    audit_path = tmp_path / "audit.sqlite"
    with make_client(model, tmp_path, audit_path=audit_path) as client:
        answers = []
        for i, path in enumerate(images.values()):
            headers = {"X-Client-Id": f"coil-{i}"}
            answers.append(
                client.post("/v1/predict", files={"file": (path.name, path.read_bytes())}, headers=headers).json()
            )
        form_id = client.post(
            "/v1/predict",
            files={"file": ("a.jpg", images["jpeg"].read_bytes())},
            data={"client_id": "from-form"},
            headers={"X-Client-Id": "from-header"},
        ).json()
        assert form_id["client_id"] == "from-form"
        assert client.post("/v1/predict", content=b"", headers={"Content-Type": "image/jpeg"}).status_code == 422

        pages, after = [], 0
        while True:
            page = client.get("/v1/history", params={"after": after, "limit": 3}).json()
            pages.append(page["entries"])
            if page["next_after"] is None:
                break
            after = page["next_after"]
        entries = [entry for page in pages for entry in page]
        assert [len(page) for page in pages] == [3, 3, 2]  # 8 answers; the refused empty body is not one
        assert [e["id"] for e in entries] == [a["audit_id"] for a in answers + [form_id]]
        first, path = entries[0], images["jpeg"]
        assert first["client_id"] == "coil-0" and entries[-1]["client_id"] == "from-form"
        assert first["image_bytes"] == path.stat().st_size and first["image_sha256"] == answers[0]["image"]["sha256"]
        assert first["model_sha256"] == file_sha256(model) and first["latency_ms"] > 0
        assert first["class"] == answers[0]["class"] and first["top_k"] == answers[0]["top_k"]
        assert first["time"].endswith("Z") and first["uncertain"] is None

        assert client.get("/v1/history", params={"since": "2999-01-01T00:00:00Z"}).json()["entries"] == []
        since = client.get("/v1/history", params={"since": entries[4]["time"]}).json()["entries"]
        assert [e["id"] for e in since] == [e["id"] for e in entries[4:]]
        assert client.get("/v1/history", params={"since": "yesterday"}).status_code == 422
        assert client.get("/v1/history", params={"limit": 0}).status_code == 422
        for after in (-1, 10**20):
            response = client.get("/v1/history", params={"after": after})
            assert response.status_code == 422 and "after must be an audit id" in response.json()["error"]
    # The answered rows are in the file itself, readable by any SQLite tool after the server is gone.
    with sqlite3.connect(audit_path) as db:
        assert db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 8
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_audit_log_path_with_spaces_and_uri_characters(model, tmp_path, images):
    audit_path = tmp_path / "line 3 #2?" / "audit log.sqlite"
    with make_client(model, tmp_path, audit_path=audit_path) as client:
        audit_id = post_file(client, images["jpeg"]).json()["audit_id"]
        assert [e["id"] for e in client.get("/v1/history").json()["entries"]] == [audit_id]
    assert audit_path.is_file()


def test_audit_retention_keeps_only_the_newest_rows(model, tmp_path, images):
    with make_client(model, tmp_path, audit_keep=3) as client:
        ids = [post_file(client, images["jpeg"]).json()["audit_id"] for _ in range(7)]
        kept = [e["id"] for e in client.get("/v1/history").json()["entries"]]
    assert kept == ids[-3:]


def test_no_audit_means_no_history_and_no_file(model, tmp_path, images):
    with make_client(model, tmp_path, audit_path=None) as client:
        body = post_file(client, images["jpeg"]).json()
        assert "audit_id" not in body
        response = client.get("/v1/history")
        assert response.status_code == 404 and "--no-audit" in response.json()["error"]
    assert list(tmp_path.iterdir()) == []


def test_an_answer_is_committed_before_it_is_sent(model, tmp_path, images):
    """Read the SQLite file from outside right after each answer: the row is already there."""
    audit_path = tmp_path / "audit.sqlite"
    with make_client(model, tmp_path, audit_path=audit_path) as client:
        for _ in range(5):
            audit_id = post_file(client, images["png_wrong_size"]).json()["audit_id"]
            with sqlite3.connect(audit_path) as db:
                assert db.execute("SELECT id FROM predictions WHERE id = ?", (audit_id,)).fetchone() == (audit_id,)


def test_an_unwritable_audit_log_refuses_to_answer_and_readyz_says_so(model, tmp_path, images):
    with make_client(model, tmp_path) as client:
        audit = client.app.state.audit
        audit._db.execute("PRAGMA query_only=ON")  # what a full or read-only disk looks like to the writer
        response = post_file(client, images["jpeg"])
        assert response.status_code == 503 and "audit log write failed" in response.json()["error"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["problems"] == ["audit log not writable"]
        audit._db.execute("PRAGMA query_only=OFF")
        assert post_file(client, images["jpeg"]).status_code == 200
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("path", ["/v1/model", "/v1/history", "/metrics", "/openapi.json"])
def test_token_guards_every_endpoint_but_health_and_the_page(model, tmp_path, path):
    with make_client(model, tmp_path, token="s3cret") as client:
        missing = client.get(path)
        assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
        assert "missing bearer token" in missing.json()["error"]
        wrong = client.get(path, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "wrong bearer token" in wrong.json()["error"]
        assert client.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for open_path in ("/healthz", "/readyz", "/", "/inspector.js"):
            assert client.get(open_path).status_code == 200


def test_token_guards_predictions_before_reading_the_upload(model, tmp_path, images):
    with make_client(model, tmp_path, token="s3cret", max_upload_bytes=10) as client:
        # 401 rather than 413: an unauthenticated client learns nothing about the limits
        assert post_file(client, images["jpeg"]).status_code == 401
    with make_client(model, tmp_path, token="s3cret") as client:
        assert post_file(client, images["jpeg"]).status_code == 401
        ok = client.post(
            "/v1/predict",
            files={"file": ("a.jpg", images["jpeg"].read_bytes())},
            headers={"Authorization": "Bearer s3cret"},
        )
        assert ok.status_code == 200
        assert client.get("/v1/history", headers={"Authorization": "Bearer s3cret"}).json()["entries"]


def test_without_a_token_everything_is_open(client):
    for path in ("/v1/model", "/v1/history", "/metrics", "/healthz", "/readyz", "/"):
        assert client.get(path).status_code == 200, path


def test_model_health_readiness_and_page(client, model):
    description = client.get("/v1/model").json()
    assert description["class_names"] == NEU_CLASSES
    assert description["input_size"] == {"height": 32, "width": 32}
    assert description["sha256"] == file_sha256(model) and description["variant"] == "fp32"
    assert description["provenance"]["backbone"] == "small-test"
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] is True and ready["workers"] == serve.default_workers()
    page = client.get("/")
    assert page.headers["content-type"].startswith("text/html") and 'src="inspector.js"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing loaded from elsewhere
    script = client.get("/inspector.js")
    assert script.headers["content-type"].startswith("text/javascript") and "v1/predict" in script.text
    assert client.get("/inspector.css").status_code == 200


def test_metrics_count_requests_by_status_latency_and_classes(client, images):
    classes = [post_file(client, path).json()["class"] for path in images.values()]
    client.post("/v1/predict", content=b"", headers={"Content-Type": "image/jpeg"})
    client.get("/v1/missing")
    text = client.get("/metrics").text
    assert f'steeldefect_requests_total{{endpoint="/v1/predict",status="200"}} {len(classes)}.0' in text
    assert 'steeldefect_requests_total{endpoint="/v1/predict",status="422"} 1.0' in text
    assert 'steeldefect_requests_total{endpoint="other",status="404"} 1.0' in text
    assert f'steeldefect_request_seconds_count{{endpoint="/v1/predict"}} {len(classes) + 1}.0' in text
    for name in NEU_CLASSES:
        assert f'steeldefect_predictions_total{{class="{name}"}} {float(classes.count(name))}' in text


def test_a_full_queue_is_answered_503_at_once_and_starts_no_work(model, tmp_path, images, monkeypatch):
    with make_client(model, tmp_path, workers=1, queue_size=0) as client:
        slow_started = threading.Event()
        calls = []
        original = Classifier.judge

        def slow(self, batch):
            calls.append(len(batch))
            slow_started.set()
            time.sleep(1.0)
            return original(self, batch)

        monkeypatch.setattr(Classifier, "judge", slow)
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(response=post_file(client, images["jpeg"])))
        worker.start()
        assert slow_started.wait(10)
        started = time.perf_counter()
        busy = post_file(client, images["jpeg"])
        assert busy.status_code == 503 and busy.headers["Retry-After"] == "1" and "busy" in busy.json()["error"]
        assert time.perf_counter() - started < 0.9  # refused at once, not after waiting for the slow one
        batch = client.post("/v1/predict/batch", files=[("file", ("a.jpg", images["jpeg"].read_bytes()))] * 3)
        assert batch.status_code == 503
        worker.join()
        assert first["response"].status_code == 200
        assert calls == [1]  # only the admitted request ran an inference: the refused ones started none
        assert post_file(client, images["jpeg"]).status_code == 200  # and the service serves on


def test_uncertainty_and_calibration_are_read_from_the_model_file(tmp_path, images):
    from tiny_tflite import export_tiny_with_rule

    model = export_tiny_with_rule(tmp_path, accept=0.5, temperature=2.0)
    image = Image.open(io.BytesIO(images["jpeg"].read_bytes())).convert("RGB").resize((32, 32), Image.BILINEAR)
    expected = Classifier(model).judge(np.asarray(image)[None])
    with make_client(model, tmp_path) as client:
        body = post_file(client, images["jpeg"], top_k=4).json()
        described = client.get("/v1/model").json()
    assert described["calibrated"] is True and described["uncertainty"] is True
    p = np.array([entry["probability"] for entry in body["top_k"]])
    softened = np.exp(np.log(np.clip(p, 1e-12, None)) / 2.0)
    assert body["confidence"] == pytest.approx(softened.max() / softened.sum(), abs=1e-4)
    assert body["uncertain"] is bool(expected.uncertain[0])


def test_uncertain_flag_follows_the_models_rule_and_accept(tmp_path, images):
    from tiny_tflite import export_tiny_with_rule

    model = export_tiny_with_rule(tmp_path, accept=0.99)
    flags = {}
    for accept in (None, 1e-6):  # the model's own rule (accepts 99%), and one that accepts almost nothing
        app = serve.create_app(model, workers=1, audit_path=None, accept=accept)
        with TestClient(app) as client:
            flags[accept] = post_file(client, images["jpeg"]).json()["uncertain"]
    assert flags[1e-6] is True
    assert isinstance(flags[None], bool)


def test_the_int8_exports_quantization_calibration_is_not_a_probability_calibration(tmp_path, images):
    model = export_small_classifier(tmp_path, extra_meta={"calibration": {"samples": 200, "split": "train"}})
    with make_client(model, tmp_path) as client:
        body = post_file(client, images["jpeg"]).json()
    assert body["confidence"] is None and body["uncertain"] is None


def test_bad_trust_metadata_stops_the_service_at_start(tmp_path):
    model = export_small_classifier(tmp_path, extra_meta={"confidence": {"temperature": "high"}})
    with pytest.raises(ModelFileError, match=r"small.fp32.tflite.json: confidence.temperature must be a number"):
        serve.create_app(model, audit_path=None)


def test_missing_or_corrupt_model_stops_serve_with_one_line(tmp_path, capsys, model):
    assert cli.main(["serve", str(tmp_path / "gone.tflite")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'gone.tflite'}: model file not found"
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"not a flatbuffer at all")
    Path(str(corrupt) + ".json").write_text(Path(str(model) + ".json").read_text())
    assert cli.main(["serve", str(corrupt), "--no-audit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {corrupt}: not a LiteRT model (no TFL3 identifier)") and "\n" not in err
    assert cli.main(["serve", str(tmp_path)]) == 2  # a folder that is no run folder
    err = capsys.readouterr().err.strip()
    assert "no deployable model" in err and "\n" not in err


def test_run_folder_serves_its_deployable_model(tmp_path, model):
    from steeldefect.core.runfolder import deploy_model_path

    run = tmp_path / "run"
    deployed = deploy_model_path(run, "int8")
    deployed.parent.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"commands": {}}))  # what makes a folder a run folder
    deployed.write_bytes(model.read_bytes())
    meta = json.loads(Path(str(model) + ".json").read_text())
    Path(str(deployed) + ".json").write_text(json.dumps(meta))
    assert serve.resolve_model(run) == deployed
    with TestClient(serve.create_app(run, audit_path=None)) as client:
        assert client.get("/v1/model").json()["name"] == "model.int8.tflite"


def test_missing_extra_is_one_line(monkeypatch, capsys, model):
    import sys

    monkeypatch.setitem(sys.modules, "fastapi", None)  # what `import fastapi` sees without the extra
    assert cli.main(["serve", str(model)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {serve.EXTRA_HINT} (fastapi is not installed)"


def test_client_id_is_checked(client, images):
    response = client.post(
        "/v1/predict", files={"file": ("a.jpg", images["jpeg"].read_bytes())}, headers={"X-Client-Id": "x" * 200}
    )
    assert response.status_code == 422 and "client id" in response.json()["error"]


def test_errors_never_leak_a_traceback(client, monkeypatch, images):
    def broken(self, batch):
        raise RuntimeError("interpreter exploded at /secret/path")

    monkeypatch.setattr(Classifier, "judge", broken)
    with TestClient(client.app, raise_server_exceptions=False) as raw:
        response = post_file(raw, images["jpeg"])
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (logged on the server)", "status": 500}


def test_an_upload_over_a_mebibyte_is_kept_in_memory_not_spooled_to_disk(client, monkeypatch):
    """Starlette spools big multipart parts to a temporary file; the service writes only its audit log."""
    import tempfile

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was spooled to a temporary file")

    frame = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1000, 1000, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    frame.save(buffer, format="PNG")
    assert 2**20 < len(buffer.getvalue()) < serve.DEFAULT_MAX_UPLOAD_BYTES
    monkeypatch.setattr(tempfile, "TemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "NamedTemporaryFile", no_disk)
    monkeypatch.setattr(tempfile, "mkstemp", no_disk)
    response = client.post("/v1/predict", files={"file": ("frame.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200


def test_big_decoded_image_is_resized_not_refused(client, tmp_path):
    """A full-resolution camera frame (under the upload limit) is resized to the model's input."""
    frame = Image.fromarray(np.random.default_rng(0).integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    frame.save(buffer, format="JPEG", quality=80)
    response = client.post("/v1/predict", content=buffer.getvalue(), headers={"Content-Type": "image/jpeg"})
    assert response.status_code == 200
