"""The service's inference workers: a pool of warmed-up classifiers of one model, one per executor
thread (a LiteRT interpreter is not thread-safe), the default count, and the Pillow warm-up that
keeps the first client's answer from paying for plugin loading. Used by :mod:`steeldefect.serve.service`."""

from __future__ import annotations

import os
import queue
from pathlib import Path

import numpy as np

from steeldefect.data.decode import decode_image
from steeldefect.runtime.modelfile import Classifier, Judgement, ModelInfo


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


def _warm_up_decoders(size: tuple[int, int]) -> None:
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
