"""`steeldefect serve`: a deployed model as a local HTTP service for the inspection line, with an
inspector's web page at ``/`` and an audit log of every answer.

Endpoints (JSON unless said): ``POST /v1/predict`` (one image: multipart field ``file`` or the raw
body), ``POST /v1/predict/batch`` (several ``file`` parts, results in order, a bad image gets its own
error entry), ``GET /v1/model``, ``GET /v1/history?since=&after=&limit=`` (the audit log),
``GET /healthz``, ``GET /readyz``, ``GET /metrics`` (Prometheus text), ``GET /openapi.json``.

Concurrency: a LiteRT interpreter is not thread-safe, so the service keeps a pool of ``workers``
classifiers, each used by one executor thread at a time; decoding and inference run in those threads,
never on the event loop. At most ``workers + queue`` requests are admitted at once; the next one is
answered 503 at once instead of waiting behind a queue that only grows.

Security: binds to 127.0.0.1 by default; with a token every endpoint except ``/healthz``, ``/readyz``
and the static page itself needs ``Authorization: Bearer <token>`` (the page asks for it and sends it
with each call); request bodies above ``max_upload_bytes`` are refused with 413 before they are read
whole; no endpoint takes a path from a client; every error is a JSON ``{"error": ...}`` without a
traceback, and one log line.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, query types)
# at definition time, and those names are imported inside create_app so the module imports without the extra.
import asyncio
import hashlib
import logging
import math
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from steeldefect.core.options import ServeOptions
from steeldefect.data.dataset import DatasetError
from steeldefect.data.decode import DEFAULT_MAX_PIXELS, PixelLimitError, decode_image
from steeldefect.runtime.modelfile import read_model_info, top_k
from steeldefect.serve.audit import AuditError, AuditLog, AuditRow
from steeldefect.serve.errors import EXTRA_HINT, Reject, ServeError, require_extra
from steeldefect.serve.gate import OPEN_PATHS, BodyTooLarge, Gate, Metrics, too_large_message
from steeldefect.serve.pool import Admission, ClassifierPool, default_workers, resolve_model, warm_up_decoders

# Re-exported: the service's API was this one module before it was split (see the package docstring).
__all__ = [
    "EXTRA_HINT",
    "OPEN_PATHS",
    "ClassifierPool",
    "ServeError",
    "create_app",
    "default_workers",
    "resolve_model",
]

log = logging.getLogger(__name__)

# The defaults are the command's options (steeldefect.core.options.ServeOptions), named here for the API.
_OPTIONS = ServeOptions()
DEFAULT_HOST = _OPTIONS.host
DEFAULT_PORT = _OPTIONS.port
DEFAULT_AUDIT_PATH = _OPTIONS.audit
DEFAULT_MAX_UPLOAD_BYTES = int(_OPTIONS.max_upload_mb * 2**20)
DEFAULT_TOP_K = _OPTIONS.top_k
DEFAULT_QUEUE = _OPTIONS.queue  # requests waiting for an interpreter; beyond it a client is told 503 at once
DEFAULT_KEEP = _OPTIONS.audit_keep
MAX_BATCH_FILES = 64
MAX_FORM_FIELDS = 16  # file parts and fields other than files (client_id): a form is never bigger
# /v1/history: one reader thread (its own SQLite connection, reused) and this many requests waiting
# for it; more are answered 503 at once, so readers can neither pile up threads nor starve predictions.
HISTORY_READERS = 1
HISTORY_QUEUE = 8
HISTORY_TIME_SHARE = 0.05  # reads paced to 5% of the time (serve.audit): predictions keep the GIL and cores
MAX_CLIENT_ID_CHARS = 128
TOKEN_ENV = "STEELDEFECT_TOKEN"
RAW_CONTENT_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/x-ms-bmp", "image/tiff", "application/octet-stream")
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
    "/inspector.css": ("inspector.css", "text/css; charset=utf-8"),
}


def _static_files() -> dict[str, bytes]:
    folder = resources.files("steeldefect.serve") / "web"
    return {path: (folder / name).read_bytes() for path, (name, _) in _STATIC.items()}


def create_app(
    model: Path,
    *,
    workers: int | None = None,
    threads: int | None = 1,
    token: str | None = None,
    audit_path: Path | None = DEFAULT_AUDIT_PATH,
    audit_keep: int = DEFAULT_KEEP,
    audit_fsync: bool = False,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    top_k_default: int = DEFAULT_TOP_K,
    queue_size: int = DEFAULT_QUEUE,
    accept: float | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
):
    """The FastAPI application serving ``model`` (a .tflite or a run folder).

    Loads and warms ``workers`` interpreters (default: one per core) of ``threads`` threads each
    (0 or None = all cores) before returning, so a
    missing or corrupt model raises :class:`ModelFileError` here, not at the first request.
    ``audit_path=None`` switches the audit log off; ``audit_fsync`` makes each commit wait for the disk
    (see :mod:`steeldefect.serve.audit`). ``queue_size`` requests may wait for a free interpreter beyond the
    ``workers`` being answered; more are answered 503. An image whose header declares more than
    ``max_pixels`` pixels is refused (413) before it is decoded.
    """
    require_extra()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser

    if max_upload_bytes < 1:
        raise ValueError(f"max upload size must be positive, got {max_upload_bytes} bytes")
    if queue_size < 0:
        raise ValueError(f"queue size must be >= 0, got {queue_size}")
    if max_pixels < 1:
        raise ValueError(f"max pixels must be positive, got {max_pixels}")
    workers = default_workers() if workers is None else workers
    model_path = resolve_model(model)
    info = read_model_info(model_path)
    pool = ClassifierPool(model_path, info, workers, threads, accept)
    warm_up_decoders(info.input_size)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
    audit = None
    if audit_path is not None:
        audit = AuditLog(
            Path(audit_path),
            keep=audit_keep,
            fsync=audit_fsync,
            readers=HISTORY_READERS,
            read_share=HISTORY_TIME_SHARE,
        )
    metrics = Metrics(info)
    static = _static_files()
    admission = Admission(workers + queue_size, metrics.in_flight)
    # A refused reader is told when the queue ahead of it will have drained, not a fixed second:
    # on a loaded machine paced reads are slow, and clients retrying each second would cost more
    # than the reads themselves.
    history_admission = Admission(
        HISTORY_READERS + HISTORY_QUEUE,
        retry_after=lambda: (
            math.ceil(history_admission.in_flight * audit.read_interval / HISTORY_READERS) if audit is not None else 1
        ),
    )
    top_k_default = max(1, min(top_k_default, len(info.class_names)))
    model_fields = {"name": info.name, "variant": info.variant, "sha256": info.sha256}
    state = {"ready": True}

    @asynccontextmanager
    async def lifespan(_app):
        yield
        state["ready"] = False
        log.info(
            "steeldefect serve: stopping (%s answered)",
            int(
                sum(
                    sample.value
                    for metric in metrics.predictions.collect()
                    for sample in metric.samples
                    if sample.name.endswith("_total")
                )
            ),
        )
        executor.shutdown(wait=True)
        if audit is not None:  # also stops its reader threads
            audit.close()

    app = FastAPI(
        title="steeldefect",
        version=_version(),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        description="Steel surface defect classification with a LiteRT model (see the README).",
    )
    app.state.model_info = info
    app.state.audit = audit

    def error_response(
        status: int,
        message: str,
        request: Request | None = None,
        headers=None,
        where: dict | None = None,
        detail: str | None = None,
    ) -> JSONResponse:
        """The JSON error a client gets, and its one log line (method, path, client, problem, and a
        ``detail`` for the log only)."""
        if request is not None:
            where = {"method": request.method, "path": request.url.path, "client": request.client}
        client = (where or {}).get("client")
        where_text = (
            f"{where.get('method', '?')} {where.get('path', '?')} from {client[0] if client else '?'}" if where else "?"
        )
        # Client-sent text (path, filename) in this line is made one printable line by errors.OneLineLogs.
        log.warning("%d %s: %s%s", status, where_text, message, f" ({detail})" if detail else "")
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(Reject)
    async def on_reject(request: Request, error: Reject):
        return error_response(error.status, error.message, request, error.headers, detail=error.detail)

    @app.exception_handler(BodyTooLarge)
    async def on_too_large(request: Request, error: BodyTooLarge):  # a body without Content-Length grew too big
        return error_response(413, too_large_message(max_upload_bytes), request)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, error: StarletteHTTPException):
        message = str(error.detail)
        if error.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif error.status_code == 405:
            message = f"method {request.method} not allowed on {request.url.path}"
        return error_response(error.status_code, message, request, getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in error.errors()
        )
        return error_response(422, f"invalid request: {problems}", request)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, error: Exception):
        log.error("500 %s %s: %s: %s", request.method, request.url.path, type(error).__name__, error)
        return JSONResponse({"error": "internal error (logged on the server)", "status": 500}, status_code=500)

    def classify(data: bytes, name: str) -> dict[str, Any]:
        """Decode and classify one image (runs in an executor thread)."""
        start = time.perf_counter()
        image = decode_image(data, info.input_size, name, max_pixels)
        decoded = time.perf_counter()
        judgement = pool.judge(image)
        done = time.perf_counter()
        probabilities = judgement.probabilities[0]
        uncertain = None if judgement.uncertain is None else bool(judgement.uncertain[0])
        confidence = None if judgement.confidence is None else float(judgement.confidence[0])
        return {
            "top": top_k(probabilities, info.class_names, len(info.class_names)),
            "uncertain": uncertain,
            "confidence": confidence,
            "image": {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)},
            "decode_ms": 1000 * (decoded - start),
            "inference_ms": 1000 * (done - decoded),
        }

    async def run_one(data: bytes, name: str) -> dict[str, Any]:
        if not data:
            raise Reject(422, f"{name}: empty image (0 bytes)")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, classify, data, name)
        except PixelLimitError as error:  # before DatasetError, its base: too big is not broken
            raise Reject(413, f"{error} (--max-pixels)") from None
        except DatasetError as error:
            raise Reject(422, str(error)) from None

    def answer(result: dict[str, Any], k: int, client_id: str | None) -> dict[str, Any]:
        top = result["top"][:k]
        metrics.predictions.labels(top[0][0]).inc()
        return {
            "class": top[0][0],
            "probability": round(top[0][1], 6),
            "top_k": [{"class": name, "probability": round(p, 6)} for name, p in top],
            "uncertain": result["uncertain"],
            "confidence": None if result["confidence"] is None else round(result["confidence"], 6),
            "image": result["image"],
            "client_id": client_id,
            "model": model_fields,
            "timing_ms": {"decode": round(result["decode_ms"], 3), "inference": round(result["inference_ms"], 3)},
        }

    async def record(answers: list[dict[str, Any]]) -> None:
        """Commit the answers' audit rows before they are sent (sets each ``audit_id``)."""
        if audit is None or not answers:
            return
        rows = [
            AuditRow(
                a["client_id"],
                a["image"]["sha256"],
                a["image"]["bytes"],
                [(t["class"], t["probability"]) for t in a["top_k"]],
                a["uncertain"],
                a["confidence"],
                info.sha256,
                a["timing_ms"]["decode"] + a["timing_ms"]["inference"],
            )
            for a in answers
        ]
        try:
            ids = await asyncio.wrap_future(audit.submit(rows))
        except AuditError as error:  # the message names the server's audit path: for the log only
            raise Reject(
                503,
                "audit log write failed; the prediction was not answered because it could not be recorded",
                detail=str(error),
            ) from None
        for entry, row_id in zip(answers, ids):
            entry["audit_id"] = row_id

    def check_top_k(k: int | None) -> int:
        if k is None:
            return top_k_default
        if not 1 <= k <= len(info.class_names):
            raise Reject(422, f"top_k must be between 1 and {len(info.class_names)}, got {k}")
        return k

    def check_client_id(value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if len(value) > MAX_CLIENT_ID_CHARS or not value.isprintable():
            raise Reject(422, f"client id must be at most {MAX_CLIENT_ID_CHARS} printable characters")
        return value

    async def read_form(request: Request, max_files: int):
        """The multipart form, its files held in memory up to the body limit.

        Parsed here rather than by ``request.form()``: Starlette spools file parts over
        ``MultiPartParser.spool_max_size`` (1 MiB) to a temporary file and has no per-request setting
        for it, and setting it on the class would change every app in the process. An instance
        attribute on this request's parser keeps the limit to this app (the service writes nowhere
        but its audit log).
        """
        parser = MultiPartParser(request.headers, request.stream(), max_files=max_files, max_fields=MAX_FORM_FIELDS)
        parser.spool_max_size = max_upload_bytes  # the body limit already bounds what is held
        try:
            return await parser.parse()
        except MultiPartException as error:  # too many files/fields, a part header too big
            raise Reject(400, f"multipart body: {error.message}") from None
        except (ValueError, AssertionError) as error:  # python-multipart on a malformed body
            raise Reject(400, f"malformed multipart body ({error})") from None

    def media_type(request: Request) -> str:
        return request.headers.get("content-type", "").split(";")[0].strip().lower()

    async def read_one(request: Request, kind: str) -> tuple[bytes, str, str | None]:
        """The image bytes, their name for messages, and the client id of a single-image request."""
        client_id = request.headers.get("x-client-id")
        if kind != "multipart/form-data":
            return await request.body(), "body", client_id
        form = await read_form(request, 1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise Reject(422, "multipart body has no file part named 'file'")
        form_client = form.get("client_id")
        client_id = form_client if isinstance(form_client, str) and form_client else client_id
        return await upload.read(), upload.filename or "file", client_id

    # Admission covers reading the body too: at most workers + queue uploads are held in memory at once.
    @app.post("/v1/predict", summary="Classify one image (multipart field 'file' or the raw body)")
    async def predict(request: Request, top_k: int | None = None):
        started = time.perf_counter()
        k = check_top_k(top_k)
        kind = media_type(request)
        if kind != "multipart/form-data" and kind not in RAW_CONTENT_TYPES and kind != "":
            raise Reject(
                415,
                f"unsupported content type {kind!r}: send multipart/form-data with a 'file' part, "
                f"or the image bytes as image/jpeg, image/png, image/bmp, image/tiff or "
                f"application/octet-stream",
            )

        async def job():
            data, name, client_id = await read_one(request, kind)
            return await run_one(data, name), check_client_id(client_id)

        result, client_id = await admission.run(job)
        body = answer(result, k, client_id)
        await record([body])
        body["server_ms"] = round(1000 * (time.perf_counter() - started), 3)
        return body

    @app.post("/v1/predict/batch", summary=f"Classify up to {MAX_BATCH_FILES} images (multipart parts 'file')")
    async def predict_batch(request: Request, top_k: int | None = None):
        started = time.perf_counter()
        k = check_top_k(top_k)
        if media_type(request) != "multipart/form-data":
            raise Reject(415, "batch needs multipart/form-data with one 'file' part per image")

        async def one(data: bytes, name: str) -> dict[str, Any]:
            try:
                return await run_one(data, name)
            except Reject as error:
                log.warning("%d POST /v1/predict/batch: %s", error.status, error.message)
                return {"error": error.message}

        async def job():
            form = await read_form(request, MAX_BATCH_FILES)
            uploads = [
                part for key, part in form.multi_items() if key in ("file", "files") and not isinstance(part, str)
            ]
            if not uploads:
                raise Reject(422, "multipart body has no file parts named 'file'")
            form_client = form.get("client_id")
            client_id = check_client_id(
                form_client if isinstance(form_client, str) and form_client else request.headers.get("x-client-id")
            )
            contents = [(await part.read(), part.filename or f"file {i + 1}") for i, part in enumerate(uploads)]
            return contents, client_id, await asyncio.gather(*(one(data, name) for data, name in contents))

        contents, client_id, results = await admission.run(job)
        entries = [
            {"index": i, "filename": name, **(result if "error" in result else answer(result, k, client_id))}
            for i, ((_, name), result) in enumerate(zip(contents, results))
        ]
        await record([entry for entry in entries if "error" not in entry])
        return {
            "results": entries,
            "answered": sum("error" not in e for e in entries),
            "failed": sum("error" in e for e in entries),
            "model": model_fields,
            "server_ms": round(1000 * (time.perf_counter() - started), 3),
        }

    @app.get("/v1/model", summary="The served model: class names, input size, variant, provenance")
    async def model_description():
        return {
            **model_fields,
            "class_names": list(info.class_names),
            "input_size": {"height": info.input_size[0], "width": info.input_size[1]},
            "uncertainty": info.rule is not None,
            "calibrated": info.temperature is not None,
            "provenance": {key: value for key, value in info.metadata.items() if key not in ("class_names", "input")},
            "top_k_default": top_k_default,
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": max_pixels,
            "max_batch_files": MAX_BATCH_FILES,
            "audit": audit is not None,
        }

    @app.get("/v1/history", summary="Audit log entries, oldest first (page with after=<last id>)")
    async def history(since: str | None = None, after: int = 0, limit: int = 100):
        if audit is None:
            raise Reject(404, "the audit log is off (server started with --no-audit)")
        if not 1 <= limit <= 1000:
            raise Reject(422, f"limit must be between 1 and 1000, got {limit}")
        if not 0 <= after < 2**63:  # SQLite's integer range
            raise Reject(422, f"after must be an audit id (0 or more), got {after}")

        async def job() -> bytes:
            return await asyncio.wrap_future(audit.read_page(since=since, after=after, limit=limit))

        try:
            body = await history_admission.run(job)  # 503 at once when the readers' queue is full
        except ValueError as error:
            raise Reject(422, str(error)) from None
        except sqlite3.Error as error:  # the message may name the server's file: for the log only
            raise Reject(503, "audit log cannot be read; retry shortly", {"Retry-After": "1"}, str(error)) from None
        return Response(body, media_type="application/json")

    @app.get("/healthz", summary="Liveness")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Model loaded and warmed up, audit log writable")
    async def readyz():
        problems = []
        if not state["ready"]:
            problems.append("shutting down")
        if audit is not None and not audit.healthy:
            problems.append("audit log not writable")
        if problems:
            return JSONResponse({"ready": False, "problems": problems}, status_code=503)
        return {"ready": True, "model": model_fields, "workers": pool.size}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    for route_path, (_, content_type) in _STATIC.items():

        def page(route_path=route_path, content_type=content_type):
            return Response(static[route_path], media_type=content_type, headers={"Cache-Control": "no-cache"})

        app.add_api_route(route_path, page, methods=["GET"], include_in_schema=False)

    known_paths = {route.path for route in app.routes}  # type: ignore[attr-defined]  # each is a Route, with .path
    return Gate(
        app,
        token=token,
        max_body=max_upload_bytes,
        metrics=metrics,
        known_paths=known_paths,
        error=lambda status, message, scope: error_response(status, message, None, where=scope),
    )


def _version() -> str:
    from steeldefect import __version__

    return __version__
