"""What a person needs to know about a dataset before training on it: layout, class counts, image
sizes and modes, bad files, the split it would get, and exact duplicates (`steeldefect data inspect`).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from typing import Any

from steeldefect.data.dataset import scan_dataset
from steeldefect.data.loading import decode_infos
from steeldefect.data.splits import make_splits


def inspect_dataset(
    root: str | os.PathLike, *, test_fraction: float = 0.15, n_folds: int = 5, seed: int = 42
) -> dict[str, Any]:
    """Describe a dataset as a JSON-serialisable dict, without stopping at bad files.

    Keys: ``root, layout, n_images, class_names, class_counts, image_sizes`` (``"WxH" -> count``),
    ``image_modes``, ``bad_files`` (relative name -> problem), ``split`` (the split of
    :func:`steeldefect.data.splits.make_splits` with these arguments over the readable images, or
    ``split_error``) and ``duplicate_groups``: one entry per set of files with identical decoded pixels,
    with each file's class and split role (``test`` / ``fold<k>``), whether the group straddles the
    train/test split (``straddles_split``) or different validation folds (``straddles_folds``), and
    whether its files carry different labels (``conflicting_labels``).
    """
    dataset = scan_dataset(root)
    infos, bad = decode_infos(dataset)
    readable = dataset.subset([i for i in range(len(dataset)) if i not in bad])
    readable_infos = [info for info in infos if info is not None]
    names = readable.relative_names

    report: dict[str, Any] = {
        "root": str(dataset.root),
        "layout": dataset.layout,
        "n_images": len(dataset),
        "class_names": list(dataset.class_names),
        "class_counts": dataset.counts(),
        "image_sizes": dict(Counter(f"{info.width}x{info.height}" for info in readable_infos).most_common()),
        "image_modes": dict(Counter(info.mode for info in readable_infos).most_common()),
        "bad_files": {dataset.relative_names[i]: problem for i, problem in sorted(bad.items())},
    }

    roles: list[str] | None = None
    try:
        splits = make_splits(
            readable.labels, test_fraction=test_fraction, n_folds=n_folds, seed=seed, class_names=readable.class_names
        )
    except ValueError as error:
        report["split_error"] = str(error)
    else:
        roles = [splits.role_of(i) for i in range(len(readable))]
        report["split"] = {
            "seed": seed,
            "test_fraction": test_fraction,
            "n_folds": n_folds,
            "n_test": int(len(splits.test_indices)),
            "n_train": int(len(splits.train_indices)),
            "test_per_class": readable.subset(splits.test_indices).counts(),
            "val_per_fold": [int(len(val)) for _, val in splits.folds],
        }

    groups: dict[str, list[int]] = defaultdict(list)
    for i, info in enumerate(readable_infos):
        groups[info.pixel_hash].append(i)
    duplicates = []
    for members in groups.values():
        if len(members) < 2:
            continue
        member_roles = [roles[i] for i in members] if roles else None
        duplicates.append(
            {
                "files": [names[i] for i in members],
                "classes": [readable.class_names[readable.labels[i]] for i in members],
                "roles": member_roles,
                "straddles_split": bool(
                    member_roles and "test" in member_roles and any(r != "test" for r in member_roles)
                ),
                # Within training, copies in different folds validate on an image they also train on.
                "straddles_folds": bool(member_roles and len({r for r in member_roles if r != "test"}) > 1),
                "conflicting_labels": len({int(readable.labels[i]) for i in members}) > 1,
            }
        )
    report["duplicate_groups"] = duplicates
    return report


def format_inspection(report: dict[str, Any]) -> str:
    """Human-readable text for an :func:`inspect_dataset` report, warnings last."""
    lines = [
        f"Dataset: {report['root']}",
        f"Layout: {report['layout']}, {report['n_images']} files, {len(report['class_names'])} classes",
        "Images per class:",
    ]
    width = max((len(name) for name in report["class_counts"]), default=0)
    lines += [f"  {name:<{width}}  {count}" for name, count in report["class_counts"].items()]
    lines.append("Image sizes (width x height): " + _format_counts(report["image_sizes"]))
    lines.append("Image modes: " + _format_counts(report["image_modes"]))

    bad = report["bad_files"]
    lines.append(f"Unreadable files: {len(bad) or 'none'}")
    lines += [f"  {name}: {problem}" for name, problem in bad.items()]

    split = report.get("split")
    if split:
        per_class = split["test_per_class"].values()
        lines.append(
            f"Split (seed {split['seed']}, test fraction {split['test_fraction']}, {split['n_folds']} folds): "
            f"{split['n_test']} test ({min(per_class)}-{max(per_class)} per class), {split['n_train']} train, "
            f"validation per fold {', '.join(map(str, split['val_per_fold']))}"
        )
    else:
        lines.append(f"Split: not possible: {report.get('split_error')}")

    duplicates = report["duplicate_groups"]
    lines.append(f"Exact duplicates (identical decoded pixels): {len(duplicates) or 'none'}")
    for group in duplicates:
        roles = group["roles"] or [None] * len(group["files"])
        members = ", ".join(
            f"{name} [{cls}{', ' + role if role else ''}]"
            for name, cls, role in zip(group["files"], group["classes"], roles)
        )
        lines.append(f"  {members}")

    warnings_out = []
    for group in duplicates:
        if group["conflicting_labels"]:
            warnings_out.append(f"WARNING: identical images with different classes: {', '.join(group['files'])}")
        if group["straddles_split"]:
            tested = [n for n, r in zip(group["files"], group["roles"]) if r == "test"]
            trained = [n for n, r in zip(group["files"], group["roles"]) if r != "test"]
            warnings_out += [
                f"WARNING: duplicate images {a} and {b} fall on both sides of the train/test split"
                for a in tested
                for b in trained
            ]
        elif group["straddles_folds"]:
            folds = ", ".join(sorted(set(group["roles"])))
            warnings_out.append(
                f"NOTE: duplicate images {', '.join(group['files'])} are in different cross-validation "
                f"folds ({folds}): each of those folds trains on a copy of an image it validates"
            )
    if bad:
        warnings_out.append(f"WARNING: {len(bad)} unreadable file(s); training needs skip_bad to proceed")
    return "\n".join(lines + warnings_out)


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key}: {value}" for key, value in counts.items()) or "none"
