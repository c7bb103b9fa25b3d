"""`steeldefect serve` on a plant network (issue #29): pixel bombs, forged log lines, path disclosure,
per-app multipart limits, TLS and the exposure checks, and history reads under a bound of their own.

The bad-request table follows tests/unit/test_serve.py: for every row the status, exactly one JSON
error ``{"error", "status"}`` holding the row's words, nothing of the server leaked (no traceback, no
server path), every log line of the service one printable line, and the service answering afterwards.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
from fastapi.testclient import TestClient  # noqa: E402

from serve_helpers import export_small_classifier, png_declaring  # noqa: E402
from steeldefect import cli  # noqa: E402
from steeldefect.core.options import ServeOptions  # noqa: E402
from steeldefect.data.decode import DEFAULT_MAX_PIXELS  # noqa: E402
from steeldefect.deploy.predict import predict_paths  # noqa: E402
from steeldefect.serve import runner, service  # noqa: E402
from steeldefect.serve.audit import AuditLog  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

SERVICE_LOGGERS = ("steeldefect.serve.service", "steeldefect.serve.audit")
# A filename a client can send raw in a multipart header (a bare LF passes python-multipart; a CR
# does not): a forged second log line, a screen clear and colour (ESC and the C1 CSI), a bidi override.
FORGED = "coil\n2026-12-02 08:00:00 INFO all good\x1b[2J\x1b[31mred\x9b1m\u202eevil.jpg"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return export_small_classifier(tmp_path_factory.mktemp("model"))


def jpeg_bytes(size: int = 32, seed: int = 1) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bytes(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_multipart(parts: list[tuple[str, bytes]]) -> dict:
    """``client.post`` arguments for a multipart body with each filename written raw into its header
    (HTTP clients percent-encode a newline in a filename; an attacker's client does not)."""
    body = b""
    for filename, data in parts:
        body += b'--xx\r\nContent-Disposition: form-data; name="file"; filename="' + filename.encode() + b'"\r\n'
        body += b"Content-Type: image/jpeg\r\n\r\n" + data + b"\r\n"
    return {"content": body + b"--xx--\r\n", "headers": {"Content-Type": "multipart/form-data; boundary=xx"}}


def service_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name in SERVICE_LOGGERS]


def assert_one_printable_line_each(lines: list[str]) -> None:
    for line in lines:
        assert line.isprintable(), f"a log line holds a control character: {line!r}"


def break_audit(client: TestClient) -> None:
    client.app.state.audit._db.execute("PRAGMA query_only=ON")  # what a full or read-only disk looks like


@dataclass(frozen=True)
class Case:
    id: str
    send: Callable[[TestClient], object]  # the bad request
    status: int
    words: str  # in the JSON error
    options: dict = field(default_factory=dict)  # create_app options for this row
    before: Callable[[TestClient], None] | None = None
    after: Callable[[TestClient], None] | None = None  # undo `before` so the service can answer again
    logged: str | None = None  # in the service's log line for the request


CASES = [
    Case(
        "pixel-bomb-raw-body",
        lambda c: c.post("/v1/predict", content=png_declaring(60000, 60000), headers={"Content-Type": "image/png"}),
        413,
        "body: image too large to decode: 3,600,000,000 pixels, the limit is 50,000,000 pixels (--max-pixels)",
    ),
    Case(
        "pixel-bomb-multipart",
        lambda c: c.post("/v1/predict", files={"file": ("frame.png", png_declaring(8000, 8000), "image/png")}),
        413,
        "frame.png: image too large to decode: 8000x8000 = 64,000,000 pixels, the limit is 50,000,000",
    ),
    Case(
        "pixel-limit-option",
        lambda c: c.post("/v1/predict", content=png_bytes(200, 120), headers={"Content-Type": "image/png"}),
        413,
        "200x120 = 24,000 pixels, the limit is 10,000 pixels (--max-pixels)",
        options={"max_pixels": 10_000},
    ),
    Case(
        "log-injection-filename",
        lambda c: c.post("/v1/predict", **raw_multipart([(FORGED, b"coil 42, line 3")])),
        422,
        "not an image",
        logged="coil\\n2026-12-02 08:00:00 INFO all good\\x1b[2J\\x1b[31mred\\x9b1m\\u202eevil.jpg: not an image",
    ),
    Case(
        "log-injection-path",
        lambda c: c.get("/v1/%1B%5B31mfake%07"),  # ESC [31m ... BEL, percent-decoded into the path
        404,
        "no such endpoint",
        logged="GET /v1/\\x1b[31mfake\\x07 from",
    ),
    Case(
        "audit-write-fails",
        lambda c: c.post("/v1/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"}),
        503,
        "audit log write failed; the prediction was not answered because it could not be recorded",
        before=break_audit,
        after=lambda c: c.app.state.audit._db.execute("PRAGMA query_only=OFF"),
        logged="audit.sqlite: audit log write failed",  # the path: in the log, not in the answer
    ),
    Case(
        "multipart-too-many-fields",
        lambda c: c.post("/v1/predict", data={f"field{i}": "x" for i in range(40)}, files={"file": ("a.jpg", b"x")}),
        400,
        "multipart body: Too many fields",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_request_gets_one_json_error_leaks_nothing_and_the_service_keeps_serving(model, tmp_path, caplog, case):
    caplog.set_level(logging.INFO)
    options = {"audit_path": tmp_path / "audit.sqlite", "workers": 1, **case.options}
    with TestClient(service.create_app(model, **options)) as client:
        if case.before:
            case.before(client)
        caplog.clear()
        response = case.send(client)
        assert response.status_code == case.status, response.text
        body = response.json()
        assert set(body) == {"error", "status"} and body["status"] == case.status
        assert case.words in body["error"]
        for leak in ("Traceback", str(tmp_path), os.sep + "work" + os.sep, "site-packages"):
            assert leak not in response.text
        lines = service_lines(caplog)
        assert lines and lines[-1].startswith(f"{case.status} "), lines
        assert_one_printable_line_each(lines)
        if case.logged:
            assert any(case.logged in line for line in lines), lines
        if case.after:
            case.after(client)
        ok = client.post("/v1/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
        assert ok.status_code == 200


def test_table_ids_are_unique():
    assert len({case.id for case in CASES}) == len(CASES)


# 1. Pixel bombs ------------------------------------------------------------------------------------------


def test_a_pixel_bomb_in_a_batch_gets_its_own_413_entry_and_is_never_decoded(model, tmp_path, caplog, monkeypatch):
    """Checked from the header: the canvas is refused before Pillow allocates or decodes any pixel."""
    from PIL import ImageFile

    loaded: list[tuple[int, int]] = []
    original_load = ImageFile.ImageFile.load

    def recording_load(self):
        loaded.append(self.size)
        return original_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    caplog.set_level(logging.INFO)
    good = jpeg_bytes()
    parts = [
        ("file", ("good-1.jpg", good, "image/jpeg")),
        ("file", ("bomb.png", png_declaring(60000, 60000), "image/png")),
        ("file", ("big.png", png_declaring(8000, 8000), "image/png")),
        ("file", ("good-2.jpg", good, "image/jpeg")),
    ]
    with TestClient(service.create_app(model, audit_path=None, workers=1)) as client:
        loaded.clear()  # the warm-up decodes
        response = client.post("/v1/predict/batch", files=parts)
        assert response.status_code == 200
        body = response.json()
        assert (body["answered"], body["failed"]) == (2, 2)
        results = body["results"]
        assert results[1]["error"] == (
            "bomb.png: image too large to decode: 3,600,000,000 pixels, the limit is 50,000,000 pixels (--max-pixels)"
        )
        assert results[2]["error"].startswith("big.png: image too large to decode: 8000x8000 = 64,000,000 pixels")
        assert "class" in results[0] and "class" in results[3]
        assert all(width * height <= 32 * 32 for width, height in loaded), loaded  # only the two good images
        assert client.get("/v1/model").json()["max_pixels"] == DEFAULT_MAX_PIXELS
    assert_one_printable_line_each(service_lines(caplog))


def test_predict_shares_the_decoders_pixel_limit(model, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_declaring(60000, 60000))
    fine = tmp_path / "fine.jpg"
    fine.write_bytes(jpeg_bytes())
    results = {r.path.name: r for r in predict_paths(model, [bomb, fine])}
    assert results["bomb.png"].error == (
        f"{bomb}: image too large to decode: 3,600,000,000 pixels, the limit is 50,000,000 pixels"
    )
    assert results["fine.jpg"].error is None


def test_the_serve_option_default_is_the_decoders():
    assert ServeOptions().max_pixels == DEFAULT_MAX_PIXELS


# 2. Log injection ----------------------------------------------------------------------------------------


def test_a_forged_filename_in_a_batch_stays_on_one_escaped_log_line(model, caplog):
    """Through a real handler and formatter, as the command's stderr shows it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("steeldefect.serve.service")
    logger.addHandler(handler)
    try:
        with TestClient(service.create_app(model, audit_path=None, workers=1)) as client:
            request = raw_multipart([(FORGED, b"not an image"), ("ok.jpg", jpeg_bytes())])
            response = client.post("/v1/predict/batch", **request)
            assert response.status_code == 200 and response.json()["failed"] == 1
            assert response.json()["results"][0]["filename"] == FORGED  # the client gets its own name back
            request["headers"]["X-Client-Id"] = "line\x1b[31m3"
            response = client.post("/v1/predict/batch", **request)
            assert response.status_code == 422 and "client id" in response.json()["error"]
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text and "\x9b" not in text and "\u202e" not in text
    lines = text.splitlines()
    assert not any(line.startswith("2026-12-02") for line in lines)  # no forged line of its own
    forged = [line for line in lines if "evil.jpg" in line]
    assert len(forged) == 1 and forged[0].startswith("WARNING 422 POST /v1/predict/batch: coil\\n2026-12-02")


def test_a_long_client_string_is_cut_in_the_log(model, caplog):
    caplog.set_level(logging.INFO)
    with TestClient(service.create_app(model, audit_path=None, workers=1)) as client:
        assert client.get("/v1/" + "x" * 6000).status_code == 404
    (line,) = [line for line in service_lines(caplog) if "xxxx" in line]
    assert len(line) < 2100 and line.endswith("more characters)")


# 4. Multipart limits per app ----------------------------------------------------------------------------


def test_two_apps_with_different_upload_limits_do_not_change_each_other_or_starlette(model, monkeypatch):
    from starlette.applications import Starlette
    from starlette.formparsers import MultiPartParser
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    before = MultiPartParser.spool_max_size
    spilled: list[int] = []
    real_temporary_file = tempfile.TemporaryFile

    def counting_temporary_file(*args, **kwargs):  # what a SpooledTemporaryFile calls when it rolls over
        spilled.append(1)
        return real_temporary_file(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", counting_temporary_file)
    frame = np.random.default_rng(1).integers(0, 256, (1100, 1100, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="PNG")
    upload = buffer.getvalue()
    assert 3 * 2**20 < len(upload) < 4 * 2**20

    big = service.create_app(model, audit_path=None, workers=1, max_upload_bytes=8 * 2**20)
    small = service.create_app(model, audit_path=None, workers=1, max_upload_bytes=2 * 2**20)
    assert MultiPartParser.spool_max_size == before  # nothing set on the class

    async def plain_form(request):  # another app in the same process, on Starlette's defaults
        form = await request.form()
        size = len(await form["file"].read())
        await form.close()
        return PlainTextResponse(str(size))

    plain = Starlette(routes=[Route("/form", plain_form, methods=["POST"])])
    with TestClient(big) as big_client, TestClient(small) as small_client, TestClient(plain) as plain_client:
        assert big_client.post("/v1/predict", files={"file": ("f.png", upload)}).status_code == 200
        assert spilled == []  # 3.5 MB held in memory by the app whose limit is 8 MiB
        refused = small_client.post("/v1/predict", files={"file": ("f.png", upload)})
        assert refused.status_code == 413 and "2097152 bytes" in refused.json()["error"]
        assert small_client.post("/v1/predict", files={"file": ("f.png", upload[: 2**20 + 10])}).status_code == 422
        assert spilled == []  # over a MiB, under its own limit: in memory too
        assert plain_client.post("/form", files={"file": ("f.png", upload)}).text == str(len(upload))
        assert spilled == [1]  # Starlette's own 1 MiB spooling is untouched for everyone else
    assert MultiPartParser.spool_max_size == before


# 6. History reads under a bound of their own ------------------------------------------------------------


def test_history_readers_beyond_their_bound_get_503_and_predictions_go_on(model, tmp_path, monkeypatch):
    with TestClient(service.create_app(model, audit_path=tmp_path / "audit.sqlite", workers=1)) as client:
        assert (
            client.post("/v1/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"}).status_code == 200
        )
        release = threading.Event()
        reading = threading.Semaphore(0)
        original = AuditLog.page
        threads_seen: set[str] = set()

        def slow_page(self, **kwargs):
            threads_seen.add(threading.current_thread().name)
            reading.release()
            release.wait(30)
            return original(self, **kwargs)

        monkeypatch.setattr(AuditLog, "page", slow_page)
        bound = service.HISTORY_READERS + service.HISTORY_QUEUE
        results: list = []
        readers = [threading.Thread(target=lambda: results.append(client.get("/v1/history"))) for _ in range(bound)]
        for thread in readers:
            thread.start()
        assert reading.acquire(timeout=10)  # the reader pool is busy, the rest are waiting for it
        client.app.state.audit.read_interval = 0.5  # as if each paced read took half a second
        # Only once every reader is admitted is the next one refused. A read sent earlier would be
        # admitted and wait behind the held readers, so the test waits for the count, not a reply.
        deadline = time.monotonic() + 10
        while client.app.state.history_admission.in_flight < bound and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.app.state.history_admission.in_flight == bound
        refused = client.get("/v1/history")
        # told to come back when the 9 admitted reads will have drained: ceil(9 x 0.5 s)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == str(-(-bound // 2))
        assert refused.json() == {"error": f"busy: {bound} requests already in progress; retry shortly", "status": 503}
        started = time.perf_counter()
        prediction = client.post("/v1/predict", content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
        assert prediction.status_code == 200 and time.perf_counter() - started < 5  # not behind the readers
        release.set()
        for thread in readers:
            thread.join(30)
        assert [r.status_code for r in results].count(200) >= service.HISTORY_QUEUE
        assert all(r.status_code == 200 for r in results)
        assert results[0].json()["entries"][0]["id"] == 1
        assert threads_seen and all(name.startswith("audit-read") for name in threads_seen)
        assert client.get("/v1/history").status_code == 200


# 5. TLS, token file, exposure ---------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    key.chmod(0o600)
    return cert, key


@pytest.mark.skipif(not any(Path(p, "openssl").exists() for p in os.get_exec_path()), reason="no openssl CLI")
def test_tls_with_a_token_file_on_a_real_uvicorn(model, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    cert, key = self_signed(tmp_path)
    token_file = tmp_path / "token"
    token_file.write_text("tok-3f9a\n")
    token_file.chmod(0o600)
    server = runner.build_server(
        model, port=0, token_file=token_file, tls_cert=cert, tls_key=key, audit_path=None, workers=1
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started
        context = ssl.create_default_context(cafile=str(cert))

        def https(method: str, path: str, body: bytes | None = None, headers: dict | None = None):
            connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
            try:
                connection.request(method, path, body=body, headers=headers or {})
                response = connection.getresponse()
                return response.status, response.read()
            finally:
                connection.close()

        assert https("GET", "/healthz") == (200, b'{"status":"ok"}')
        assert https("GET", "/v1/model")[0] == 401
        status, body = https(
            "POST",
            "/v1/predict",
            jpeg_bytes(),
            {"Content-Type": "image/jpeg", "Authorization": "Bearer tok-3f9a"},  # the newline was stripped
        )
        assert status == 200 and b'"class"' in body
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)  # no TLS: no answer
        with pytest.raises((http.client.HTTPException, ConnectionError, OSError)):
            plain.request("GET", "/healthz")
            plain.getresponse().read()
        plain.close()
        untrusting = ssl.create_default_context()  # a client that does not know the certificate refuses it
        with pytest.raises(ssl.SSLCertVerificationError):
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    lines = service_lines(caplog)
    assert any("on https://127.0.0.1:0" in line and "token required" in line for line in lines), lines
    assert not any("tok-3f9a" in line for line in lines)  # the token is never logged


def serve_error(capsys, *args) -> str:
    assert cli.main(["serve", *map(str, args), "--no-audit"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    return err


def test_exposure_and_tls_mistakes_stop_serve_with_one_line(model, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("STEELDEFECT_TOKEN", raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "::", "plant-gw"):
        err = serve_error(capsys, model, "--host", host)
        assert err.startswith(f"error: --host {host} answers other machines, and there is no token") and (
            "--insecure" in err
        )
    cert = tmp_path / "cert.pem"
    cert.write_text("not a certificate\n")
    key = tmp_path / "key.pem"
    key.write_text("not a key\n")
    assert "--tls-cert and --tls-key go together" in serve_error(capsys, model, "--tls-cert", cert)
    assert serve_error(capsys, model, "--tls-cert", tmp_path / "gone.pem", "--tls-key", key) == (
        f"error: {tmp_path / 'gone.pem'}: file not found (--tls-cert)"
    )
    err = serve_error(capsys, model, "--tls-cert", cert, "--tls-key", key)
    assert err.startswith(f"error: {cert}, {key}: not a PEM certificate and its matching private key")
    assert serve_error(capsys, model, "--token-file", tmp_path / "none") == (
        f"error: {tmp_path / 'none'}: token file not found (--token-file)"
    )
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert (
        serve_error(capsys, model, "--token-file", empty) == f"error: {empty}: the token file is empty (--token-file)"
    )
    two = tmp_path / "two"
    two.write_text("a\nb\n")
    assert "must hold one line" in serve_error(capsys, model, "--token-file", two)
    assert "not both" in serve_error(capsys, model, "--token", "x", "--token-file", two)
    assert "above Pillow's own limit" in serve_error(capsys, model, "--max-pixels", 10**9)


def test_loopback_and_insecure_and_token_file_permissions(model, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("STEELDEFECT_TOKEN", raising=False)
    caplog.set_level(logging.INFO)
    for host in ("127.0.0.1", "127.8.9.1", "::1", "localhost", "[::1]"):
        assert runner.is_loopback(host), host
    runner.check_exposure("0.0.0.0", None, tls=False, insecure=True)  # allowed, and said
    assert any("--insecure" in line and "anyone on the network" in line for line in service_lines(caplog))
    runner.check_exposure("0.0.0.0", "t", tls=False, insecure=False)
    assert any("plain HTTP" in line for line in service_lines(caplog))
    loose = tmp_path / "token"
    loose.write_text("  s3cret-line \n")
    loose.chmod(0o644)
    caplog.clear()
    assert runner.resolve_token(None, loose) == "s3cret-line"
    warning = service_lines(caplog)
    assert warning == [f"{loose}: the token file is readable by other users (mode 0o644): chmod 600 it"]
    monkeypatch.setenv("STEELDEFECT_TOKEN", "from-env")
    assert runner.resolve_token(None, None) == "from-env"
    assert runner.resolve_token("given", None) == "given"


def test_history_reads_are_paced_to_their_share_of_a_core(tmp_path, monkeypatch):
    """After a read that took t s the next starts t * (1/share - 1) later: with a 5% share, 19 t.
    Time is the module's clock, replaced here, so the test measures the rule, not the machine."""
    from steeldefect.serve import audit as audit_module

    clock = {"now": 100.0}
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))
        clock["now"] += seconds

    monkeypatch.setattr(audit_module.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(audit_module.time, "sleep", sleep)
    log = AuditLog(tmp_path / "audit.sqlite", read_share=0.05)
    original = AuditLog.page

    def page_taking_2ms(self, **query):
        clock["now"] += 0.002
        return original(self, **query)

    monkeypatch.setattr(AuditLog, "page", page_taking_2ms)
    try:
        bodies = [log.read_page(limit=10).result(timeout=30) for _ in range(3)]
        assert slept == [0.038, 0.038]  # a 2 ms read -> 38 ms before the next read; none before the first
        assert all(body.startswith(b'{"entries":[]') for body in bodies)
        clock["now"] += 1.0  # readers idle for a while: no debt carried over
        log.read_page(limit=10).result(timeout=30)
        assert slept == [0.038, 0.038]
    finally:
        log.close()
    with pytest.raises(ValueError, match="read share"):
        AuditLog(tmp_path / "other.sqlite", read_share=0)
