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
from steeldefect.serve.drift import DEFAULT_WINDOW, DriftGauges, monitor_for
from steeldefect.serve.errors import EXTRA_HINT, Reject, ServeError, require_extra
from steeldefect.serve.gate import OPEN_PATHS, BodyTooLarge, Gate, Metrics, too_large_message
from steeldefect.serve.loop_routes import add_loop_routes
from steeldefect.serve.pool import Admission, ClassifierPool, default_workers, resolve_model, warm_up_decoders
from steeldefect.serve.review import DEFAULT_SAMPLE as DEFAULT_REVIEW_SAMPLE
from steeldefect.serve.review import ReviewStore
from steeldefect.serve.swap import DEFAULT_MAX_MODEL_BYTES, ModelSlot, Served

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
    review_dir: Path | None = None,
    review_sample: float = DEFAULT_REVIEW_SAMPLE,
    review_max_bytes: int | None = None,
    review_seed: int = 0,
    models_dir: Path | None = None,
    max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES,
    drift_window: int = DEFAULT_WINDOW,
):
    """The FastAPI application serving ``model`` (a .tflite or a run folder).

    Loads and warms ``workers`` interpreters (default: one per core) of ``threads`` threads each
    (0 or None = all cores) before returning, so a
    missing or corrupt model raises :class:`ModelFileError` here, not at the first request.
    ``audit_path=None`` switches the audit log off; ``audit_fsync`` makes each commit wait for the disk
    (see :mod:`steeldefect.serve.audit`). ``queue_size`` requests may wait for a free interpreter beyond the
    ``workers`` being answered; more are answered 503. An image whose header declares more than
    ``max_pixels`` pixels is refused (413) before it is decoded.

    ``review_dir`` keeps answers' images for review (serve/review.py; needs the audit log, whose
    database holds the review tables); ``models_dir`` is where ``POST /v1/model`` stores uploads
    (serve/swap.py; the endpoint needs a token); ``drift_window`` answers feed the drift monitor
    (serve/drift.py).
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
    if review_dir is not None and audit_path is None:
        raise ServeError("--review needs the audit log (its database holds the review queue): drop --no-audit")
    workers = default_workers() if workers is None else workers
    model_path = resolve_model(model)
    info = read_model_info(model_path)

    def build(path: Path, model_info) -> Served:
        """A model ready to serve: its warmed-up interpreters and its drift monitor."""
        served = Served(model_info, ClassifierPool(path, model_info, workers, threads, accept))
        served.extra["drift"] = monitor_for(model_info, accept, window=drift_window)
        return served

    slot = ModelSlot(
        build(model_path, info),
        build,
        None if models_dir is None or not token else Path(models_dir),
        on_switch=lambda old, new: switched(old, new),
    )
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
    store: ReviewStore | None = None
    if review_dir is not None and audit_path is not None:
        try:
            store = ReviewStore(
                review_dir, Path(audit_path), sample=review_sample, max_bytes=review_max_bytes, seed=review_seed
            )
        except (OSError, sqlite3.Error) as error:
            raise ServeError(f"{review_dir}: cannot open the review store ({error})") from None
    metrics = Metrics(info)
    drift_gauges = DriftGauges(metrics.registry)
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
    top_k_default = max(1, top_k_default)  # at most the served model's classes: clamped per request
    state = {"ready": True}

    def switched(old: Served, new: Served) -> None:
        metrics.model.labels(old.info.name, old.info.variant, old.info.sha256).set(0)
        metrics.model.labels(new.info.name, new.info.variant, new.info.sha256).set(1)
        for name in new.info.class_names:
            metrics.predictions.labels(name)
        app.state.model_info = new.info

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
        if store is not None:
            store.close()

    app = FastAPI(
        title="steeldefect",
        version=_version(),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        description="Steel surface defect classification with a LiteRT model (see docs/service.md).",
    )
    app.state.model_info = info
    app.state.audit = audit
    app.state.history_admission = history_admission  # how many history reads are in flight

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

    def classify(data: bytes, name: str, served: Served) -> dict[str, Any]:
        """Decode and classify one image, and keep it for review when it should be (an executor thread)."""
        start = time.perf_counter()
        image = decode_image(data, served.info.input_size, name, max_pixels)
        decoded = time.perf_counter()
        judgement = served.pool.judge(image)
        done = time.perf_counter()
        probabilities = judgement.probabilities[0]
        uncertain = None if judgement.uncertain is None else bool(judgement.uncertain[0])
        confidence = None if judgement.confidence is None else float(judgement.confidence[0])
        sha256 = hashlib.sha256(data).hexdigest()
        reason = store.reason(uncertain) if store is not None else None
        return {
            "top": top_k(probabilities, served.info.class_names, len(served.info.class_names)),
            "uncertain": uncertain,
            "confidence": confidence,
            "image": {"sha256": sha256, "bytes": len(data)},
            "decode_ms": 1000 * (decoded - start),
            "inference_ms": 1000 * (done - decoded),
            "kept": store.keep(data, sha256, reason) if store is not None and reason is not None else None,
        }

    async def run_one(data: bytes, name: str, served: Served) -> dict[str, Any]:
        if not data:
            raise Reject(422, f"{name}: empty image (0 bytes)")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(executor, classify, data, name, served)
        except PixelLimitError as error:  # before DatasetError, its base: too big is not broken
            raise Reject(413, f"{error} (--max-pixels)") from None
        except DatasetError as error:
            raise Reject(422, str(error)) from None

    def answer(result: dict[str, Any], k: int, client_id: str | None, served: Served) -> dict[str, Any]:
        top = result["top"][:k]
        metrics.predictions.labels(top[0][0]).inc()
        served.extra["drift"].observe(result["top"][0][0], result["uncertain"])
        kept = result["kept"]
        return {
            "class": top[0][0],
            "probability": round(top[0][1], 6),
            "top_k": [{"class": name, "probability": round(p, 6)} for name, p in top],
            "uncertain": result["uncertain"],
            "confidence": None if result["confidence"] is None else round(result["confidence"], 6),
            "image": result["image"],
            "client_id": client_id,
            "model": served.fields,
            "timing_ms": {"decode": round(result["decode_ms"], 3), "inference": round(result["inference_ms"], 3)},
            "review": None if kept is None else {"file": kept.file, "reason": kept.reason, "new": kept.new},
        }

    async def record(answers: list[dict[str, Any]], served: Served) -> None:
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
                served.info.sha256,
                a["timing_ms"]["decode"] + a["timing_ms"]["inference"],
                None if a["review"] is None else a["review"]["file"],
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
        firsts = [(a["image"]["sha256"], a["audit_id"]) for a in answers if a["review"] and a["review"]["new"]]
        if firsts and store is not None:  # the queue names the audit row of the image's first answer
            await asyncio.to_thread(store.link_all, firsts)

    def check_top_k(k: int | None, served: Served) -> int:
        n_classes = len(served.info.class_names)
        if k is None:
            return min(top_k_default, n_classes)
        if not 1 <= k <= n_classes:
            raise Reject(422, f"top_k must be between 1 and {n_classes}, got {k}")
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
        served = slot.current  # read once: a swap mid-request does not change the model answering it
        k = check_top_k(top_k, served)
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
            return await run_one(data, name, served), check_client_id(client_id)

        result, client_id = await admission.run(job)
        body = answer(result, k, client_id, served)
        await record([body], served)
        body["server_ms"] = round(1000 * (time.perf_counter() - started), 3)
        return body

    @app.post("/v1/predict/batch", summary=f"Classify up to {MAX_BATCH_FILES} images (multipart parts 'file')")
    async def predict_batch(request: Request, top_k: int | None = None):
        started = time.perf_counter()
        served = slot.current
        k = check_top_k(top_k, served)
        if media_type(request) != "multipart/form-data":
            raise Reject(415, "batch needs multipart/form-data with one 'file' part per image")

        async def one(data: bytes, name: str) -> dict[str, Any]:
            try:
                return await run_one(data, name, served)
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
            {"index": i, "filename": name, **(result if "error" in result else answer(result, k, client_id, served))}
            for i, ((_, name), result) in enumerate(zip(contents, results))
        ]
        await record([entry for entry in entries if "error" not in entry], served)
        return {
            "results": entries,
            "answered": sum("error" not in e for e in entries),
            "failed": sum("error" in e for e in entries),
            "model": served.fields,
            "server_ms": round(1000 * (time.perf_counter() - started), 3),
        }

    @app.get("/v1/model", summary="The served model: class names, input size, variant, provenance")
    async def model_description():
        info = slot.current.info
        return {
            **slot.current.fields,
            "class_names": list(info.class_names),
            "input_size": {"height": info.input_size[0], "width": info.input_size[1]},
            "uncertainty": info.rule is not None,
            "calibrated": info.temperature is not None,
            "provenance": {key: value for key, value in info.metadata.items() if key not in ("class_names", "input")},
            "top_k_default": min(top_k_default, len(info.class_names)),
            "max_upload_bytes": max_upload_bytes,
            "max_pixels": max_pixels,
            "max_batch_files": MAX_BATCH_FILES,
            "audit": audit is not None,
            "review": store is not None,
            "model_upload": slot.folder is not None,
            "previous": None if slot.previous is None else slot.previous.fields,
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
        return {"ready": True, "model": slot.current.fields, "workers": slot.current.pool.size}

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus_metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        drift_gauges.update(slot.current.extra["drift"].status())
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    add_loop_routes(app, slot=slot, store=store, max_model_bytes=max_model_bytes)

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
        path_limits={"/v1/model": max_model_bytes},
    )


def _version() -> str:
    from steeldefect import __version__

    return __version__
