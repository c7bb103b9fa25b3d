"""Defect boxes: Pascal VOC annotation files (NEU-DET's format), read and turned into cell masks.

A box annotation says where on an image the defect is. Two things use them: an attention head
learns from the training images' boxes where to look (``train --head attention --boxes DIR``), and
``bench/pointing_game.py`` scores heatmaps against the test images' boxes.

Annotation files come from elsewhere, so they are untrusted input: a file that is not well-formed
VOC raises :class:`AnnotationError` naming it. (The standard library's parser is used: Python 3.11's
expat refuses entity-expansion bombs, and VOC files need no DTDs or external entities.)
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Rasterisation steps per cell edge when a cell's covered fraction is computed.
_SUBCELL = 16


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names it."""


@dataclass(frozen=True)
class Boxes:
    """The defect boxes of one image in VOC pixel coordinates (1-based, inclusive): (xmin, ymin, xmax, ymax)
    each, on an image of ``width`` x ``height`` pixels."""

    width: int
    height: int
    boxes: tuple[tuple[float, float, float, float], ...]


def _number(element: ET.Element, key: str) -> float:
    text = element.findtext(key)
    if text is None:  # a missing element: refused like a non-numeric one
        raise TypeError(f"no {key}")
    return float(text)


def read_voc(path: str | Path) -> Boxes:
    """The boxes of one Pascal VOC file (every ``object/bndbox``; its ``size`` gives the image size)."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        raise AnnotationError(f"{path}: not a readable Pascal VOC file ({error})") from None
    try:
        width = int(_number(root, "size/width"))
        height = int(_number(root, "size/height"))
        boxes = tuple(
            (_number(box, "xmin"), _number(box, "ymin"), _number(box, "xmax"), _number(box, "ymax"))
            for box in root.iter("bndbox")
        )
    except (TypeError, ValueError):
        raise AnnotationError(f"{path}: a Pascal VOC file needs size/width, size/height and numeric boxes") from None
    if width <= 0 or height <= 0:
        raise AnnotationError(f"{path}: image size {width}x{height} is not positive")
    for xmin, ymin, xmax, ymax in boxes:
        if not (1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height):
            raise AnnotationError(f"{path}: box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) lies outside {width}x{height}")
    return Boxes(width, height, boxes)


def box_mask(boxes: Boxes, grow: int = 0) -> np.ndarray:
    """(height, width) bool mask of the boxes at the annotation's own resolution, each grown by ``grow``
    pixels on every side (clipped to the image)."""
    mask = np.zeros((boxes.height, boxes.width), bool)
    for xmin, ymin, xmax, ymax in boxes.boxes:
        top, left = max(0, int(ymin) - 1 - grow), max(0, int(xmin) - 1 - grow)
        mask[top : min(boxes.height, int(ymax) + grow), left : min(boxes.width, int(xmax) + grow)] = True
    return mask


def cell_coverage(boxes: Boxes, grid: tuple[int, int]) -> np.ndarray:
    """(rows, cols) fraction of each cell of a ``grid`` laid over the whole image that the boxes cover.

    A feature map cell of a CNN sees the same share of a resized image as of the original, so the
    coverage does not depend on the model's input size."""
    rows, cols = grid
    fine = np.zeros((rows * _SUBCELL, cols * _SUBCELL), bool)
    # VOC pixel k covers [k - 1, k) in continuous coordinates; sample the fine grid at its centres.
    y = (np.arange(rows * _SUBCELL) + 0.5) * boxes.height / (rows * _SUBCELL)
    x = (np.arange(cols * _SUBCELL) + 0.5) * boxes.width / (cols * _SUBCELL)
    for xmin, ymin, xmax, ymax in boxes.boxes:
        fine |= ((y >= ymin - 1) & (y < ymax))[:, None] & ((x >= xmin - 1) & (x < xmax))[None, :]
    return fine.reshape(rows, _SUBCELL, cols, _SUBCELL).mean(axis=(1, 3)).astype(np.float32)


def annotation_path(folder: str | Path, image: str | Path) -> Path:
    """The annotation file of ``image``: same name, ``.xml``, in ``folder``."""
    return Path(folder) / (Path(image).stem + ".xml")


def cell_masks(folder: str | Path, images: Sequence[str | Path], grid: tuple[int, int]) -> np.ndarray:
    """(N, rows * cols) box coverage per image and cell; all zeros for an image with no annotation
    file or no box (such an image teaches nothing about where to look)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise AnnotationError(f"{folder}: box folder not found")
    masks = np.zeros((len(images), grid[0] * grid[1]), np.float32)
    for i, image in enumerate(images):
        path = annotation_path(folder, image)
        if path.is_file():
            masks[i] = cell_coverage(read_voc(path), grid).ravel()
    return masks
