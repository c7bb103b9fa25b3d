"""The service's model side: which file to serve, a pool of warmed-up interpreters, and the admission
bound in front of them.

A LiteRT interpreter is not thread-safe, so the service keeps ``workers`` classifiers, each used by one
executor thread at a time. At most ``workers + queue`` requests are admitted at once; the next one is
answered 503 at once instead of waiting behind a queue that only grows.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from steeldefect.data.decode import decode_image
from steeldefect.runtime.litert import ModelFileError
from steeldefect.runtime.modelfile import Classifier, Judgement, ModelInfo
from steeldefect.serve.errors import Reject

log = logging.getLogger("steeldefect.serve.service")  # one logger name for the whole service

T = TypeVar("T")


def resolve_model(model: Path) -> Path:
    """A model file (.tflite, .onnx, .xml) as given, or a run folder's deployable int8 model (the one
    the line should run)."""
    from steeldefect.core.runfolder import deployable_model

    model = Path(model)
    if model.is_dir():
        try:
            chosen = deployable_model(model)
        except (FileNotFoundError, ValueError, KeyError) as error:
            raise ModelFileError(f"{model}: no deployable model in this run folder ({error})") from error
        log.info("run folder %s: serving its deployable model %s", model, chosen)
        return chosen
    from steeldefect.runtime.backends import EXPORTED, is_model_file

    if not is_model_file(model):
        raise ModelFileError(f"{model}: serve runs an exported model ({EXPORTED}) or a run folder (export first)")
    return model


class ClassifierPool:
    """``size`` classifiers of one model, each warmed up by one inference; one caller per instance."""

    def __init__(
        self, model_path: Path, info: ModelInfo, size: int, threads: int | None, accept: float | None = None
    ) -> None:
        if size < 1:
            raise ValueError(f"workers must be >= 1, got {size}")
        self._idle: queue.SimpleQueue[Classifier] = queue.SimpleQueue()
        blank = np.zeros((1, *info.input_size, 3), np.uint8)
        for _ in range(size):
            classifier = Classifier(model_path, threads, info, accept=accept)
            classifier.probabilities(blank)  # first invoke pays XNNPACK's packing: not a client's latency
            self._idle.put(classifier)
        self.size = size

    def judge(self, image: np.ndarray) -> Judgement:
        """Probabilities, uncertain flag and calibrated confidence of one image (a batch of one)."""
        classifier = self._idle.get()  # never waits: executor threads == classifiers
        try:
            return classifier.judge(image[None])
        finally:
            self._idle.put(classifier)


def warm_up_decoders(size: tuple[int, int]) -> None:
    """Decode one small image of each format: Pillow loads its plugins on first use, which would
    otherwise slow down the first client's answer."""
    import io

    from PIL import Image

    for fmt in ("JPEG", "PNG", "BMP", "TIFF"):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buffer, format=fmt)
        decode_image(buffer.getvalue(), size, "warm-up")


def default_workers() -> int:
    """One single-threaded interpreter per core: the most images/s once several clients send at once
    (decoding runs beside inference). A lone client gets lower latency from ``workers=1, threads=0``."""
    return os.cpu_count() or 1


class Admission:
    """At most ``limit`` jobs in flight; one more is refused with 503 before any of its work starts.

    ``retry_after()`` (default: 1) is the ``Retry-After`` seconds a refused client is told.
    """

    def __init__(self, limit: int, gauge: Any = None, retry_after: Callable[[], int] | None = None) -> None:
        self.limit, self.gauge, self.retry_after = limit, gauge, retry_after
        self.in_flight = 0

    async def run(self, start_job: Callable[[], Awaitable[T]]) -> T:
        """Await ``start_job()`` if fewer than the bound are in flight, else 503 before any work starts."""
        if self.in_flight >= self.limit:
            retry = max(1, self.retry_after()) if self.retry_after else 1
            raise Reject(
                503, f"busy: {self.limit} requests already in progress; retry shortly", {"Retry-After": str(retry)}
            )
        self.in_flight += 1
        if self.gauge is not None:
            self.gauge.inc()
        try:
            return await start_job()
        finally:
            self.in_flight -= 1
            if self.gauge is not None:
                self.gauge.dec()
