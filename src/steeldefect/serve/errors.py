"""What the service's modules share about failing: the start-up error, the per-request JSON error,
and the check that the serve extra is installed."""

from __future__ import annotations

EXTRA_HINT = 'steeldefect serve needs the serve extra: pip install "steeldefect[serve]"'


class ServeError(RuntimeError):
    """The service cannot start (missing extra, bad model or audit path): one line for the user."""


class Reject(Exception):
    """A request answered with a 4xx/5xx JSON error naming the problem."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def require_extra() -> None:
    """Raise :class:`ServeError` (one line) when a package of the serve extra is missing."""
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as error:
        raise ServeError(f"{EXTRA_HINT} ({error.name} is not installed)") from None
