"""One image file or upload -> a (height, width, 3) uint8 RGB array, decoded by content, whatever its
mode, resized bilinearly. Training, prediction and the service all decode here, so a deployed model
sees the same pixels it was trained on.

Every path refuses an image whose header declares more than ``max_pixels`` pixels (default
:data:`DEFAULT_MAX_PIXELS`) before any pixel is decoded: a few-KB PNG can declare a 60000x60000
canvas, which would decode to 10 GB. Pillow's own bomb check (a warning past ``Image.MAX_IMAGE_PIXELS``,
an error past twice that) stays as it is: changing that module-wide value would change it for every
thread and every other user of Pillow in the process."""

from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from steeldefect.data.dataset import SUPPORTED_FORMATS, DatasetError

# 50 MP: twice the largest area-scan camera a strip line sensibly uses (25 MP, 5120x5120) and 3x a
# 16 MP line-scan frame (8192x2048); NEU crops are 0.04 MP. Decoded as RGB that is 150 MB, so the
# limit also bounds what one decode can hold in memory. Pillow's own hard limit (2 x its
# MAX_IMAGE_PIXELS, 179 MP by default) stays the ceiling: an image past it is refused by Pillow.
DEFAULT_MAX_PIXELS = 50_000_000
# Image.open raises DecompressionBombError past this (None when a program switched Pillow's check off).
PILLOW_PIXEL_CEILING = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None


class BadImage(Exception):
    pass


class TooManyPixels(BadImage):
    """The header declares more pixels than the limit; nothing was decoded."""


class PixelLimitError(DatasetError):
    """:class:`DatasetError` for an image refused by the pixel limit (a service answers it 413)."""


def _too_many(pixels: str, limit: int) -> TooManyPixels:
    return TooManyPixels(f"image too large to decode: {pixels} pixels, the limit is {limit:,} pixels")


def decode_file(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``path`` by content and decode it fully; raise :class:`BadImage` with a readable reason."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise BadImage(f"cannot read file ({error.strerror or error})") from error
    return decode_bytes(data, max_pixels)


def decode_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` fully, refusing (:class:`TooManyPixels`) before decoding when the header declares
    more than ``max_pixels`` pixels."""
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)  # reads the header only
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many(f"{width}x{height} = {width * height:,}", max_pixels)
        image.load()  # Image.open is lazy; truncation and corrupt data only show up here
    except BadImage:
        raise
    except UnidentifiedImageError as error:
        looks_like = _sniff_format(data)
        if looks_like:
            raise BadImage(
                f"corrupt {looks_like} data: the file starts like a {looks_like} but cannot be parsed"
            ) from error
        raise BadImage(
            f"not an image: content is not {', '.join(SUPPORTED_FORMATS)} (the file extension is ignored)"
        ) from error
    except Image.DecompressionBombError as error:  # past Pillow's ceiling: refused in Image.open itself
        declared = re.search(r"\((\d+) pixels\)", str(error))
        ceiling = PILLOW_PIXEL_CEILING or max_pixels
        pixels = f"{int(declared.group(1)):,}" if declared else f"more than {ceiling:,}"
        raise _too_many(pixels, min(max_pixels, ceiling)) from error
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
    """``image`` as (height, width, 3) uint8 RGB, resized bilinearly to ``image_size``."""
    height, width = image_size
    rgb = _to_rgb(image)
    red, green, blue = rgb.split()
    if red.tobytes() == green.tobytes() == blue.tobytes():
        # A grey picture stored as RGB (NEU's JPEGs, most line cameras'): Pillow resamples every band
        # alike, so resizing one band and repeating it gives the same bytes at about half the cost
        # (resizing three bands was 0.9 of a NEU image's 1.7 decoding CPU ms).
        rgb = red.resize((width, height), Image.Resampling.BILINEAR).convert("RGB")
        return np.asarray(rgb, dtype=np.uint8)
    return np.asarray(rgb.resize((width, height), Image.Resampling.BILINEAR), dtype=np.uint8)


def read_image(
    path: str | os.PathLike, image_size: tuple[int, int] = (224, 224), max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """One image exactly as :func:`load_images` prepares it: (height, width, 3) uint8 RGB.

    For prediction, so a deployed model sees the same pixels it was trained on. Raises
    :class:`DatasetError` (``"<path>: <problem>"``) for a file that cannot be decoded, and
    :class:`PixelLimitError` for one that declares more than ``max_pixels`` pixels.
    """
    path = Path(path)
    try:
        return to_array(decode_file(path, max_pixels), (int(image_size[0]), int(image_size[1])))
    except TooManyPixels as problem:
        raise PixelLimitError(f"{path}: {problem}") from None
    except BadImage as problem:
        raise DatasetError(f"{path}: {problem}") from None


def decode_image(
    data: bytes,
    image_size: tuple[int, int] = (224, 224),
    name: str = "image",
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """:func:`read_image` for bytes already in memory (an HTTP upload): the same decoding and resizing.

    Raises :class:`DatasetError` (``"<name>: <problem>"``) for bytes that cannot be decoded, and
    :class:`PixelLimitError` for bytes that declare more than ``max_pixels`` pixels.
    """
    try:
        return to_array(decode_bytes(bytes(data), max_pixels), (int(image_size[0]), int(image_size[1])))
    except TooManyPixels as problem:
        raise PixelLimitError(f"{name}: {problem}") from None
    except BadImage as problem:
        raise DatasetError(f"{name}: {problem}") from None


def pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
