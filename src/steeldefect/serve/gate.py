"""The ASGI gate in front of the service's app: Prometheus metrics for every request, the bearer
token, and the request body limit (declared and streamed)."""

from __future__ import annotations

import hmac
import time

from steeldefect.runtime.modelfile import ModelInfo

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", "/inspector.js", "/inspector.css"})


class Metrics:
    """Prometheus series for one app (own registry, so several apps in one process stay apart)."""

    def __init__(self, info: ModelInfo) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "steeldefect_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "steeldefect_request_seconds",
            "Request latency in the server",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        self.predictions = Counter(
            "steeldefect_predictions", "Answered predictions by top-1 class", ["class"], registry=self.registry
        )
        self.in_flight = Gauge(
            "steeldefect_in_flight", "Prediction requests admitted and not yet answered", registry=self.registry
        )
        self.model = Gauge(
            "steeldefect_model",
            "The served model (value 1; 0 for a model swapped out)",
            ["name", "variant", "sha256"],
            registry=self.registry,
        )
        self.model.labels(info.name, info.variant, info.sha256).set(1)
        for name in info.class_names:  # every class present from the start: a rate of 0 is a signal too
            self.predictions.labels(name)


class BodyTooLarge(Exception):
    pass


def too_large_message(limit: int, flag: str = "--max-upload-mb") -> str:
    return f"upload too large: the limit is {limit} bytes ({limit / 2**20:.1f} MiB, {flag})"


class Gate:
    """ASGI wrapper in front of the app: metrics for every request, the bearer token, the body limit.

    The limit is checked on the declared Content-Length and again while the body streams in (a
    chunked upload has none), so an oversize upload is refused before it is held in memory.
    """

    def __init__(
        self,
        app,
        *,
        token: str | None,
        max_body: int,
        metrics: Metrics,
        known_paths: set[str],
        error,
        path_limits: dict[str, int] | None = None,
    ) -> None:
        self.app, self.token, self.default_max_body, self.metrics = app, token, max_body, metrics
        self.path_limits = path_limits or {}  # e.g. a model upload may be larger than an image
        self.known_paths, self.error = known_paths, error
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.known_paths else "other"
        started = time.perf_counter()
        status = {"code": 500}
        sent = {"start": False}

        async def send_tracking(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                sent["start"] = True
            await send(message)

        limit = self.path_limits.get(path, self.default_max_body)
        try:
            rejection = self._check(scope, limit)
            if rejection is not None:
                await rejection(scope, receive, send_tracking)
                return
            await self.app(scope, self._limited(receive, limit), send_tracking)
        except BodyTooLarge:
            if not sent["start"]:
                await self._too_large(scope, limit)(scope, receive, send_tracking)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _too_large(self, scope, limit: int):
        flag = "--max-model-mb" if scope["path"] in self.path_limits else "--max-upload-mb"
        return self.error(413, too_large_message(limit, flag), scope)

    def _check(self, scope, limit: int):
        headers = dict(scope["headers"])
        if self.token and scope["path"] not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.token}".encode()):
                response = self.error(
                    401, f"{'wrong' if given else 'missing'} bearer token: send 'Authorization: Bearer <token>'", scope
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                return response
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return self.error(400, "Content-Length is not a number", scope)
            if declared > limit:
                return self._too_large(scope, limit)
        return None

    def _limited(self, receive, limit: int):
        received = 0

        async def wrapped():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        return wrapped
