"""Find, validate and decode the images of a steel-defect dataset (:mod:`steeldefect.data.inspection`
describes a dataset for a person).

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

Decoding one file or upload lives in :mod:`steeldefect.data.decode` (``read_image``, ``decode_image``);
a whole dataset's arrays, through the decoded-image cache, in :mod:`steeldefect.data.loading`
(``load_images``, ``image_infos``). :func:`candidate_files` is the file walk above, shared with callers
that collect files themselves.

Problems are collected, never raised one at a time: a :class:`DatasetError` lists every problem found,
one line each, naming the file or folder concerned.
"""

from __future__ import annotations

import functools
import hashlib
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
    # Only for a dataset merged from several roots (merge_datasets): each file's name, "root<k>/<path
    # relative to the k-th root>", since no single root holds them all. None: relative to ``root``.
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        labels = np.array(self.labels, dtype=np.int64).reshape(-1)
        # Read-only so that a frozen dataset cannot have its labels changed under a cached split.
        labels.setflags(write=False)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.names is not None:
            object.__setattr__(self, "names", tuple(self.names))
            if len(self.names) != len(self.paths):
                raise ValueError(f"{len(self.paths)} paths but {len(self.names)} names")
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
        if self.names is not None:
            return self.names
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
            names=None if self.names is None else tuple(self.names[i] for i in positions),
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


def scan_dataset(
    root: str | os.PathLike, *, skip_bad: bool = False, min_per_class: int = 1, alone: bool = True
) -> Dataset:
    """Find the images under ``root``, work out the layout and the label of every file.

    Nothing is decoded here. Raises :class:`DatasetError` listing together every problem found: a missing
    or image-less folder, flat files whose names are neither NEU-DET nor NEU-CLS names, empty class
    folders, and classes with fewer than ``min_per_class`` images (callers pass the number of
    cross-validation folds). With ``skip_bad=True`` unrecognised file names are skipped with a
    :class:`BadImageWarning` instead; folder and class-count problems still raise. ``alone=False``
    (a root to be merged with others, :func:`scan_datasets`) leaves the class counts to the merged
    dataset: a folder of reviewed images may hold one class, or a few images of one.
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

    if not alone:
        return dataset
    problems = count_problems(dataset, min_per_class, class_dirs)
    if layout == "folders" and len(class_names) == 1:
        problems.append(
            f"{root}: only one class folder ({class_names[0]!r}); a classifier needs at least two "
            f"(for NEU images every file name must look like crazing_12.jpg or Cr_12.bmp)"
        )
    if problems:
        raise DatasetError(problems)
    return dataset


def scan_datasets(
    roots: Sequence[str | os.PathLike], *, skip_bad: bool = False, min_per_class: int = 1
) -> tuple[Dataset, tuple[Dataset, ...]]:
    """Several dataset roots as one (``train --data A --data B``) and each root's own dataset.

    One root is exactly :func:`scan_dataset`. Several are scanned each in its own layout, then
    merged by :func:`merge_datasets`; the class counts are checked on the merged dataset, so a root
    may hold only some classes (a folder of reviewed images, say)."""
    if not roots:
        raise DatasetError("no dataset folder given")
    if len(roots) == 1:
        dataset = scan_dataset(roots[0], skip_bad=skip_bad, min_per_class=min_per_class)
        return dataset, (dataset,)
    parts = tuple(scan_dataset(root, skip_bad=skip_bad, alone=False) for root in roots)
    merged = merge_datasets(parts)
    problems = count_problems(merged, min_per_class)
    if len(merged.class_names) == 1:
        problems.append(f"{', '.join(str(p.root) for p in parts)}: only one class in all; a classifier needs two")
    if problems:
        raise DatasetError(problems)
    return merged, parts


def merge_datasets(parts: Sequence[Dataset]) -> Dataset:
    """One dataset of every file of ``parts``: classes are the union by name (sorted, as always), a
    file is named ``root<k>/<its name in part k>`` (k from 1, in the order given) and files are in
    the documented order (label, then name). The same folder given twice is refused."""
    roots = [part.root for part in parts]
    twice = sorted({str(root) for root in roots if roots.count(root) > 1})
    if twice:
        raise DatasetError(f"{root}: given twice as --data" for root in twice)
    class_names = tuple(sorted({name for part in parts for name in part.class_names}))
    label_of = {name: label for label, name in enumerate(class_names)}
    rows = [
        (label_of[part.class_names[label]], f"root{k}/{name}", path)
        for k, part in enumerate(parts, start=1)
        for path, label, name in zip(part.paths, part.labels, part.relative_names)
    ]
    rows.sort(key=lambda row: (row[0], _natural_key(row[1])))
    return Dataset(
        root=parts[0].root,
        layout="merged",
        paths=tuple(row[2] for row in rows),
        labels=np.array([row[0] for row in rows], dtype=np.int64),
        class_names=class_names,
        names=tuple(row[1] for row in rows),
    )


def root_records(merged: Dataset, parts: Sequence[Dataset], image_size: tuple[int, int]) -> list[dict[str, Any]]:
    """Each root of a merged dataset as the run folder records it: where, its layout, its own
    fingerprint and counts, over the files the merged dataset kept (``skip_bad`` may drop some)."""
    kept = set(merged.paths)
    records = []
    for part in parts:
        mine = part.subset(np.array([path in kept for path in part.paths], dtype=bool))
        records.append(
            {
                "root": str(part.root),
                "layout": part.layout,
                "fingerprint": dataset_fingerprint(mine, image_size),
                "n_images": len(mine),
                "counts": {name: count for name, count in mine.counts().items() if count},
            }
        )
    return records


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


def count_problems(
    dataset: Dataset, min_per_class: int, class_dirs: dict[str, Path] | None = None, *, after_skip: bool = False
) -> list[str]:
    problems = []
    suffix = " after skipping unreadable files" if after_skip else ""
    for name, count in dataset.counts().items():
        if dataset.layout == "merged":
            where = f"class {name!r} (all --data folders together)"
        elif dataset.layout == "folders":
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
    digests, unreadable = hash_files(dataset.paths)
    if unreadable:
        raise DatasetError(f"{dataset.paths[i]}: {problem}" for i, problem in sorted(unreadable.items()))
    return fingerprint_of(dataset, image_size, digests)


def hash_files(paths: Sequence[Path]) -> tuple[list[str | None], dict[int, str]]:
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


def fingerprint_of(dataset: Dataset, image_size: tuple[int, int], digests: Sequence[str | None]) -> str:
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
