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

The token and upload-limit checks and the request metrics are the ASGI wrapper in
:mod:`steeldefect.serve.gate`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations (Request, query types)
# at definition time, and those names are imported inside create_app so the module imports without the extra.
import asyncio
import hashlib
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from steeldefect.core.options import ServeOptions
from steeldefect.data.dataset import DatasetError
from steeldefect.data.decode import decode_image
from steeldefect.runtime.litert import ModelFileError
from steeldefect.runtime.modelfile import ModelInfo, read_model_info, top_k
from steeldefect.serve.audit import AuditError, AuditLog, AuditRow
from steeldefect.serve.gate import _BodyTooLarge, _Gate, _Metrics, _too_large_message
from steeldefect.serve.workers import ClassifierPool, _warm_up_decoders, default_workers

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
MAX_CLIENT_ID_CHARS = 128
TOKEN_ENV = "STEELDEFECT_TOKEN"
RAW_CONTENT_TYPES = ("image/jpeg", "image/png", "image/bmp", "image/x-ms-bmp", "image/tiff", "application/octet-stream")
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/inspector.js": ("inspector.js", "text/javascript; charset=utf-8"),
    "/inspector.css": ("inspector.css", "text/css; charset=utf-8"),
}
EXTRA_HINT = 'steeldefect serve needs the serve extra: pip install "steeldefect[serve]"'


class ServeError(RuntimeError):
    """The service cannot start (missing extra, bad model or audit path): one line for the user."""


class _Reject(Exception):
    """A request answered with a 4xx/5xx JSON error naming the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def resolve_model(model: Path) -> Path:
    """A .tflite file as given, or a run folder's deployable int8 model (the one the line should run)."""
    from steeldefect.core.runfolder import deployable_model

    model = Path(model)
    if model.is_dir():
        try:
            chosen = deployable_model(model)
        except (FileNotFoundError, ValueError, KeyError) as error:
            raise ModelFileError(f"{model}: no deployable model in this run folder ({error})") from error
        log.info("run folder %s: serving its deployable model %s", model, chosen)
        return chosen
    if model.suffix != ".tflite":
        raise ModelFileError(f"{model}: serve runs an exported .tflite model or a run folder (export first)")
    return model


def _require_extra():
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ServeError(f"{EXTRA_HINT} ({error.name} is not installed)") from None


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
):
    """The FastAPI application serving ``model`` (a .tflite or a run folder).

    Loads and warms ``workers`` interpreters (default: one per core) of ``threads`` threads each
    (0 or None = all cores) before returning, so a
    missing or corrupt model raises :class:`ModelFileError` here, not at the first request.
    ``audit_path=None`` switches the audit log off; ``audit_fsync`` makes each commit wait for the disk
    (see :mod:`steeldefect.serve.audit`). ``queue_size`` requests may wait for a free interpreter beyond the
    ``workers`` being answered; more are answered 503.
    """
    _require_extra()
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    if max_upload_bytes < 1:
        raise ValueError(f"max upload size must be positive, got {max_upload_bytes} bytes")
    if queue_size < 0:
        raise ValueError(f"queue size must be >= 0, got {queue_size}")
    workers = default_workers() if workers is None else workers
    model_path = resolve_model(model)
    info = read_model_info(model_path)
    pool = ClassifierPool(model_path, info, workers, threads, accept)
    _warm_up_decoders(info.input_size)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="infer")
    audit = AuditLog(Path(audit_path), keep=audit_keep, fsync=audit_fsync) if audit_path is not None else None
    metrics = _Metrics(info)
    static = _static_files()
    # Uploads up to the body limit stay in memory instead of spilling to a temporary file (Starlette
    # spools parts over 1 MiB to disk): the service writes nowhere but its audit log.
    from starlette.formparsers import MultiPartParser

    MultiPartParser.spool_max_size = max(MultiPartParser.spool_max_size, max_upload_bytes)
    admitted_max = workers + queue_size
    top_k_default = max(1, min(top_k_default, len(info.class_names)))
    model_fields = {"name": info.name, "variant": info.variant, "sha256": info.sha256}
    state = {"in_flight": 0, "ready": True}

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
        if audit is not None:
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
        status: int, message: str, request: Request | None = None, headers=None, where: dict | None = None
    ) -> JSONResponse:
        """The JSON error a client gets, and its one log line (method, path, client, problem)."""
        if request is not None:
            where = {"method": request.method, "path": request.url.path, "client": request.client}
        client = (where or {}).get("client")
        where_text = (
            f"{where.get('method', '?')} {where.get('path', '?')} from {client[0] if client else '?'}" if where else "?"
        )
        log.warning("%d %s: %s", status, where_text, message)
        return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)

    @app.exception_handler(_Reject)
    async def on_reject(request: Request, error: _Reject):
        return error_response(error.status, error.message, request, error.headers)

    @app.exception_handler(_BodyTooLarge)
    async def on_too_large(request: Request, error: _BodyTooLarge):  # a body without Content-Length grew too big
        return error_response(413, _too_large_message(max_upload_bytes), request)

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

    async def admitted(start_job):
        """Await ``start_job()`` if fewer than the bound are in flight, else 503 before any work starts."""
        if state["in_flight"] >= admitted_max:
            raise _Reject(
                503, f"busy: {admitted_max} requests already in progress; retry shortly", {"Retry-After": "1"}
            )
        state["in_flight"] += 1
        metrics.in_flight.inc()
        try:
            return await start_job()
        finally:
            state["in_flight"] -= 1
            metrics.in_flight.dec()

    def classify(data: bytes, name: str) -> dict[str, Any]:
        """Decode and classify one image (runs in an executor thread)."""
        start = time.perf_counter()
        image = decode_image(data, info.input_size, name)
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
            raise _Reject(422, f"{name}: empty image (0 bytes)")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, classify, data, name)
        except DatasetError as error:
            raise _Reject(422, str(error)) from None

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
        except AuditError as error:
            raise _Reject(503, f"{error}; the prediction was not answered because it could not be recorded") from None
        for entry, row_id in zip(answers, ids):
            entry["audit_id"] = row_id

    def check_top_k(k: int | None) -> int:
        if k is None:
            return top_k_default
        if not 1 <= k <= len(info.class_names):
            raise _Reject(422, f"top_k must be between 1 and {len(info.class_names)}, got {k}")
        return k

    def check_client_id(value: str | None) -> str | None:
        if value is None or value == "":
            return None
        if len(value) > MAX_CLIENT_ID_CHARS or not value.isprintable():
            raise _Reject(422, f"client id must be at most {MAX_CLIENT_ID_CHARS} printable characters")
        return value

    async def read_form(request: Request, max_files: int):
        try:
            return await request.form(max_files=max_files, max_fields=16)
        except StarletteHTTPException as error:
            raise _Reject(error.status_code, f"multipart body: {error.detail}") from None
        except (ValueError, AssertionError) as error:  # python-multipart on a malformed body
            raise _Reject(400, f"malformed multipart body ({error})") from None

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
            raise _Reject(422, "multipart body has no file part named 'file'")
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
            raise _Reject(
                415,
                f"unsupported content type {kind!r}: send multipart/form-data with a 'file' part, "
                f"or the image bytes as image/jpeg, image/png, image/bmp, image/tiff or "
                f"application/octet-stream",
            )

        async def job():
            data, name, client_id = await read_one(request, kind)
            return await run_one(data, name), check_client_id(client_id)

        result, client_id = await admitted(job)
        body = answer(result, k, client_id)
        await record([body])
        body["server_ms"] = round(1000 * (time.perf_counter() - started), 3)
        return body

    @app.post("/v1/predict/batch", summary=f"Classify up to {MAX_BATCH_FILES} images (multipart parts 'file')")
    async def predict_batch(request: Request, top_k: int | None = None):
        started = time.perf_counter()
        k = check_top_k(top_k)
        if media_type(request) != "multipart/form-data":
            raise _Reject(415, "batch needs multipart/form-data with one 'file' part per image")

        async def one(data: bytes, name: str) -> dict[str, Any]:
            try:
                return await run_one(data, name)
            except _Reject as error:
                log.warning("%d POST /v1/predict/batch: %s", error.status, error.message)
                return {"error": error.message}

        async def job():
            form = await read_form(request, MAX_BATCH_FILES)
            uploads = [
                part for key, part in form.multi_items() if key in ("file", "files") and not isinstance(part, str)
            ]
            if not uploads:
                raise _Reject(422, "multipart body has no file parts named 'file'")
            form_client = form.get("client_id")
            client_id = check_client_id(
                form_client if isinstance(form_client, str) and form_client else request.headers.get("x-client-id")
            )
            contents = [(await part.read(), part.filename or f"file {i + 1}") for i, part in enumerate(uploads)]
            return contents, client_id, await asyncio.gather(*(one(data, name) for data, name in contents))

        contents, client_id, results = await admitted(job)
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
            "max_batch_files": MAX_BATCH_FILES,
            "audit": audit is not None,
        }

    @app.get("/v1/history", summary="Audit log entries, oldest first (page with after=<last id>)")
    async def history(since: str | None = None, after: int = 0, limit: int = 100):
        if audit is None:
            raise _Reject(404, "the audit log is off (server started with --no-audit)")
        if not 1 <= limit <= 1000:
            raise _Reject(422, f"limit must be between 1 and 1000, got {limit}")
        if not 0 <= after < 2**63:  # SQLite's integer range
            raise _Reject(422, f"after must be an audit id (0 or more), got {after}")
        try:
            entries = await asyncio.to_thread(audit.history, since=since, after=after, limit=limit)
        except ValueError as error:
            raise _Reject(422, str(error)) from None
        return {"entries": entries, "next_after": entries[-1]["id"] if len(entries) == limit else None}

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
    return _Gate(
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


def serve(
    model: Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int | None = None,
    threads: int | None = 1,
    token: str | None = None,
    **app_options: Any,
) -> None:
    """Load the model, then answer HTTP on ``host:port`` until interrupted (SIGINT/SIGTERM).

    ``token=None`` reads :data:`TOKEN_ENV`; an empty token means none.
    """
    _require_extra()
    import uvicorn

    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    workers = default_workers() if workers is None else workers
    app = create_app(model, workers=workers, threads=threads, token=token, **app_options)
    info: ModelInfo = app.state.model_info
    audit_path = app_options.get("audit_path", DEFAULT_AUDIT_PATH)
    audit_keep = app_options.get("audit_keep", DEFAULT_KEEP)
    audit_fsync = app_options.get("audit_fsync", False)
    queue_size = app_options.get("queue_size", DEFAULT_QUEUE)
    max_upload_bytes = app_options.get("max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES)
    shown_host = f"[{host}]" if ":" in host else host
    log.info(
        "steeldefect serve: %s (%s, sha256 %s, %d classes, %dx%d) on http://%s:%d, %d worker(s) x %s thread(s), "
        "queue %d, audit %s, token %s, upload limit %.1f MiB",
        info.path,
        info.variant,
        info.sha256[:12],
        len(info.class_names),
        *info.input_size,
        shown_host,
        port,
        workers,
        threads if threads else "all",
        queue_size,
        f"{audit_path} (keep {audit_keep} rows{', fsync' if audit_fsync else ''})" if audit_path else "off",
        "required" if token else "off",
        max_upload_bytes / 2**20,
    )
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        log.warning("listening on %s without a token: anyone on the network can use the service", host)
    config = uvicorn.Config(
        app, host=host, port=port, access_log=False, log_level="warning", timeout_graceful_shutdown=10
    )
    uvicorn.Server(config).run()


def mebibytes(value: float) -> int:
    """``--max-upload-mb`` in bytes."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"--max-upload-mb must be a positive number, got {value}")
    return int(value * 2**20)
