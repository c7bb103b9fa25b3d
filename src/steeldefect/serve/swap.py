"""Hot model swap: ``POST /v1/model`` (an uploaded .tflite, behind the token) and ``POST /v1/model/rollback``.

An uploaded model is untrusted input. It is written atomically into the service's private models
folder as ``<sha256>.tflite`` (never under a client's name), then checked before it serves anything:
its metadata must read (:func:`read_model_info`: class names, input size, the uncertainty rule), its
input size must be the served model's, and every interpreter of its pool must answer one warm-up
inference. Only then is the slot switched, one assignment under a lock: a request takes the served
model once when it starts and finishes on it, so in-flight requests end on the old model while new
ones start on the new, and every audit row names the model that answered it. A failed check, a
corrupt file or a full disk is one JSON error line, and the old model keeps serving.

The previous model stays loaded, so ``POST /v1/model/rollback`` switches back at once (it swaps the
two: rolling back twice returns to the newer model).
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from steeldefect.core.files import atomic_write_bytes, file_digest
from steeldefect.runtime.litert import ModelFileError
from steeldefect.runtime.modelfile import ModelInfo, read_model_info

log = logging.getLogger("steeldefect.serve.service")

TFLITE_IDENTIFIER = b"TFL3"  # a TFLite flatbuffer's file identifier, bytes 4..8
DEFAULT_MAX_MODEL_BYTES = 256 * 2**20


class SwapError(Exception):
    """A swap refused: ``status`` for the HTTP answer, the message names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Served:
    """One loaded model: its description, its warmed-up interpreters and what it adds to answers."""

    info: ModelInfo
    pool: Any  # serve.pool.ClassifierPool
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the model's drift monitor

    @property
    def fields(self) -> dict[str, str]:
        return {"name": self.info.name, "variant": self.info.variant, "sha256": self.info.sha256}


class ModelSlot:
    """The served model and the one before it; ``current`` is read once per request."""

    def __init__(
        self,
        first: Served,
        build: Callable[[Path, ModelInfo], Served],
        folder: Path | None,
        on_switch: Callable[[Served, Served], None] | None = None,
    ) -> None:
        self.current: Served = first
        self.previous: Served | None = None
        self._build, self.folder, self._on_switch = build, folder, on_switch
        self._swap_lock = threading.Lock()  # one upload is loaded and checked at a time

    def install(self, data: bytes, source: str = "upload") -> Served:
        """Store, check and switch to an uploaded model (blocking: call it from a worker thread)."""
        if self.folder is None:
            raise SwapError(404, "model upload is off (server started without a models folder)")
        if len(data) < 8 or data[4:8] != TFLITE_IDENTIFIER:
            raise SwapError(
                422, f"{source}: not a TFLite model file (no TFL3 identifier); still serving {self.current.info.name}"
            )
        if not self._swap_lock.acquire(blocking=False):
            raise SwapError(409, "another model upload is being checked; retry when it is done")
        try:
            import hashlib

            sha256 = hashlib.sha256(data).hexdigest()
            path = self.folder / f"{sha256}.tflite"
            if sha256 == self.current.info.sha256:
                raise SwapError(409, f"{source}: this model (sha256 {sha256[:12]}) is already serving")
            try:
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                if not (path.is_file() and file_digest(path) == sha256):
                    atomic_write_bytes(path, data)
            except OSError as error:
                reason = "the disk is full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else str(error)
                raise SwapError(
                    507,
                    f"cannot store the uploaded model in {self.folder} ({reason}); still serving "
                    f"{self.current.info.name}",
                ) from None
            try:
                info = read_model_info(path)
                if info.input_size != self.current.info.input_size:
                    raise ModelFileError(
                        f"input size {info.input_size[0]}x{info.input_size[1]} differs from the served model's "
                        f"{self.current.info.input_size[0]}x{self.current.info.input_size[1]}"
                    )
                served = self._build(path, info)  # every interpreter answers one warm-up inference
            except (ModelFileError, ValueError, RuntimeError, OSError) as error:
                path.unlink(missing_ok=True)
                message = str(error).replace(str(path), source)
                raise SwapError(422, f"model refused: {message}; still serving {self.current.info.name}") from None
            self._switch(served, "upload")
            return served
        finally:
            self._swap_lock.release()

    def rollback(self) -> Served:
        """Serve the previous model again (the current one becomes the previous)."""
        with self._swap_lock:
            if self.previous is None:
                raise SwapError(409, "no previous model to roll back to")
            self._switch(self.previous, "rollback")
            return self.current

    def _switch(self, new: Served, how: str) -> None:
        old = self.current
        self.current, self.previous = new, old  # one assignment each: a request sees one or the other
        if self._on_switch is not None:
            self._on_switch(old, new)
        log.info(
            "model %s: now serving %s (sha256 %s, %d classes), was %s (sha256 %s)",
            how,
            new.info.name,
            new.info.sha256[:12],
            len(new.info.class_names),
            old.info.name,
            old.info.sha256[:12],
        )

    def describe(self) -> dict[str, Any]:
        return {"current": self.current.fields, "previous": None if self.previous is None else self.previous.fields}
