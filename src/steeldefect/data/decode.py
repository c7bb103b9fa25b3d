"""One image file or upload -> a (height, width, 3) uint8 RGB array, decoded by content, whatever its
mode, resized bilinearly. Training, prediction and the service all decode here, so a deployed model
sees the same pixels it was trained on."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from steeldefect.data.dataset import SUPPORTED_FORMATS, DatasetError


class BadImage(Exception):
    pass


def decode_file(path: Path) -> Image.Image:
    """Open ``path`` by content and decode it fully; raise :class:`BadImage` with a readable reason."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadImage(f"cannot read file ({error.strerror or error})") from error
    return decode_bytes(data)


def decode_bytes(data: bytes) -> Image.Image:
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        image.load()  # Image.open is lazy; truncation and corrupt data only show up here
    except UnidentifiedImageError as error:
        looks_like = _sniff_format(data)
        if looks_like:
            raise BadImage(
                f"corrupt {looks_like} data: the file starts like a {looks_like} but cannot be parsed"
            ) from error
        raise BadImage(
            f"not an image: content is not {', '.join(SUPPORTED_FORMATS)} (the file extension is ignored)"
        ) from error
    except Image.DecompressionBombError as error:
        raise BadImage(f"image too large to decode safely ({error})") from error
    except Exception as error:  # noqa: BLE001 - any decoder failure is a property of this one file
        if "truncated" in str(error).lower():
            raise BadImage(f"truncated image data ({error})") from error
        raise BadImage(f"corrupt image data, cannot decode ({type(error).__name__}: {error})") from error
    return image


_MAGIC_BYTES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG", "PNG"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _sniff_format(data: bytes) -> str | None:
    # Only to word the error: a damaged JPEG deserves a different hint than a text file named .jpg.
    return next((name for magic, name in _MAGIC_BYTES if data.startswith(magic)), None)


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any stored mode -> 8-bit RGB, alpha dropped, pixels otherwise as stored (no EXIF rotation:
    defect crops have no 'up', and honouring tags would make one file decode differently per tool)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I"):
        # 16-bit grey (I;16*, and I as Pillow opens some 16-bit files): full range 0..65535 -> 0..255.
        values = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        # Pillow's own F -> L convention: values are taken as 0..255 and clipped.
        values = np.asarray(image, dtype=np.float64)
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise BadImage(f"unsupported image mode {image.mode!r} ({error})") from error


def to_array(image: Image.Image, image_size: tuple[int, int]) -> np.ndarray:
    height, width = image_size
    return np.asarray(_to_rgb(image).resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def read_image(path: str | os.PathLike, image_size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """One image exactly as :func:`load_images` prepares it: (height, width, 3) uint8 RGB.

    For prediction, so a deployed model sees the same pixels it was trained on. Raises
    :class:`DatasetError` (``"<path>: <problem>"``) for a file that cannot be decoded.
    """
    path = Path(path)
    try:
        return to_array(decode_file(path), (int(image_size[0]), int(image_size[1])))
    except BadImage as problem:
        raise DatasetError(f"{path}: {problem}") from None


def decode_image(data: bytes, image_size: tuple[int, int] = (224, 224), name: str = "image") -> np.ndarray:
    """:func:`read_image` for bytes already in memory (an HTTP upload): the same decoding and resizing.

    Raises :class:`DatasetError` (``"<name>: <problem>"``) for bytes that cannot be decoded.
    """
    try:
        return to_array(decode_bytes(bytes(data)), (int(image_size[0]), int(image_size[1])))
    except BadImage as problem:
        raise DatasetError(f"{name}: {problem}") from None


def pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
