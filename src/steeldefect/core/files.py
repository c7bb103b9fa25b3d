"""Atomic file writes, file hashing and the cache locations (ours and Keras').

Every file the pipeline writes goes through these helpers: a run killed mid-write leaves either the
old file or the new one, never a truncated one that a resumed run would trust.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np


def default_cache_dir() -> Path:
    """Where decoded images and backbone features are cached (``$STEELDEFECT_CACHE`` overrides)."""
    env = os.environ.get("STEELDEFECT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "steeldefect"


def keras_home() -> Path:
    """Keras' cache root, by the rule ``keras.utils.get_file`` applies when it downloads.

    ``$KERAS_HOME`` when the variable is set, else ``~/.keras``; ``/tmp/.keras`` when the home folder is
    not writable or ``KERAS_HOME`` is set but empty (Keras takes the empty string as a path it cannot
    write to). Read at each call, not at import as Keras does, so a changed environment is seen.
    """
    fallback = Path("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()) / ".keras"
    if "KERAS_HOME" in os.environ:
        value = os.environ["KERAS_HOME"]
        return Path(value).expanduser() if value else fallback
    home = os.path.expanduser("~")
    return Path(home) / ".keras" if os.access(home, os.W_OK) else fallback


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in chunks (weight files are tens of MB)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place. A failure
    (a full disk, say) leaves the old file, removes the temporary one and names ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from error
    try:
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(path)) from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_save(path: str | os.PathLike, save: Callable[[str], None], suffix: str) -> Path:
    """Atomic write for libraries that write a file themselves (Keras' ``model.save``,
    ``save_weights``) and insist on a suffix, so the temporary file must carry it too."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        save(tmp)
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file (0o666 minus the umask). mkstemp makes its files 0o600,
    which would leave every run folder and model unreadable to anyone but their creator."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # no other way to read it; set straight back
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], fieldnames: Sequence[str] | None = None
) -> Path:
    rows = list(rows)
    if fieldnames is None:
        fieldnames = list(rows[0].keys()) if rows else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return atomic_write_text(path, buffer.getvalue())


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return atomic_write_bytes(path, buffer.getvalue())


def save_npz(path: str | os.PathLike, *arrays: np.ndarray, **named: np.ndarray) -> Path:
    """``np.savez`` written atomically (positional arrays are stored as arr_0, arr_1, ...)."""
    buffer = io.BytesIO()
    np.savez(buffer, *arrays, **named)  # type: ignore[arg-type]  # numpy's stub: a key could be allow_pickle
    return atomic_write_bytes(path, buffer.getvalue())


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def sidecar_path(model_path: Path) -> Path:
    """Metadata file that travels with a model: class names, input size, provenance."""
    return Path(str(model_path) + ".json")
