"""What the service's modules share about failing: the start-up error, the per-request JSON error,
the check that the serve extra is installed, and log lines a client cannot forge.

Log sanitising: a client controls filenames, paths, form fields and header values, and some of them
end up in log lines. :class:`OneLineLogs` (installed on the service's loggers at import) rewrites every
record of those loggers into one line with each non-printable character (``\\n``, ``\\r``, the ANSI ESC,
every other C0/C1 control, Unicode format characters such as bidi overrides) written as a visible
escape (``\\n``, ``\\x1b``, ``\\u202e``), and cuts it at :data:`MAX_LOG_CHARS`. So a filename cannot
start a fake log line or recolour a terminal, whatever message a later change logs it in.
"""

from __future__ import annotations

import logging

EXTRA_HINT = 'steeldefect serve needs the serve extra: pip install "steeldefect[serve]"'


class ServeError(RuntimeError):
    """The service cannot start (missing extra, bad model or audit path): one line for the user."""


LOGGER_NAMES = ("steeldefect.serve.service", "steeldefect.serve.audit")  # every logger of the service
MAX_LOG_CHARS = 2000


class Reject(Exception):
    """A request answered with a 4xx/5xx JSON error naming the problem.

    ``detail`` goes to the server's log line only (a server path, a library's error), never to the client.
    """

    def __init__(
        self, status: int, message: str, headers: dict[str, str] | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.headers, self.detail = status, message, headers or {}, detail


def one_line(text: object, limit: int = MAX_LOG_CHARS) -> str:
    """``text`` as one printable line: each non-printable character as its escape, cut at ``limit``."""
    text = str(text)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text) - limit} more characters)"
    return text


class OneLineLogs(logging.Filter):
    """Rewrite each record as its :func:`one_line` message (the arguments merged in first)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = one_line(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


def _install_filter() -> None:
    for name in LOGGER_NAMES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OneLineLogs) for f in logger.filters):
            logger.addFilter(OneLineLogs())


_install_filter()


def require_extra() -> None:
    """Raise :class:`ServeError` (one line) when a package of the serve extra is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ServeError(f"{EXTRA_HINT} ({error.name} is not installed)") from None
