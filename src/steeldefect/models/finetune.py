"""Fine-tuning the backbone's top blocks, end to end from the best frozen head (``train --fine-tune N``).

What is trained: the top ``N`` blocks of the backbone (for EfficientNet-Lite0 ``block15`` is the top
block, ``block11..15`` the top five; the 1x1 ``head_conv`` that makes the 1280 feature maps belongs to
the top block) and the classifier head, starting from the head the frozen grid trained. Every
BatchNormalization layer stays frozen and in inference mode (``trainable = False``, which makes Keras
use the moving statistics even in a training step): with batches of 32 images of one steel strip,
batch statistics would be noisy and would move the ImageNet statistics the frozen part relies on.

How (chosen by measurement, ``bench/finetune_speed.py``): the frozen bottom of the backbone is a fixed
function in inference mode, so its output for an image depends only on the image. Its activations
(the input of the first unfrozen block) are computed once for ``views`` augmented views of every
training image and then only the top is trained on them, epoch ``e`` seeing view ``e mod views`` of
each image. With augmentation in the graph (augment -> bottom -> top), every epoch would run the whole
bottom again on fresh augmentations; caching moves the augmentation before the frozen part, which is
the same computation in inference mode, only with ``views`` fixed draws instead of a new draw per
epoch. The same cache serves every fold and the final model of a run.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm.auto import tqdm

from steeldefect.core import runfolder
from steeldefect.core.files import read_json, write_json
from steeldefect.core.metrics import classification_metrics
from steeldefect.data import augment
from steeldefect.models import backbones as backbone_registry
from steeldefect.models import training

log = logging.getLogger(__name__)

BATCH_SIZE = 32
DEFAULT_EPOCHS = 10
DEFAULT_LEARNING_RATE = 1e-4
_BLOCK_NAME = re.compile(r"^(block\d+[a-z]?)_")
# Layers after the last block that only turn its output into the feature maps (Lite0's head_conv,
# Keras EfficientNet's top_conv): trained with the top block, not counted as a block of their own.
_TOP_LAYERS = re.compile(r"^(head|top)_")


class FineTuneError(ValueError):
    """A fine-tuning request that cannot be carried out (too many blocks, an unsupported backbone)."""


@dataclass
class Block:
    name: str
    layers: list[keras.layers.Layer] = field(default_factory=list)


def backbone_blocks(backbone: keras.Model) -> list[Block]:
    """The backbone's blocks, bottom to top, each with its layers in graph order.

    Layers named ``block<i>_...`` (EfficientNet-Lite0, Keras' EfficientNet, VGG) form block ``<i>``;
    in a backbone without such names every layer with weights (other than BatchNormalization)
    starts a block of its own. Layers without weights and BatchNormalization layers join the block
    before them; ``head_*``/``top_*`` layers join the last block. Layers before the first block
    (input, rescaling, Lite0's stem) belong to no block: they are never fine-tuned.
    """
    nested = [layer.name for layer in backbone.layers if isinstance(layer, keras.Model)]
    if nested:
        raise FineTuneError(
            f"{backbone.name}: fine-tuning needs a backbone built as one flat model, this one wraps "
            f"{', '.join(nested)} (supported: efficientnet_lite0, efficientnetb0)"
        )
    named = any(_BLOCK_NAME.match(layer.name) for layer in backbone.layers)
    blocks: list[Block] = []
    for layer in backbone.layers:
        match = _BLOCK_NAME.match(layer.name)
        if named and match:
            if not blocks or blocks[-1].name != match.group(1):
                blocks.append(Block(match.group(1)))
        elif named and _TOP_LAYERS.match(layer.name) and blocks:
            pass  # joins the last block
        elif not named and layer.weights and not isinstance(layer, keras.layers.BatchNormalization):
            blocks.append(Block(layer.name))
        if blocks and (match or not named or _TOP_LAYERS.match(layer.name)):
            blocks[-1].layers.append(layer)
    return blocks


def check_blocks(backbone: keras.Model, n_blocks: int) -> list[Block]:
    """The top ``n_blocks`` blocks, or FineTuneError saying how many the backbone has."""
    blocks = backbone_blocks(backbone)
    if not 1 <= n_blocks <= len(blocks):
        raise FineTuneError(
            f"--fine-tune {n_blocks}: {backbone.name} has {len(blocks)} blocks, choose 1 to {len(blocks)}"
        )
    return blocks[-n_blocks:]


@dataclass
class SplitBackbone:
    """One backbone cut below its top blocks: ``bottom`` (frozen) -> ``top`` (fine-tuned). Both share
    their layers with ``backbone``, so training ``top`` changes ``backbone``."""

    backbone: keras.Model
    bottom: keras.Model
    top: keras.Model
    blocks: list[Block]

    @property
    def trained_layers(self) -> list[keras.layers.Layer]:
        return [
            layer
            for block in self.blocks
            for layer in block.layers
            if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)
        ]


def split_backbone(backbone: keras.Model, n_blocks: int) -> SplitBackbone:
    """Cut ``backbone`` at the input of its top ``n_blocks`` blocks and unfreeze their weights
    (BatchNormalization stays frozen)."""
    blocks = check_blocks(backbone, n_blocks)
    cut = blocks[0].layers[0].input
    bottom = keras.Model(backbone.input, cut, name=f"{backbone.name}_bottom")
    try:
        top = keras.Model(cut, backbone.output, name=f"{backbone.name}_top")
    except ValueError as error:  # a connection skipping over the cut: not a chain of blocks
        raise FineTuneError(f"{backbone.name}: cannot cut below {blocks[0].name} ({error})") from error
    split = SplitBackbone(backbone, bottom, top, blocks)
    for layer in backbone.layers:
        layer.trainable = False
    for layer in split.trained_layers:
        layer.trainable = True
    return split


def build_split(
    backbone_name: str,
    n_blocks: int,
    *,
    image_size: tuple[int, int],
    weights: str = "imagenet",
    preprocessing: str = "model",
    seed: int = 0,
) -> SplitBackbone:
    size = (image_size[0], image_size[1])
    backbone = backbone_registry.build_backbone(
        backbone_name, weights=weights, preprocessing=preprocessing, seed=seed, image_size=size
    )
    return split_backbone(backbone, n_blocks)


@dataclass
class Activations:
    """The frozen bottom's outputs for some images: ``views[v, r]`` is view ``v`` of image
    ``indices[r]`` (augmented), ``plain[r']`` the unaugmented image ``plain_indices[r']``."""

    indices: np.ndarray
    views: np.ndarray
    plain_indices: np.ndarray
    plain: np.ndarray
    seconds: float = 0.0

    def view_rows(self, image_indices: np.ndarray) -> np.ndarray:
        return _rows(self.indices, image_indices, "augmented")

    def plain_rows(self, image_indices: np.ndarray) -> np.ndarray:
        return _rows(self.plain_indices, image_indices, "plain")


def _rows(have: np.ndarray, wanted: np.ndarray, what: str) -> np.ndarray:
    position = {int(index): row for row, index in enumerate(have)}
    missing = [int(i) for i in wanted if int(i) not in position]
    if missing:
        raise ValueError(f"no {what} activations cached for image(s) {missing[:5]}")
    return np.array([position[int(i)] for i in wanted], dtype=np.int64)


def compute_activations(
    bottom: keras.Model,
    images: np.ndarray,
    augmented_indices: np.ndarray,
    plain_indices: np.ndarray,
    *,
    views: int,
    seed: int,
    batch_size: int = BATCH_SIZE,
    dtype: Any = np.float16,
    progress: bool = True,
) -> Activations:
    """Run the frozen bottom once over ``views`` augmented views of the images ``augmented_indices``
    (stored as ``dtype``: float16 halves the memory, and its rounding is far below the augmentation's
    own changes) and over the unaugmented images ``plain_indices`` (float32: validation/test, never
    augmented)."""
    started = time.perf_counter()
    augmented_indices = np.asarray(augmented_indices, dtype=np.int64)
    plain_indices = np.asarray(plain_indices, dtype=np.int64)
    shape = tuple(int(v) for v in bottom.output.shape[1:])
    out_views = np.empty((views, len(augmented_indices), *shape), dtype=dtype)
    out_plain = np.empty((len(plain_indices), *shape), dtype=np.float32)
    import tensorflow as tf

    height, width = (int(v) for v in images.shape[1:3])
    augmentation = augment.augmentation_model(seed, (height, width))
    # One traced function each: eager augmentation layers cost more than the bottom itself.
    plain = tf.function(lambda x: bottom(x, training=False), reduce_retracing=True)
    augmented = tf.function(lambda x: bottom(augmentation(x, training=True), training=False), reduce_retracing=True)
    total = views * len(augmented_indices) + len(plain_indices)
    with tqdm(total=total, desc="frozen bottom", unit="img", disable=not progress) as bar:
        # View after view, batch after batch in a fixed order from one seeded augmentation: the same
        # call gives the same views, so a resumed run trains on exactly what an uninterrupted one did.
        for view in range(views):
            for start in range(0, len(augmented_indices), batch_size):
                batch = images[augmented_indices[start : start + batch_size]].astype(np.float32)
                out_views[view, start : start + len(batch)] = np.asarray(augmented(batch)).astype(dtype)
                bar.update(len(batch))
        for start in range(0, len(plain_indices), batch_size):
            batch = images[plain_indices[start : start + batch_size]].astype(np.float32)
            out_plain[start : start + len(batch)] = np.asarray(plain(batch))
            bar.update(len(batch))
    return Activations(augmented_indices, out_views, plain_indices, out_plain, time.perf_counter() - started)


@dataclass
class FineTuneResult:
    model: keras.Model
    history: dict[str, list[float]]
    trained_layers: list[str]
    seconds: float
    images_per_second: float


def fine_tune_model(
    backbone_name: str,
    images_uint8: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    *,
    head_model: keras.Model,
    blocks: int,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    class_weight: np.ndarray | None = None,
    progress: bool = True,
    views: int | None = None,
    activations: Activations | None = None,
    weights: str = "imagenet",
    preprocessing: str = "model",
    batch_size: int = BATCH_SIZE,
    validation_idx: np.ndarray | None = None,
    details: dict[str, Any] | None = None,
) -> keras.Model:
    """Fine-tune the top ``blocks`` blocks of a fresh ``backbone_name`` together with a copy of
    ``head_model`` on the images ``train_idx``; returns the joined model (raw pixels 0..255 in,
    probabilities out), like a frozen run's fold model.

    ``learning_rate`` is Adam's starting rate, decayed to 0 by a cosine over the ``epochs``.
    ``views`` augmented views of each training image are cached (default: one per epoch); pass
    ``activations`` from :func:`compute_activations` to share them between calls (folds).
    ``validation_idx`` (needs plain activations for them) adds val_accuracy per epoch to the history.
    ``details``, when given, receives the history, trained layer names, time and images/s.
    """
    result = _fine_tune(
        backbone_name,
        images_uint8,
        labels,
        np.asarray(train_idx),
        head_model=head_model,
        blocks=blocks,
        learning_rate=learning_rate,
        epochs=epochs,
        seed=seed,
        class_weight=class_weight,
        progress=progress,
        views=views or epochs,
        activations=activations,
        weights=weights,
        preprocessing=preprocessing,
        batch_size=batch_size,
        validation_idx=validation_idx,
    )
    if details is not None:
        details.update(
            history=result.history,
            trained_layers=result.trained_layers,
            seconds=result.seconds,
            images_per_second=result.images_per_second,
        )
    return result.model


def _fine_tune(
    backbone_name: str,
    images: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    *,
    head_model: keras.Model,
    blocks: int,
    learning_rate: float,
    epochs: int,
    seed: int,
    class_weight: np.ndarray | None,
    progress: bool,
    views: int,
    activations: Activations | None,
    weights: str,
    preprocessing: str,
    batch_size: int,
    validation_idx: np.ndarray | None,
) -> FineTuneResult:
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    split = build_split(
        backbone_name, blocks, image_size=images.shape[1:3], weights=weights, preprocessing=preprocessing, seed=seed
    )
    if activations is None:
        activations = compute_activations(
            split.bottom,
            images,
            train_idx,
            validation_idx if validation_idx is not None else np.zeros(0, np.int64),
            views=views,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
    head = keras.models.clone_model(head_model)
    head.set_weights(head_model.get_weights())
    head.trainable = True
    model = keras.Model(split.top.input, head(split.top.output), name="fine_tune_top")
    variables = [v for layer in split.trained_layers for v in layer.trainable_weights] + list(head.trainable_weights)
    steps = epochs * -(-len(train_idx) // batch_size)
    # Cosine decay to 0 over the run: at a constant 1e-4 the fold validation accuracy of full NEU swung
    # by up to 3.6 points from one epoch to the next (docs/results.md, "Fine-tuning"), so which weights were
    # kept depended on where the last epoch happened to land.
    optimizer = keras.optimizers.Adam(learning_rate=keras.optimizers.schedules.CosineDecay(learning_rate, steps))
    optimizer.build(variables)
    loss_function = keras.losses.CategoricalCrossentropy()

    @tf.function(reduce_retracing=True)
    def train_step(x, y):
        with tf.GradientTape() as tape:
            probabilities = model(x, training=True)
            loss = loss_function(y, probabilities)
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, training._n_correct(y, probabilities)

    view_rows = activations.view_rows(train_idx)
    n_classes = int(head.output_shape[-1])
    y_all = keras.utils.to_categorical(labels[train_idx], n_classes).astype(np.float32)
    if class_weight is not None:
        y_all = y_all * np.asarray(class_weight, dtype=np.float32)[None, :]
    n_views = activations.views.shape[0]
    history: dict[str, list[float]] = {"loss": [], "accuracy": []}
    order = np.random.default_rng(seed)
    started = time.perf_counter()
    with tqdm(total=epochs * len(train_idx), desc=f"fine-tune top {blocks}", unit="img", disable=not progress) as bar:
        for epoch in range(epochs):
            x_view = activations.views[epoch % n_views]
            permutation = order.permutation(len(train_idx))
            loss_sum = correct = 0.0
            for start in range(0, len(permutation), batch_size):
                rows = permutation[start : start + batch_size]
                loss, n_correct = train_step(x_view[view_rows[rows]].astype(np.float32), y_all[rows])
                loss_sum += float(loss) * len(rows)
                correct += float(n_correct)
                bar.update(len(rows))
            history["loss"].append(loss_sum / len(train_idx))
            history["accuracy"].append(correct / len(train_idx))
            if validation_idx is not None and len(validation_idx):
                predicted = predict_top(model, activations.plain[activations.plain_rows(validation_idx)]).argmax(1)
                history.setdefault("val_accuracy", []).append(float((predicted == labels[validation_idx]).mean()))
            bar.set_postfix_str(f"loss {history['loss'][-1]:.3f} acc {history['accuracy'][-1]:.3f}")
    seconds = time.perf_counter() - started
    joined = training.join_model(split.backbone, head, name=f"{backbone_name}_fine_tuned")
    return FineTuneResult(
        joined,
        history,
        [layer.name for layer in split.trained_layers],
        seconds,
        epochs * len(train_idx) / max(seconds, 1e-9),
    )


def predict_top(model: keras.Model, activations: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """``model`` (top blocks + head) on bottom activations, in inference mode."""
    if len(activations) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    return np.concatenate(
        [
            np.asarray(model(activations[start : start + batch_size].astype(np.float32), training=False))
            for start in range(0, len(activations), batch_size)
        ]
    )


def top_of(joined: keras.Model, n_blocks: int) -> keras.Model:
    """The part of a joined (backbone + head) model above the cut: bottom activations -> probabilities."""
    # A joined model is the backbone's layers followed by the head, one nested model as the last layer.
    backbone = keras.Model(joined.input, joined.layers[-2].output, name=joined.name)
    blocks = check_blocks(backbone, n_blocks)
    return keras.Model(blocks[0].layers[0].input, joined.output)


def check_fine_tuned_agrees(
    joined: keras.Model, n_blocks: int, images: np.ndarray, plain: np.ndarray, *, atol: float = 1e-4
) -> dict[str, float]:
    """The joined model on images must reproduce top + head on the cached activations of the same
    images: what the test metrics were computed from is what gets saved and exported."""
    from_images = np.asarray(joined.predict(images.astype(np.float32), batch_size=BATCH_SIZE, verbose=0))
    from_cache = predict_top(top_of(joined, n_blocks), plain)
    max_diff = float(np.abs(from_images - from_cache).max()) if len(images) else 0.0
    same = float((from_images.argmax(1) == from_cache.argmax(1)).mean()) if len(images) else 1.0
    if same < 1.0 or max_diff > atol:
        raise AssertionError(
            f"fine-tuned model disagrees with its cached activations: {100 * (1 - same):.2f}% of predictions "
            f"differ, max probability difference {max_diff:.2e}"
        )
    return {"max_probability_difference": max_diff, "prediction_agreement": same}


# ----------------------------------------------------------------------------------------------
# In a run: every fold model and the final model, resumable per model.
# ----------------------------------------------------------------------------------------------


def check_fine_tune(name: str, options: Any) -> None:
    """Refuse, before any work, a ``--fine-tune N`` the backbone cannot do (more blocks than it has)."""
    if options.fine_tune:
        keras.backend.clear_session()
        # Random weights: the block structure is all that is looked at, and no weights file is needed.
        check_blocks(
            backbone_registry.build_backbone(name, weights="none", image_size=(options.image_size,) * 2),
            options.fine_tune,
        )
        keras.backend.clear_session()


def fine_tune_dir(run: Path, backbone: str) -> Path:
    return runfolder.backbone_dir(run, backbone) / "fine_tune"


def fine_tune_record_path(run: Path, backbone: str, fold: int | str) -> Path:
    """Written last for each model: its presence means that model is fine-tuned and saved."""
    return fine_tune_dir(run, backbone) / f"{'final' if fold == runfolder.FINAL else f'fold{fold}'}.json"


def fine_tune_run(
    prepared: Any,
    out: Path,
    name: str,
    options: Any,
    *,
    heads: Sequence[keras.Model],
    final_head: keras.Model,
    frozen_per_model: list[dict[str, Any]],
    frozen_final: dict[str, Any],
    metadata: Callable[[int | str], dict[str, Any]],
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune each fold model (from its fold's frozen head, on its fold's training images) and the
    final model (from the final head, on every training image); save them as ``fold<k>.keras`` /
    ``final.keras`` with sidecars, skipping models a previous run finished. Returns the summary
    fields: test metrics of the fine-tuned models under ``variants``/``final`` (and in
    ``test_metrics_keras.*``), the frozen ones under ``frozen`` (and in ``test_metrics_frozen-keras.*``)."""
    dataset, images, splits = prepared.dataset, prepared.images, prepared.splits
    n_classes = len(dataset.class_names)
    labels = dataset.labels
    test_idx = splits.test_indices
    jobs: list[tuple[int | str, keras.Model, np.ndarray, np.ndarray | None]] = [
        (fold, head, train, val) for fold, (head, (train, val)) in enumerate(zip(heads, splits.folds))
    ]
    jobs.append((runfolder.FINAL, final_head, splits.train_indices, None))
    views = options.fine_tune_views or options.fine_tune_epochs
    activations: Activations | None = None
    records: dict[int | str, dict[str, Any]] = {}
    for fold, head, train_idx, val_idx in jobs:
        record_path = fine_tune_record_path(out, name, fold)
        model_path = runfolder.fold_model_path(out, name, fold, "keras")
        if record_path.is_file() and model_path.is_file():
            records[fold] = read_json(record_path)
            log.info("%s %s: fine-tuned by an earlier run", name, model_path.name)
            continue
        if activations is None:
            # Once for the whole run: every fold's training images are among these, so fold k trains on
            # the same views of an image as the final model does.
            bottom = build_split(
                name,
                options.fine_tune,
                image_size=images.shape[1:3],
                weights=options.weights,
                preprocessing=options.preprocessing,
                seed=options.seed,
            ).bottom
            activations = compute_activations(
                bottom,
                images,
                splits.train_indices,
                np.concatenate([test_idx, splits.train_indices]),
                views=views,
                seed=options.seed,
                progress=progress,
            )
            log.info(
                "%s: frozen-bottom activations of %d images x %d views + %d plain in %.0f s",
                name,
                len(splits.train_indices),
                views,
                len(test_idx) + len(splits.train_indices),
                activations.seconds,
            )
        details: dict[str, Any] = {}
        weights = training.class_weights(labels[train_idx], n_classes, options.class_weight)
        joined = fine_tune_model(
            name,
            images,
            labels,
            train_idx,
            head_model=head,
            blocks=options.fine_tune,
            learning_rate=options.fine_tune_lr,
            epochs=options.fine_tune_epochs,
            seed=training.derived_seed(options.seed, "fine-tune", fold),
            class_weight=weights,
            progress=progress,
            views=views,
            activations=activations,
            weights=options.weights,
            preprocessing=options.preprocessing,
            validation_idx=val_idx,
            details=details,
        )
        top = top_of(joined, options.fine_tune)
        predicted = predict_top(top, activations.plain[activations.plain_rows(test_idx)]).argmax(1)
        metrics = classification_metrics(labels[test_idx], predicted, n_classes)
        agreement = check_fine_tuned_agrees(
            joined, options.fine_tune, images[test_idx], activations.plain[activations.plain_rows(test_idx)]
        )
        training.save_model_atomic(joined, model_path)
        record = {
            "fold": fold,
            "blocks": options.fine_tune,
            "trained_layers": details["trained_layers"],
            "learning_rate": options.fine_tune_lr,
            "epochs": options.fine_tune_epochs,
            "views": views,
            "class_weight": None if weights is None else [float(w) for w in weights],
            "train_images": int(len(train_idx)),
            "train_seconds": round(details["seconds"], 2),
            "images_per_second": round(details["images_per_second"], 1),
            "history": details["history"],
            "test": metrics,
        }
        write_json(
            runfolder.sidecar_path(model_path),
            metadata(fold)
            | {
                "verified": True,
                "agreement_on_test": agreement,
                "fine_tune": {k: record[k] for k in ("blocks", "trained_layers", "learning_rate", "epochs", "views")},
            },
        )
        write_json(record_path, record)
        records[fold] = record
        log.info(
            "%s %s: fine-tuned top %d blocks in %.0f s, test accuracy %.2f%%",
            name,
            model_path.name,
            options.fine_tune,
            details["seconds"],
            metrics["accuracy"],
        )
    per_model = [{"fold": fold, **records[fold]["test"]} for fold in range(len(heads))]
    aggregate = training.write_test_metrics(out, name, "keras", per_model, dataset.class_names)
    final_metrics = dict(records[runfolder.FINAL]["test"])
    frozen_aggregate = training.write_test_metrics(out, name, "frozen-keras", frozen_per_model, dataset.class_names)
    first = records[0]
    return {
        "variants": {"keras": aggregate},
        "final": {"keras": final_metrics},
        "frozen": {"variants": {"keras": frozen_aggregate}, "final": {"keras": frozen_final}},
        "fine_tune": {
            "blocks": options.fine_tune,
            "trained_layers": first["trained_layers"],
            "learning_rate": options.fine_tune_lr,
            "epochs": options.fine_tune_epochs,
            "views": views,
            "batch_norm": "frozen, inference mode",
            "train_seconds": {str(fold): records[fold]["train_seconds"] for fold in records},
        },
    }
