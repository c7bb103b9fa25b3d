"""`steeldefect serve` itself: check how the service is exposed (token, TLS, host), build the app,
log the one start line, run uvicorn until interrupted.

A ``--host`` beyond loopback without a token is refused unless ``insecure=True``: a warning in a
log nobody reads is not a control. The token comes from ``token``, else ``token_file`` (read once),
else ``$STEELDEFECT_TOKEN``; it is never logged. TLS is uvicorn's own (``ssl_certfile``/``ssl_keyfile``),
the pair checked here first so that a bad file is one line, not a traceback from inside uvicorn.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import ssl
import stat
from pathlib import Path
from typing import Any

from steeldefect.data.decode import DEFAULT_MAX_PIXELS, PILLOW_PIXEL_CEILING
from steeldefect.runtime.modelfile import ModelInfo
from steeldefect.serve.errors import ServeError, require_extra
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


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); any other name or address is not."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything: treated as reaching the network


def _loose_mode(path: Path) -> str | None:
    """``path``'s mode (e.g. ``0o644``) when group or others may read or write it, else None."""
    mode = stat.S_IMODE(path.stat().st_mode)
    return oct(mode) if mode & 0o077 else None


def read_token_file(path: Path) -> str:
    """The token in ``path`` (surrounding whitespace and the trailing newline stripped), read once."""
    path = Path(path)
    try:
        token = path.read_text(encoding="utf-8").strip()
        loose = _loose_mode(path)
    except FileNotFoundError:
        raise ServeError(f"{path}: token file not found (--token-file)") from None
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise ServeError(f"{path}: cannot read the token file ({reason})") from None
    if not token:
        raise ServeError(f"{path}: the token file is empty (--token-file)")
    if "\n" in token or "\r" in token:
        raise ServeError(f"{path}: the token file must hold one line (--token-file)")
    if loose:
        log.warning("%s: the token file is readable by other users (mode %s): chmod 600 it", path, loose)
    return token


def resolve_token(token: str | None, token_file: Path | None) -> str | None:
    """``token``, else the token file's, else ``$STEELDEFECT_TOKEN``; an empty token means none."""
    if token and token_file is not None:
        raise ServeError("give --token or --token-file, not both")
    if token_file is not None:
        return read_token_file(token_file)
    return token if token is not None else os.environ.get(TOKEN_ENV) or None


def check_tls(cert: Path | None, key: Path | None) -> tuple[str, str] | None:
    """The certificate and key as uvicorn wants them, after loading them once; None without TLS."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ServeError("--tls-cert and --tls-key go together: give both (PEM certificate and its private key)")
    for path, what in ((cert, "--tls-cert"), (key, "--tls-key")):
        if not Path(path).is_file():
            raise ServeError(f"{path}: file not found ({what})")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or getattr(error, "strerror", None) or error
        raise ServeError(
            f"{cert}, {key}: not a PEM certificate and its matching private key ({reason}; --tls-cert/--tls-key)"
        ) from None
    loose = _loose_mode(Path(key))
    if loose:
        log.warning("%s: the TLS private key is readable by other users (mode %s): chmod 600 it", key, loose)
    return str(cert), str(key)


def check_exposure(host: str, token: str | None, tls: bool, insecure: bool) -> None:
    """Refuse to listen beyond loopback without a token unless ``insecure``; warn about clear text."""
    if is_loopback(host):
        return
    if not token:
        if not insecure:
            raise ServeError(
                f"--host {host} answers other machines, and there is no token: give --token-file "
                "(or $STEELDEFECT_TOKEN), or --insecure to let anyone on the network use the service"
            )
        log.warning("listening on %s without a token (--insecure): anyone on the network can use the service", host)
    elif not tls:
        log.warning(
            "listening on %s over plain HTTP: the token crosses the network readable; use --tls-cert/--tls-key", host
        )


def build_server(
    model: Path,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int | None = None,
    threads: int | None = 1,
    token: str | None = None,
    token_file: Path | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    insecure: bool = False,
    **app_options: Any,
):
    """Check the exposure, load the model, log the start line; the ``uvicorn.Server`` ready to run.

    ``token=None`` reads ``token_file``, then :data:`TOKEN_ENV`; an empty token means none.
    """
    require_extra()
    import uvicorn

    token = resolve_token(token, token_file)
    tls = check_tls(tls_cert, tls_key)
    check_exposure(host, token, tls is not None, insecure)
    max_pixels = app_options.get("max_pixels", DEFAULT_MAX_PIXELS)
    if PILLOW_PIXEL_CEILING and max_pixels > PILLOW_PIXEL_CEILING:
        raise ServeError(
            f"--max-pixels {max_pixels} is above Pillow's own limit of {PILLOW_PIXEL_CEILING} pixels, which "
            "refuses such images anyway"
        )
    workers = default_workers() if workers is None else workers
    app = create_app(model, workers=workers, threads=threads, token=token, **app_options)
    info: ModelInfo = app.state.model_info
    audit_path = app_options.get("audit_path", DEFAULT_AUDIT_PATH)
    audit_keep = app_options.get("audit_keep", DEFAULT_KEEP)
    audit_fsync = app_options.get("audit_fsync", False)
    queue_size = app_options.get("queue_size", DEFAULT_QUEUE)
    max_upload_bytes = app_options.get("max_upload_bytes", DEFAULT_MAX_UPLOAD_BYTES)
    from steeldefect.runtime.backends import runtime_name

    shown_host = f"[{host}]" if ":" in host else host
    log.info(
        "steeldefect serve: %s (%s on %s, sha256 %s, %d classes, %dx%d) on %s://%s:%d, %d worker(s) x %s "
        "thread(s), queue %d, audit %s, token %s, upload limit %.1f MiB, pixel limit %d",
        info.path,
        info.variant,
        runtime_name(info.path),
        info.sha256[:12],
        len(info.class_names),
        *info.input_size,
        "https" if tls else "http",
        shown_host,
        port,
        workers,
        threads if threads else "all",
        queue_size,
        f"{audit_path} (keep {audit_keep} rows{', fsync' if audit_fsync else ''})" if audit_path else "off",
        "required" if token else "off",
        max_upload_bytes / 2**20,
        max_pixels,
    )
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=10,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
    return uvicorn.Server(config)


def serve(model: Path, **options: Any) -> None:
    """Load the model, then answer HTTP(S) on ``host:port`` until interrupted (SIGINT/SIGTERM).

    The options are :func:`build_server`'s and :func:`steeldefect.serve.service.create_app`'s.
    """
    build_server(model, **options).run()


def mebibytes(value: float) -> int:
    """``--max-upload-mb`` in bytes."""
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"--max-upload-mb must be a positive number, got {value}")
    return int(value * 2**20)
