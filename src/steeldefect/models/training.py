"""Classifier heads on cached backbone features: the learning-rate grid x stratified K-fold CV.

The reference head is Flatten -> Dense 128 ReLU -> Dropout 0.2 -> Dense 64 ReLU -> softmax, trained
with Adam and categorical cross-entropy. Because the backbone is frozen, training the head on cached
features is mathematically the same as training the full model, only without re-running the
backbone every epoch. After the grid, each fold head of the best rate is joined to its backbone into
one Keras model taking raw pixels, so deployment sees a single model.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from tqdm.auto import tqdm

from steeldefect.core import runfolder
from steeldefect.core.files import atomic_save, read_json, save_npz, write_csv, write_json
from steeldefect.core.metrics import METRIC_NAMES, aggregate, classification_metrics
from steeldefect.core.options import CLASS_WEIGHT_CHOICES, HEAD_CHOICES, TrainOptions
from steeldefect.models.augfeatures import AugmentedFeatures, training_rows

log = logging.getLogger(__name__)

DEFAULT_LEARNING_RATES = TrainOptions().learning_rates


def build_head(
    feature_shape: Sequence[int], n_classes: int, *, kind: str = "flatten", dropout: float = 0.2, name: str = "head"
) -> keras.Model:
    """The reference classifier head; ``kind="pooled"`` swaps Flatten for GlobalAveragePooling2D;
    ``kind="attention"``: :func:`attention_head`."""
    if kind not in HEAD_CHOICES:
        raise ValueError(f"head must be one of {HEAD_CHOICES}, got {kind!r}")
    if kind == "attention":
        return attention_head(feature_shape, n_classes, dropout=dropout, name=name)
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = keras.layers.Flatten()(inputs) if kind == "flatten" else keras.layers.GlobalAveragePooling2D()(inputs)
    x = keras.layers.Dense(128, activation="relu")(x)
    x = keras.layers.Dropout(dropout)(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


ATTENTION_LAYER = "attention"
# Weight of the box term against the cross-entropy when an attention head trains on boxes. Picked on
# fold 0's validation images among 1, 3 and 10 (docs/design-notes.md); the
# pointing game barely moved between them.
BOX_LOSS_WEIGHT = 3.0
ATTENTION_HIDDEN = 128


def attention_head(
    feature_shape: Sequence[int], n_classes: int, *, dropout: float = 0.2, name: str = "head"
) -> keras.Model:
    """A head that classifies every feature-map cell and pools the cells with learned weights.

    Each cell's feature vector goes through a shared 1x1 layer (ReLU, ``ATTENTION_HIDDEN`` units) to
    class logits and to one attention score; a softmax over the cells turns the scores into weights
    (layer ``"attention"``), and the image's class logits are the weighted sum of the cells' logits.
    So the attention weights are exactly how much each cell contributed to the answer: they are
    this model's heatmap (steeldefect.deploy.explain, method ``attention``), with no gradients involved.
    """
    height, width, _ = (int(v) for v in feature_shape)
    cells = height * width
    inputs = keras.Input(shape=tuple(feature_shape), name="features")
    x = keras.layers.Dropout(dropout)(inputs)
    x = keras.layers.Conv2D(ATTENTION_HIDDEN, 1, activation="relu", name="cell_hidden")(x)
    cell_logits = keras.layers.Reshape((cells, n_classes))(keras.layers.Conv2D(n_classes, 1, name="cell_logits")(x))
    scores = keras.layers.Reshape((cells,))(keras.layers.Conv2D(1, 1, name="attention_scores")(x))
    weights = keras.layers.Softmax(name=ATTENTION_LAYER)(scores)
    logits = keras.layers.Dot(axes=(1, 1), name="pooled_logits")([weights, cell_logits])
    outputs = keras.layers.Activation("softmax", name="probabilities")(logits)
    return keras.Model(inputs, outputs, name=name)


def box_loss(masks, attention):
    """KL(boxes || attention) per image, averaged over the images that have boxes: the attention is
    pulled towards the box cells in proportion to how much of each cell the boxes cover. ``masks``
    (N, cells) is :func:`steeldefect.data.annotations.cell_masks`; an all-zero row (no boxes) adds nothing."""
    import tensorflow as tf

    total = tf.reduce_sum(masks, axis=1, keepdims=True)
    target = masks / tf.maximum(total, 1e-8)
    has_boxes = tf.cast(total[:, 0] > 0, tf.float32)
    kl = tf.reduce_sum(target * (tf.math.log(target + 1e-8) - tf.math.log(attention + 1e-8)), axis=1)
    return tf.reduce_sum(kl * has_boxes) / tf.maximum(tf.reduce_sum(has_boxes), 1.0)


def derived_seed(seed: int, *parts: object) -> int:
    """A seed for one (rate, fold) cell that does not depend on which other cells run, so a resumed
    grid trains each cell exactly as an uninterrupted one would."""
    text = "/".join(str(part) for part in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


class HeadTrainer:
    """Trains heads of one shape, compiling the training step once for every (rate, fold) cell.

    Keras' ``fit`` compiles a new XLA step for each new model and adds per-epoch data-adapter work;
    for the 15 heads of a grid that cost nearly as much as the arithmetic (2-core machine, Flatten
    head on 1,224 MobileNet feature maps, 15 epochs: 22.6 s with ``fit``, 13.9 s here).
    Here one template head and one Adam optimizer are compiled once; each cell resets them to a fresh
    seeded initialisation, trains, and hands the weights to a new head.

    A pooled head's GlobalAveragePooling2D has no weights, so its Dense stack is trained on features
    averaged once per cell: the same function, without re-averaging 7x7 maps in every step.
    """

    def __init__(
        self,
        feature_shape: Sequence[int],
        n_classes: int,
        *,
        kind: str = "flatten",
        batch_size: int = 64,
        dropout: float = 0.2,
    ):
        import tensorflow as tf

        self.feature_shape = tuple(int(v) for v in feature_shape)
        self.n_classes = n_classes
        self.kind = kind
        self.batch_size = batch_size
        self.dropout = dropout
        # The part of the head that has weights sees the pooled (one value per channel) or whole maps.
        self._dense_input = self.feature_shape[-1:] if kind == "pooled" else self.feature_shape
        template_kind = "attention" if kind == "attention" else "flatten"
        self._template = build_head(self._dense_input, n_classes, kind=template_kind, dropout=dropout, name="template")
        if kind == "attention":  # the same weights, also handing out the attention for the box loss
            self._with_attention = keras.Model(
                self._template.inputs, [self._template.output, self._template.get_layer(ATTENTION_LAYER).output]
            )
        self._optimizer = keras.optimizers.Adam(learning_rate=1e-3)
        self._optimizer.build(self._template.trainable_variables)
        self._loss = keras.losses.CategoricalCrossentropy()
        # XLA fuses the large Dense step and Adam's update: 2.4x faster than TensorFlow's graph mode.
        # Not for the attention head: XLA's CPU backward pass of its 1x1 convolutions was 25x slower
        # than graph mode (7 s against 0.27 s per epoch of 256 Lite0 maps).
        jit = kind != "attention"
        step = self._attention_step if kind == "attention" else self._step
        self._train_step = tf.function(step, jit_compile=jit)
        self._evaluate = tf.function(self._eval, jit_compile=jit)

    def _step(self, x, y, weights=None):
        import tensorflow as tf

        variables = self._template.trainable_variables
        with tf.GradientTape() as tape:
            probabilities = self._template(x, training=True)
            loss = self._loss(y, probabilities, sample_weight=weights)
        self._optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return loss, _n_correct(y, probabilities)

    def _attention_step(self, x, y, weights, masks):
        import tensorflow as tf

        variables = self._template.trainable_variables
        with tf.GradientTape() as tape:
            probabilities, attention = self._with_attention(x, training=True)
            loss = self._loss(y, probabilities, sample_weight=weights)
            total = loss + BOX_LOSS_WEIGHT * box_loss(masks, attention)
        self._optimizer.apply_gradients(zip(tape.gradient(total, variables), variables))
        return loss, _n_correct(y, probabilities)

    def _eval(self, x, y):
        probabilities = self._template(x, training=False)
        return self._loss(y, probabilities), _n_correct(y, probabilities)

    def _dense_features(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        return features.mean(axis=(1, 2)) if self.kind == "pooled" else features

    def fit(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        *,
        learning_rate: float,
        epochs: int = 15,
        seed: int = 0,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        class_weight: np.ndarray | None = None,
        masks: np.ndarray | None = None,
    ) -> tuple[keras.Model, dict[str, list[float]]]:
        """``masks``: an attention head's box coverage per training image and cell
        (:func:`steeldefect.data.annotations.cell_masks`); the reported loss is the cross-entropy alone.
        ``class_weight`` (one per class) scales each image's loss by its class's weight, as a
        per-image sample weight. (Not by scaling the one-hot target: the loss value would be the
        same, but TensorFlow's fused softmax cross-entropy takes its gradient as softmax - target,
        right only when the target sums to 1, and heads trained that way diverged.)"""
        if tuple(features.shape[1:]) != self.feature_shape:
            raise ValueError(f"features of shape {features.shape[1:]} given to a trainer for {self.feature_shape}")
        keras.utils.set_random_seed(seed)
        head = build_head(self.feature_shape, self.n_classes, kind=self.kind, dropout=self.dropout)
        head_weights = list(head.variables)
        for target, source in zip(self._template.variables, head_weights, strict=True):
            target.assign(source)  # weights and the dropout's seed state, both from this cell's seed
        for variable in self._optimizer.variables:
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
        self._optimizer.learning_rate = learning_rate

        x = self._dense_features(features)
        y = keras.utils.to_categorical(labels, self.n_classes).astype(np.float32)
        extras: tuple[np.ndarray, ...] = ()
        if class_weight is not None:
            extras = (np.asarray(class_weight, dtype=np.float32)[np.asarray(labels)],)
        if self.kind == "attention":
            if masks is None or len(masks) != len(x):
                raise ValueError("an attention head trains with one box mask per training image")
            extras = (extras[0] if extras else np.ones(len(x), np.float32), np.asarray(masks, np.float32))
        if validation is not None:
            x_val = self._dense_features(validation[0])
            y_val = keras.utils.to_categorical(validation[1], self.n_classes).astype(np.float32)
        order = np.random.default_rng(seed)
        history: dict[str, list[float]] = {"accuracy": [], "loss": []}
        for _ in range(epochs):
            permutation = order.permutation(len(x))
            loss, accuracy = _sweep(self._train_step, x, y, self.batch_size, permutation, extras)
            history["loss"].append(loss)
            history["accuracy"].append(accuracy)
            if validation is not None:
                val_loss, val_accuracy = _sweep(self._evaluate, x_val, y_val, 256)
                history.setdefault("val_loss", []).append(val_loss)
                history.setdefault("val_accuracy", []).append(val_accuracy)
        for target, source in zip(head_weights, self._template.variables, strict=True):
            target.assign(source)
        return head, history


def _sweep(
    step,
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    order: np.ndarray | None = None,
    extras: Sequence[np.ndarray] = (),
) -> tuple[float, float]:
    """``step`` over consecutive batches of the rows ``order`` (default: all, in order), each batch's
    rows of ``extras`` (per-image weights, box masks) passed after x and y; mean loss
    (weighted by batch size, as Keras reports it) and accuracy. Each shuffled batch is gathered on
    its own, right before its step, while it is still in cache: cheaper than shuffling the whole
    array each epoch (250 MB for a Flatten head on MobileNet maps)."""
    loss_sum = correct = 0.0
    for start in range(0, len(x), batch_size):
        stop = min(start + batch_size, len(x))
        rows = slice(start, stop) if order is None else order[start:stop]
        loss, n_correct = step(x[rows], y[rows], *(extra[rows] for extra in extras))
        loss_sum += float(loss) * (stop - start)
        correct += float(n_correct)
    return loss_sum / max(len(x), 1), correct / max(len(x), 1)


def _n_correct(y, probabilities):
    import tensorflow as tf

    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(y, axis=1), tf.argmax(probabilities, axis=1)), tf.float32))


def fit_head(
    features: np.ndarray,
    labels: np.ndarray,
    *,
    n_classes: int,
    kind: str = "flatten",
    learning_rate: float = 1e-3,
    epochs: int = 15,
    batch_size: int = 64,
    seed: int = 0,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    trainer: HeadTrainer | None = None,
    class_weight: np.ndarray | None = None,
    masks: np.ndarray | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Train one head with Adam + categorical cross-entropy (+ the box loss of an attention head,
    ``masks`` one row per image); returns (head, per-epoch history).

    Pass the same ``trainer`` for many heads of one shape to compile the training step only once.
    """
    if trainer is None:
        trainer = HeadTrainer(features.shape[1:], n_classes, kind=kind, batch_size=batch_size)
    elif (trainer.kind, trainer.n_classes, trainer.batch_size) != (kind, n_classes, batch_size):
        raise ValueError("trainer was built for another head kind, class count or batch size")
    return trainer.fit(
        features,
        labels,
        learning_rate=learning_rate,
        epochs=epochs,
        seed=seed,
        validation=validation,
        class_weight=class_weight,
        masks=masks,
    )


def class_weights(labels: np.ndarray, n_classes: int, mode: str = "auto") -> np.ndarray | None:
    """Per-class loss weights for ``mode``: ``none`` -> None; ``balanced`` -> scikit-learn's
    ``n_samples / (n_classes * count)``; ``auto`` -> balanced when the largest class has more than
    twice the images of the smallest, else None."""
    from sklearn.utils.class_weight import compute_class_weight

    if mode not in CLASS_WEIGHT_CHOICES:
        raise ValueError(f"class weight must be one of {CLASS_WEIGHT_CHOICES}, got {mode!r}")
    counts = np.bincount(np.asarray(labels), minlength=n_classes)
    if mode == "none" or (mode == "auto" and counts.max() <= 2 * counts.min()):
        return None
    return compute_class_weight("balanced", classes=np.arange(n_classes), y=np.asarray(labels)).astype(np.float32)


def predict_proba(head: keras.Model, features: np.ndarray, batch_size: int = 256) -> np.ndarray:
    # Direct calls rather than model.predict: predict re-traces a tf.function for every new head and
    # input length, which costs more than the arithmetic for arrays this small.
    if len(features) == 0:
        return np.zeros((0, head.output_shape[-1]), dtype=np.float32)
    return np.concatenate(
        [
            np.asarray(head(features[start : start + batch_size], training=False))
            for start in range(0, len(features), batch_size)
        ]
    )


@dataclass(frozen=True)
class GridCell:
    learning_rate: float
    fold: int


def run_grid(
    features: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    run: Path,
    backbone: str,
    n_classes: int,
    learning_rates: Sequence[float] = DEFAULT_LEARNING_RATES,
    kind: str = "flatten",
    epochs: int = 15,
    batch_size: int = 64,
    seed: int = 42,
    class_weight: str = "none",
    progress: bool = True,
    augmented: AugmentedFeatures | None = None,
    masks: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Train every (rate, fold) head, or reuse the ones a previous run finished.

    ``features``/``labels`` index the whole dataset; ``folds`` holds (train, validation) indices into
    them. Each cell writes its head, history and metrics.json (last, so its presence means done).
    ``augmented``: views of training images; a fold trains on the views of its own training images
    only, and validates on plain images. ``masks``: box coverage per image (an attention head),
    indexed like ``features``; a fold trains on its own training images' boxes only.
    """
    cells = [GridCell(float(rate), fold) for rate in learning_rates for fold in range(len(folds))]
    rows = []
    trainer = None  # built on the first cell that needs training, so a fully cached grid compiles nothing
    with tqdm(total=len(cells), desc="LR grid x folds", unit="head", disable=not progress) as bar:
        for cell in cells:
            metrics_path = runfolder.cell_metrics_path(run, backbone, cell.learning_rate, cell.fold)
            if metrics_path.is_file():
                rows.append(read_json(metrics_path))
                bar.set_postfix_str(f"lr={cell.learning_rate:g} fold {cell.fold} (cached)")
                bar.update(1)
                continue
            bar.set_postfix_str(f"lr={cell.learning_rate:g} fold {cell.fold}")
            train_idx, val_idx = folds[cell.fold]
            started = time.perf_counter()
            if trainer is None:
                trainer = HeadTrainer(features.shape[1:], n_classes, kind=kind, batch_size=batch_size)
            train_x, train_y = training_rows(features, labels, train_idx, augmented)
            head, history = fit_head(
                train_x,
                train_y,
                n_classes=n_classes,
                kind=kind,
                learning_rate=cell.learning_rate,
                epochs=epochs,
                batch_size=batch_size,
                seed=derived_seed(seed, cell.learning_rate, cell.fold),
                validation=(features[val_idx], labels[val_idx]),
                trainer=trainer,
                class_weight=class_weights(labels[train_idx], n_classes, class_weight),
                masks=None if masks is None else masks[train_idx],
            )
            predicted = predict_proba(head, features[val_idx]).argmax(axis=1)
            metrics = classification_metrics(labels[val_idx], predicted, n_classes)
            row = {
                "learning_rate": cell.learning_rate,
                "fold": cell.fold,
                "val_accuracy": metrics["accuracy"],
                "val_precision_macro": metrics["precision_macro"],
                "val_recall_macro": metrics["recall_macro"],
                "train_seconds": time.perf_counter() - started,
            }
            save_head(head, runfolder.head_path(run, backbone, cell.learning_rate, cell.fold))
            write_json(runfolder.history_path(run, backbone, cell.learning_rate, cell.fold), history)
            write_json(metrics_path, row)
            rows.append(row)
            bar.update(1)
    return rows


def fit_final_head(
    features: np.ndarray,
    labels: np.ndarray,
    train_indices: np.ndarray,
    *,
    run: Path,
    backbone: str,
    n_classes: int,
    learning_rate: float,
    kind: str = "flatten",
    epochs: int = 15,
    batch_size: int = 64,
    seed: int = 42,
    class_weight: str = "none",
    augmented: AugmentedFeatures | None = None,
    masks: np.ndarray | None = None,
) -> keras.Model:
    """The head to deploy: refitted on every training image (all folds, plus their ``augmented``
    views) with the rate the grid chose, as is usual after cross-validation; reused when a
    previous run already fitted it."""
    path = runfolder.final_head_path(run, backbone)
    if path.is_file():
        return load_head(path, features.shape[1:], n_classes, kind)
    train_x, train_y = training_rows(features, labels, train_indices, augmented)
    head, history = fit_head(
        train_x,
        train_y,
        n_classes=n_classes,
        kind=kind,
        learning_rate=learning_rate,
        epochs=epochs,
        batch_size=batch_size,
        seed=derived_seed(seed, learning_rate, runfolder.FINAL),
        class_weight=class_weights(labels[train_indices], n_classes, class_weight),
        masks=None if masks is None else masks[train_indices],
    )
    save_head(head, path)
    write_json(runfolder.final_history_path(run, backbone), history)
    return head


def select_best_rate(rows: Sequence[dict[str, Any]]) -> float:
    """Best learning rate by mean validation accuracy; a tie goes to the rate listed first."""
    means: dict[float, list[float]] = {}
    for row in rows:
        means.setdefault(float(row["learning_rate"]), []).append(float(row["val_accuracy"]))
    return max(means, key=lambda rate: np.mean(means[rate]))


def save_head(head: keras.Model, path: Path) -> Path:
    """The head's weights only: Keras' save_weights would add Adam's two moments (3x the size)."""
    return save_npz(path, *head.get_weights())


def prune_heads(run: Path, backbone: str, keep_rate: float) -> None:
    """Drop the heads of the rates that lost the grid; their metrics and histories stay."""
    for rate, _, path in runfolder.head_paths(run, backbone):
        if f"{rate:g}" != f"{keep_rate:g}":
            path.unlink()


def save_model_atomic(model: keras.Model, path: Path) -> Path:
    return atomic_save(path, model.save, ".keras")


def load_head(path: Path, feature_shape: Sequence[int], n_classes: int, kind: str) -> keras.Model:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: trained head missing (deleted by hand?); train into a new --out folder")
    head = build_head(feature_shape, n_classes, kind=kind)
    with np.load(path) as stored:
        head.set_weights([stored[f"arr_{i}"] for i in range(len(stored.files))])
    return head


def join_model(backbone: keras.Model, head: keras.Model, name: str) -> keras.Model:
    """Backbone + head as one model: raw RGB pixels 0..255 in, class probabilities out."""
    return keras.Model(backbone.input, head(backbone.output), name=name)


def check_joined_agrees(
    joined: keras.Model, head: keras.Model, images: np.ndarray, features: np.ndarray, *, atol: float = 1e-4
) -> dict[str, float]:
    """The joined model must reproduce backbone-features + head on the same images."""
    from_images = np.asarray(joined.predict(images.astype(np.float32), batch_size=32, verbose=0))
    from_features = predict_proba(head, features)
    max_diff = float(np.abs(from_images - from_features).max()) if len(images) else 0.0
    same = float((from_images.argmax(1) == from_features.argmax(1)).mean()) if len(images) else 1.0
    if same < 1.0 or max_diff > atol:
        raise AssertionError(
            f"joined model disagrees with features + head: {100 * (1 - same):.2f}% of predictions differ, "
            f"max probability difference {max_diff:.2e}"
        )
    return {"max_probability_difference": max_diff, "prediction_agreement": same}


def evaluate_fold_heads(
    heads: Sequence[keras.Model], features: np.ndarray, labels: np.ndarray, n_classes: int
) -> list[dict[str, Any]]:
    results = []
    for fold, head in enumerate(heads):
        predicted = predict_proba(head, features).argmax(axis=1)
        results.append({"fold": fold, **classification_metrics(labels, predicted, n_classes)})
    return results


def write_test_metrics(
    run: Path, backbone: str, variant: str, per_model: list[dict[str, Any]], class_names: Sequence[str]
) -> dict:
    """Per-model and mean ± std test metrics as JSON and CSV (the report reads these)."""
    aggregated = aggregate(per_model)
    write_json(
        runfolder.test_metrics_path(run, backbone, variant, "json"),
        {"variant": variant, "class_names": list(class_names), "per_model": per_model, "aggregate": aggregated},
    )
    write_csv(
        runfolder.test_metrics_path(run, backbone, variant, "csv"),
        [
            {
                "fold": m["fold"],
                **{name: round(m[name], 4) for name in METRIC_NAMES},
                **{
                    f"recall_{name}": round(value, 4) for name, value in zip(class_names, m.get("recall_per_class", []))
                },
            }
            for m in per_model
        ],
    )
    return aggregated


@contextlib.contextmanager
def timed(stage_times: dict[str, float], stage: str) -> Iterator[None]:
    """``with timed(times, "grid"):`` adds the block's wall time (s) to ``times["grid"]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stage_times[stage] = round(stage_times.get(stage, 0.0) + time.perf_counter() - started, 3)


def out_of_fold_probabilities(
    heads: Sequence[Any], features: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities): each fold's validation images scored by the head that did not train
    on them. ``heads[k]`` is the Keras head of fold k; ``features`` index the whole dataset."""
    indices = np.concatenate([val for _, val in folds])
    probabilities = np.concatenate([predict_proba(head, features[val]) for head, (_, val) in zip(heads, folds)])
    return indices, probabilities
