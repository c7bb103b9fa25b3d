"""Find, validate and decode the images of a steel-defect dataset (the decoded arrays are cached by
:mod:`steeldefect.imagecache`; :mod:`steeldefect.inspection` describes a dataset for a person).

Three layouts are recognised by :func:`scan_dataset`:

``"neu-det"``
    Every image is named like the NEU-DET release, ``crazing_12.jpg``, ``rolled-in_scale_3.jpg``; the
    class comes from the name, and the files may sit in sub-folders (``IMAGES/``).
``"neu-cls"``
    Every image is named like the NEU-CLS release, ``Cr_12.bmp``, ``RS_3.bmp``; prefixes map to the same
    six classes as NEU-DET.
``"folders"``
    One first-level sub-folder per class (any name, spaces allowed); images may be nested deeper.

For both NEU layouts the class names are always the six of :data:`CLASS_NAMES_NEU`, so a label means
the same class in every NEU dataset even when a class is missing (which is then reported as an error).

Order is fixed and documented because splits, caches and exported label files all rely on it: class
names are sorted with Python's string sort and a label is the index into that order; files are sorted by
label, then by the natural order of their path relative to the root (``crazing_2`` before
``crazing_10``).

Hidden files and folders, ``__MACOSX`` folders and text-like side files (README*, LICENSE*,
SHA256SUMS*, ``*.txt *.md *.csv *.json *.yaml *.yml *.sha256 *.md5 *.xml``) are ignored. Every other
file is a candidate image and is decoded by content, so a mislabelled or broken file is reported rather
than silently skipped.

:func:`read_image` prepares a single file exactly as :func:`load_images` does (for prediction), and
:func:`candidate_files` is the file walk above, shared with callers that collect files themselves.

Problems are collected, never raised one at a time: a :class:`DatasetError` lists every problem found,
one line each, naming the file or folder concerned.

Where the per-image information lives: :func:`image_infos` decodes each file at its original size and
returns one :class:`ImageInfo` (relative name, width, height, stored mode, pixel hash) per image;
:func:`steeldefect.inspection.inspect_dataset` uses it to find exact duplicates. :func:`load_images` records the same
information for the images it keeps under ``"images"`` in the JSON file next to its cached array.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from steeldefect.files import default_cache_dir
from steeldefect.imagecache import read_cache, write_cache

logger = logging.getLogger(__name__)

CLASS_NAMES_NEU: tuple[str, ...] = (
    "crazing",
    "inclusion",
    "patches",
    "pitted_surface",
    "rolled-in_scale",
    "scratches",
)
NEU_CLS_PREFIXES: dict[str, str] = {
    "Cr": "crazing",
    "In": "inclusion",
    "Pa": "patches",
    "PS": "pitted_surface",
    "RS": "rolled-in_scale",
    "Sc": "scratches",
}
NEU_DET_PATTERN = re.compile(
    r"^(crazing|inclusion|patches|pitted_surface|rolled-in_scale|scratches)_(\d+)\.[A-Za-z0-9]+$"
)
NEU_CLS_PATTERN = re.compile(r"^(Cr|In|Pa|PS|RS|Sc)_(\d+)\.[A-Za-z0-9]+$")

# Pillow is restricted to these decoders: with every plugin enabled, a text file can parse as a valid
# PBM/XPM image and slip through as a "picture".
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF")

_IGNORED_PREFIXES = ("readme", "license", "sha256sums")
# .xml is here because the public NEU-DET release ships Pascal-VOC annotations (crazing_1.xml, ...)
# beside the images, and those names would otherwise match the NEU-DET image pattern.
_IGNORED_SUFFIXES = (".txt", ".md", ".csv", ".json", ".yaml", ".yml", ".sha256", ".md5", ".xml")
# Zip archives made on macOS carry a __MACOSX folder of resource forks that would look like a class.
_IGNORED_DIRS = ("__MACOSX",)

# Bumped whenever decoding changes the pixels it produces, so fingerprints (and every cache keyed by
# them, including backbone features elsewhere) can never mix old and new pixels.
_DECODER_VERSION = 1

Layout = Literal["folders", "neu-det", "neu-cls"]


class DatasetError(Exception):
    """One or more problems with a dataset; ``str(error)`` has one line per problem."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems: list[str] = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class BadImageWarning(UserWarning):
    """Files skipped because of ``skip_bad=True``; the message lists each one."""


class SymlinkWarning(UserWarning):
    """A symlink in a dataset was skipped: a loop back to a folder above it, or a dangling link."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """The files of a dataset and their labels, in the documented fixed order.

    ``eq=False`` because element-wise array equality has no single truth value; compare
    ``relative_names`` and ``labels`` explicitly.
    """

    root: Path
    layout: str  # "folders" | "neu-det" | "neu-cls"
    paths: tuple[Path, ...]
    labels: np.ndarray  # int64, index into class_names
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64).reshape(-1)
        # Read-only so that a frozen dataset cannot have its labels changed under a cached split.
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if len(self.paths) != len(labels):
            raise ValueError(f"{len(self.paths)} paths but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(f"labels must lie in 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def relative_names(self) -> tuple[str, ...]:
        """Paths relative to ``root`` as POSIX strings: stable across machines, used in caches and CSVs.

        Cached (paths never change on a frozen dataset) because fingerprints and cache checks ask for it
        repeatedly, and ``Path.relative_to`` is slow over thousands of files."""
        return tuple(_relative_name(path, self.root) for path in self.paths)

    def counts(self) -> dict[str, int]:
        """Images per class, for every class name (zero included), in class order."""
        per_label = np.bincount(self.labels, minlength=len(self.class_names))
        return {name: int(count) for name, count in zip(self.class_names, per_label)}

    def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
        """The dataset restricted to ``indices`` (integer positions or a boolean mask), same class names."""
        positions = np.arange(len(self.paths))[np.asarray(indices)]
        return Dataset(
            root=self.root,
            layout=self.layout,
            paths=tuple(self.paths[i] for i in positions),
            labels=self.labels[positions],
            class_names=self.class_names,
        )


@dataclass(frozen=True)
class ImageInfo:
    """What an image is as stored: ``pixel_hash`` is equal exactly when the decoded pixels are."""

    name: str  # relative name, as in Dataset.relative_names
    width: int
    height: int
    mode: str
    pixel_hash: str


# --------------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------------


def scan_dataset(root: str | os.PathLike, *, skip_bad: bool = False, min_per_class: int = 1) -> Dataset:
    """Find the images under ``root``, work out the layout and the label of every file.

    Nothing is decoded here. Raises :class:`DatasetError` listing together every problem found: a missing
    or image-less folder, flat files whose names are neither NEU-DET nor NEU-CLS names, empty class
    folders, and classes with fewer than ``min_per_class`` images (callers pass the number of
    cross-validation folds). With ``skip_bad=True`` unrecognised file names are skipped with a
    :class:`BadImageWarning` instead; folder and class-count problems still raise.
    """
    root = Path(os.path.abspath(Path(root).expanduser()))
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")

    candidates = candidate_files(root)
    if not candidates:
        raise DatasetError(
            f"{root}: no image files found (hidden files and text files such as README or *.txt are ignored)"
        )

    names = [path.name for path in candidates]
    det_matches = sum(bool(NEU_DET_PATTERN.match(name)) for name in names)
    cls_matches = sum(bool(NEU_CLS_PATTERN.match(name)) for name in names)
    flat_files = [path for path in candidates if path.parent == root]

    layout: Layout
    unknown: list[Path] = []
    if det_matches == len(candidates):
        layout = "neu-det"
    elif cls_matches == len(candidates):
        layout = "neu-cls"
    elif flat_files:
        # Files straight in the root can only be labelled by name. Which names count as unknown
        # depends on what the rest looks like: mostly NEU names -> the odd ones out; otherwise a
        # class-folder tree with stray files (or a flat folder of arbitrary names) -> the flat files.
        if det_matches and det_matches >= cls_matches:
            layout = "neu-det"
            unknown = [p for p in candidates if not NEU_DET_PATTERN.match(p.name)]
        elif cls_matches:
            layout = "neu-cls"
            unknown = [p for p in candidates if not NEU_CLS_PATTERN.match(p.name)]
        else:
            layout = "folders"
            unknown = flat_files
    else:
        layout = "folders"

    if unknown:
        if layout == "folders":
            reason = (
                "file directly in the dataset folder whose name is neither a NEU-DET name (crazing_12.jpg) "
                "nor a NEU-CLS name (Cr_12.bmp), so its class is unknown; put images in one sub-folder per class"
            )
        else:
            example = "crazing_12.jpg" if layout == "neu-det" else "Cr_12.bmp"
            reason = (
                f"name does not follow the {layout.upper()} pattern (like {example}) of the other "
                f"{len(candidates) - len(unknown)} files, so its class is unknown"
            )
        lines = [f"{path}: {reason}" for path in unknown]
        if not skip_bad:
            raise DatasetError(lines)
        warnings.warn(
            f"skipping {len(unknown)} file(s) with unrecognised names:\n" + "\n".join(lines),
            BadImageWarning,
            stacklevel=2,
        )
        unknown_set = set(unknown)
        candidates = [p for p in candidates if p not in unknown_set]
        if not candidates:
            raise DatasetError(f"{root}: no image files left after skipping files with unrecognised names")

    class_dirs: dict[str, Path] = {}
    if layout == "neu-det":
        class_names = CLASS_NAMES_NEU
        class_of = [NEU_DET_PATTERN.match(p.name).group(1) for p in candidates]  # type: ignore[union-attr]
    elif layout == "neu-cls":
        class_names = CLASS_NAMES_NEU
        class_of = [NEU_CLS_PREFIXES[NEU_CLS_PATTERN.match(p.name).group(1)] for p in candidates]  # type: ignore[union-attr]
    else:
        class_dirs = _class_dirs(root)
        class_names = tuple(sorted(class_dirs))
        class_of = [p.relative_to(root).parts[0] for p in candidates]

    labels_by_name = {name: label for label, name in enumerate(class_names)}
    labels = [labels_by_name[name] for name in class_of]
    order = sorted(range(len(candidates)), key=lambda i: (labels[i], _natural_key(_relative_name(candidates[i], root))))
    dataset = Dataset(
        root=root,
        layout=layout,
        paths=tuple(candidates[i] for i in order),
        labels=np.array([labels[i] for i in order], dtype=np.int64),
        class_names=class_names,
    )

    problems = _count_problems(dataset, min_per_class, class_dirs)
    if layout == "folders" and len(class_names) == 1:
        problems.append(
            f"{root}: only one class folder ({class_names[0]!r}); a classifier needs at least two "
            f"(for NEU images every file name must look like crazing_12.jpg or Cr_12.bmp)"
        )
    if problems:
        raise DatasetError(problems)
    return dataset


def candidate_files(root: Path) -> list[Path]:
    """Every non-ignored file under ``root`` (hidden folders and text side files skipped), unsorted.

    Symlinks are followed and every real file is returned once: at its real location when that lies
    inside ``root`` (so ``patches/inc_link -> ../inclusion`` adds nothing to ``patches`` and takes
    nothing from ``inclusion``), else at the first link reaching it in name order (a link to a file or
    folder outside ``root`` counts where the link is). A link back to a folder it sits in (a loop) and
    a dangling link are skipped with a :class:`SymlinkWarning`; an unreadable folder is a DatasetError.
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    found: dict[str, Path] = {}  # real path -> the path returned for it
    # Depth first with an explicit stack (no recursion limit); each entry carries the real paths of the
    # folders above it, which is what tells a loop (a link to an ancestor) from a second way in.
    stack: list[tuple[Path, tuple[str, ...]]] = [(root, (real_root,))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as scan:
                entries = sorted(scan, key=lambda entry: entry.name)
        except OSError as error:
            raise DatasetError(f"{folder}: cannot read folder ({error.strerror or error})") from None
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_dir():
                if _is_ignored_dir(entry.name):
                    continue
                real = os.path.realpath(path)
                if real in ancestors:
                    warnings.warn(f"{path}: symlink loop (leads back to {real}); skipped", SymlinkWarning, stacklevel=2)
                    continue
                subfolders.append((path, (*ancestors, real)))
            elif entry.is_file():
                if is_ignored_file(entry.name):
                    continue
                real = os.path.realpath(path)
                own = _own_path(real, real_root, root, is_file=True)
                if own is not None:
                    found[real] = own
                else:
                    found.setdefault(real, path)
            elif entry.is_symlink():
                warnings.warn(
                    f"{path}: dangling symlink (target missing or a loop); skipped", SymlinkWarning, stacklevel=2
                )
        stack.extend(reversed(subfolders))  # popped in name order, so "first link" is well defined
    return list(found.values())


def _own_path(real: str, real_root: str, root: Path, *, is_file: bool) -> Path | None:
    """``real``'s path under ``root`` when it lies inside the dataset where the walk sees it itself
    (not hidden, not under an ignored folder), else None."""
    relative = os.path.relpath(real, real_root)
    if relative == os.curdir:
        return root
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return None
    *folders, name = Path(relative).parts
    if any(_is_ignored_dir(part) for part in folders) or (is_ignored_file(name) if is_file else _is_ignored_dir(name)):
        return None
    return root / relative


def _class_dirs(root: Path) -> dict[str, Path]:
    """First-level class folders; a symlink to a folder inside the dataset is an alias, not a class."""
    real_root = os.path.realpath(root)
    return {
        entry.name: entry
        for entry in root.iterdir()
        if entry.is_dir()
        and not _is_ignored_dir(entry.name)
        and not (entry.is_symlink() and _own_path(os.path.realpath(entry), real_root, root, is_file=False) is not None)
    }


def _is_ignored_dir(name: str) -> bool:
    return name.startswith(".") or name in _IGNORED_DIRS


def is_ignored_file(name: str) -> bool:
    """True for hidden files and text-like side files (README, SHA256SUMS, *.txt, ...) that are never images."""
    lower = name.lower()
    return name.startswith(".") or lower.startswith(_IGNORED_PREFIXES) or lower.endswith(_IGNORED_SUFFIXES)


def _relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _natural_key(text: str) -> tuple[Any, ...]:
    # re.split with a capturing group alternates text and digit runs, so positions always hold the
    # same type and tuples compare cleanly; the raw text breaks ties such as "a01" vs "a1".
    parts = re.split(r"(\d+)", text)
    return tuple(int(part) if i % 2 else part for i, part in enumerate(parts)) + (text,)


def _count_problems(
    dataset: Dataset, min_per_class: int, class_dirs: dict[str, Path] | None = None, *, after_skip: bool = False
) -> list[str]:
    problems = []
    suffix = " after skipping unreadable files" if after_skip else ""
    for name, count in dataset.counts().items():
        if dataset.layout == "folders":
            where = f"{(class_dirs or {}).get(name, dataset.root / name)}: class folder"
        else:
            where = f"{dataset.root}: class {name!r} (files named {name}_<n>.<ext>)"
        if count == 0:
            problems.append(f"{where} contains no image files{suffix}")
        elif count < min_per_class:
            problems.append(
                f"{where} has only {count} image(s){suffix}; at least {min_per_class} are needed "
                f"(at least one test image and one per cross-validation fold)"
            )
    return problems


# --------------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------------


def dataset_fingerprint(dataset: Dataset, image_size: tuple[int, int]) -> str:
    """SHA-256 hex over layout, class names, every file's relative name, label and content hash, and
    ``image_size`` (plus a decoder version), so any change to the data or its labels changes it.

    Paths are relative, so moving the dataset folder keeps caches valid.
    """
    digests, unreadable = _hash_files(dataset.paths)
    if unreadable:
        raise DatasetError(f"{dataset.paths[i]}: {problem}" for i, problem in sorted(unreadable.items()))
    return _fingerprint(dataset, image_size, digests)


def _hash_files(paths: Sequence[Path]) -> tuple[list[str | None], dict[int, str]]:
    digests: list[str | None] = []
    unreadable: dict[int, str] = {}
    for i, path in enumerate(paths):
        try:
            with open(path, "rb") as handle:
                digests.append(hashlib.file_digest(handle, "sha256").hexdigest())
        except OSError as error:
            digests.append(None)
            unreadable[i] = f"cannot read file ({error.strerror or error})"
    return digests, unreadable


def _fingerprint(dataset: Dataset, image_size: tuple[int, int], digests: Sequence[str | None]) -> str:
    payload = {
        "decoder": _DECODER_VERSION,
        "layout": dataset.layout,
        "class_names": list(dataset.class_names),
        "image_size": [int(image_size[0]), int(image_size[1])],
        "files": [
            [name, int(label), digest or "unreadable"]
            for name, label, digest in zip(dataset.relative_names, dataset.labels, digests)
        ],
    }
    encoded = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


# --------------------------------------------------------------------------------------------------
# Decoding and the image cache
# --------------------------------------------------------------------------------------------------


class _BadImage(Exception):
    pass


def _decode(path: Path) -> Image.Image:
    """Open ``path`` by content and decode it fully; raise :class:`_BadImage` with a readable reason."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise _BadImage(f"cannot read file ({error.strerror or error})") from error
    return _decode_bytes(data)


def _decode_bytes(data: bytes) -> Image.Image:
    if not data:
        raise _BadImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
        image.load()  # Image.open is lazy; truncation and corrupt data only show up here
    except UnidentifiedImageError as error:
        looks_like = _sniff_format(data)
        if looks_like:
            raise _BadImage(
                f"corrupt {looks_like} data: the file starts like a {looks_like} but cannot be parsed"
            ) from error
        raise _BadImage(
            f"not an image: content is not {', '.join(SUPPORTED_FORMATS)} (the file extension is ignored)"
        ) from error
    except Image.DecompressionBombError as error:
        raise _BadImage(f"image too large to decode safely ({error})") from error
    except Exception as error:  # noqa: BLE001 - any decoder failure is a property of this one file
        if "truncated" in str(error).lower():
            raise _BadImage(f"truncated image data ({error})") from error
        raise _BadImage(f"corrupt image data, cannot decode ({type(error).__name__}: {error})") from error
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
        raise _BadImage(f"unsupported image mode {image.mode!r} ({error})") from error


def _to_array(image: Image.Image, image_size: tuple[int, int]) -> np.ndarray:
    height, width = image_size
    return np.asarray(_to_rgb(image).resize((width, height), Image.BILINEAR), dtype=np.uint8)


def read_image(path: str | os.PathLike, image_size: tuple[int, int] = (224, 224)) -> np.ndarray:
    """One image exactly as :func:`load_images` prepares it: (height, width, 3) uint8 RGB.

    For prediction, so a deployed model sees the same pixels it was trained on. Raises
    :class:`DatasetError` (``"<path>: <problem>"``) for a file that cannot be decoded.
    """
    path = Path(path)
    try:
        return _to_array(_decode(path), (int(image_size[0]), int(image_size[1])))
    except _BadImage as problem:
        raise DatasetError(f"{path}: {problem}") from None


def decode_image(data: bytes, image_size: tuple[int, int] = (224, 224), name: str = "image") -> np.ndarray:
    """:func:`read_image` for bytes already in memory (an HTTP upload): the same decoding and resizing.

    Raises :class:`DatasetError` (``"<name>: <problem>"``) for bytes that cannot be decoded.
    """
    try:
        return _to_array(_decode_bytes(bytes(data)), (int(image_size[0]), int(image_size[1])))
    except _BadImage as problem:
        raise DatasetError(f"{name}: {problem}") from None


def _pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def _decode_all(
    dataset: Dataset,
    image_size: tuple[int, int] | None,
    *,
    progress: bool,
    known_bad: dict[int, str] | None = None,
) -> tuple[np.ndarray | None, list[ImageInfo | None], dict[int, str]]:
    """Decode every file; ``image_size=None`` collects infos only. Bad files never stop the loop."""
    bad = dict(known_bad or {})
    infos: list[ImageInfo | None] = [None] * len(dataset)
    images = None
    if image_size is not None:
        height, width = image_size
        images = np.zeros((len(dataset), height, width, 3), dtype=np.uint8)
    names = dataset.relative_names
    for i, path in enumerate(tqdm(dataset.paths, desc="decoding images", unit="img", disable=not progress)):
        if i in bad:
            continue
        try:
            image = _decode(path)
            info = ImageInfo(names[i], image.width, image.height, image.mode, _pixel_hash(image))
            if images is not None:
                images[i] = _to_array(image, (height, width))
        except _BadImage as problem:
            bad[i] = str(problem)
        else:
            infos[i] = info
    return images, infos, bad


def decode_infos(dataset: Dataset, *, progress: bool = False) -> tuple[list[ImageInfo | None], dict[int, str]]:
    """Every file's :class:`ImageInfo` (None where bad) and the bad files (index -> problem), without
    raising: for reports that describe a dataset as it is."""
    _, infos, bad = _decode_all(dataset, None, progress=progress)
    return infos, bad


def image_infos(dataset: Dataset, *, skip_bad: bool = False, progress: bool = False) -> list[ImageInfo]:
    """Size, stored mode and pixel hash of every image at its original size, in dataset order.

    Bad files raise one :class:`DatasetError` listing them all, or with ``skip_bad`` are left out
    (with a :class:`BadImageWarning`).
    """
    _, infos, bad = _decode_all(dataset, None, progress=progress)
    _report_bad(dataset, bad, skip_bad)
    return [info for info in infos if info is not None]


def load_images(
    dataset: Dataset,
    *,
    image_size: tuple[int, int] = (224, 224),
    cache_dir: str | os.PathLike | bool | None = None,
    skip_bad: bool = False,
    progress: bool = True,
    min_per_class: int = 1,
) -> tuple[Dataset, np.ndarray]:
    """Decode every image to RGB uint8, resized (bilinear) to ``image_size = (height, width)``.

    Returns the dataset actually loaded (the input, or with ``skip_bad`` the input minus bad files) and
    an array of shape (N, height, width, 3). Bad files raise one :class:`DatasetError` listing all of
    them, ``"<path>: <problem>"`` per line; with ``skip_bad`` they are dropped with a
    :class:`BadImageWarning`, and the class counts are checked again (empty, or below ``min_per_class``).

    The result is cached under ``<cache_dir>/images/<fingerprint[:16]>-<H>x<W>.npy`` with a ``.json``
    beside it (full fingerprint, kept files, bad files, and an :class:`ImageInfo` per kept image under
    ``"images"``). The key is :func:`dataset_fingerprint`, so changed bytes, names or labels miss the
    cache. A cache hit returns a copy-on-write :class:`numpy.memmap` of the ``.npy`` (an ndarray
    subclass: writable, but changes stay in memory). ``cache_dir=None`` (or ``True``) uses
    :func:`steeldefect.files.default_cache_dir`; ``False`` disables it.
    """
    height, width = (int(image_size[0]), int(image_size[1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"image_size must be two positive integers (height, width), got {image_size!r}")

    digests, unreadable = _hash_files(dataset.paths)
    fingerprint = _fingerprint(dataset, (height, width), digests)
    cache_files = None
    if cache_dir is not False:
        # True is accepted as "on, default place" because callers pass a --cache/--no-cache flag.
        base = default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir)
        stem = f"{fingerprint[:16]}-{height}x{width}"
        cache_files = (base / "images" / f"{stem}.npy", base / "images" / f"{stem}.json")

    cached = read_cache(cache_files, dataset, fingerprint, (height, width)) if cache_files else None
    if cached is not None:
        kept_images, bad = cached
    else:
        images, infos, bad = _decode_all(dataset, (height, width), progress=progress, known_bad=unreadable)
        assert images is not None
        keep = np.array([i not in bad for i in range(len(dataset))], dtype=bool)
        kept_images = images if keep.all() else images[keep]
        if cache_files:
            # Cached even when bad files are present, so a rerun with skip_bad=True is instant.
            write_cache(cache_files, dataset, fingerprint, (height, width), kept_images, infos, bad)

    _report_bad(dataset, bad, skip_bad)
    if not bad:
        return dataset, kept_images
    loaded = dataset.subset([i for i in range(len(dataset)) if i not in bad])
    problems = _count_problems(loaded, min_per_class, after_skip=True)
    if problems:
        raise DatasetError(problems)
    return loaded, kept_images


def _report_bad(dataset: Dataset, bad: dict[int, str], skip_bad: bool) -> None:
    if not bad:
        return
    lines = [f"{dataset.paths[i]}: {problem}" for i, problem in sorted(bad.items())]
    if not skip_bad:
        raise DatasetError(lines)
    warnings.warn(
        f"skipping {len(lines)} unreadable image file(s):\n" + "\n".join(lines), BadImageWarning, stacklevel=3
    )
