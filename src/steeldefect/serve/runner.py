"""`steeldefect serve` itself: build the app, log the one start line, run uvicorn until interrupted."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from steeldefect.runtime.modelfile import ModelInfo
from steeldefect.serve.errors import require_extra
from steeldefect.serve.pool import default_workers
from steeldefect.serve.service import (
    DEFAULT_AUDIT_PATH,
    DEFAULT_HOST,
    DEFAULT_KEEP,
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_PORT,
    DEFAULT_QUEUE,
    TOKEN_ENV,
    create_app,
)

log = logging.getLogger("steeldefect.serve.service")


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
    require_extra()
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
