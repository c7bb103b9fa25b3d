"""Calibrated confidence and an out-of-distribution ("uncertain") score: a shared service under
`predict`, the report and the HTTP service.

Calibration: one temperature T fitted on the out-of-fold validation predictions of the CV grid (never
on test images) by minimising the negative log-likelihood; probabilities become softmax(log p / T).
Its functions are in :mod:`steeldefect.runtime.calibration`; this module holds the score and the rule.

Out-of-distribution score: a per-class Gaussian distance (QDA-like: each class's own covariance,
shrunk halfway to the shared one; the smallest Mahalanobis distance plus log-determinant over the
classes) of an image's *texture statistics* - the channel means and standard deviations of four
intermediate backbone layers (28x28, 14x14 and 7x7 stages) - after a PCA to 64 components. Chosen by the
leave-one-class-out measurement in ``bench/ood_leave_one_class_out.py``: on the pooled final
features (what the head sees), every score tried, softmax ones included, stays at or below 0.90 mean
AUROC, because the last layer keeps only what separates the known classes; the texture statistics
of the earlier layers describe the surface itself (0.98; docs/results.md, "Trust").
The threshold is the 99th percentile of in-distribution scores that the scorer did not see in
fitting (out-of-fold), so ~99% of in-distribution images are accepted.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

# Layers of the EfficientNet-Lite0 backbone whose channel mean + std form the texture statistics:
# the last residual output of the 28x28 (40 ch), two 14x14 (80, 112 ch) and the 7x7 (192 ch) stages.
TEXTURE_LAYERS = ("block4_add", "block7_add", "block10_add", "block14_add")
DEFAULT_COMPONENTS = 64
DEFAULT_ACCEPT = 0.99
# Weight of each class's own covariance against the shared (tied) one: 0 = tied Mahalanobis (the
# first shipped score), 0.5 = halfway, chosen by bench/ood_leave_one_class_out.py (docs/results.md, "Trust").
DEFAULT_CLASS_COVARIANCE = 0.5
# Ridges (relative to the covariance's mean eigenvalue) that fit_ood chooses among by the held-out
# log-likelihood of the training images. The smallest is the fixed ridge of the first shipped rule,
# which the full NEU training split still chooses; with ~20 images per class a 64x64 class covariance
# is nearly singular, held-out in-distribution images score far out along its weak directions, and the
# out-of-fold threshold rises until an unknown class passes it (docs/trust.md, "With few images").
RIDGE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)


# ------------------------------------------------------------------------- out-of-distribution


def texture_statistics_model(backbone: Any, layers: Sequence[str] = TEXTURE_LAYERS) -> Any:
    """A Keras model: raw pixels -> concatenated per-channel mean and standard deviation of ``layers``.

    Built on the run's backbone (or a joined model holding the backbone's layers); converted to LiteRT
    it runs at backbone speed. The same tensors can be a second output of an exported classifier.
    """
    import keras

    parts = []
    for name in layers:
        activation = backbone.get_layer(name).output
        mean = keras.layers.GlobalAveragePooling2D(name=f"{name}_texture_mean")(activation)
        mean_square = keras.layers.GlobalAveragePooling2D(name=f"{name}_texture_meansq")(
            keras.layers.Multiply(name=f"{name}_texture_square")([activation, activation])
        )
        parts += [mean, mean_square]
    return keras.Model(backbone.input, keras.layers.Concatenate(name="texture_statistics")(parts), name="texture_stats")


def texture_features(raw: np.ndarray, channels: Sequence[int]) -> np.ndarray:
    """Raw model output (per layer: mean, mean of squares) -> the scorer's input: per layer the
    signed square root of mean and std (tames the heavy-tailed ReLU activations), each block L2-normalised
    so that no layer dominates by its channel count."""
    raw = np.asarray(raw, dtype=np.float64)
    if raw.shape[1] != 2 * sum(channels):
        raise ValueError(f"texture statistics of width {raw.shape[1]}; expected {2 * sum(channels)} for {channels}")
    blocks, offset = [], 0
    for c in channels:
        mean, mean_square = raw[:, offset : offset + c], raw[:, offset + c : offset + 2 * c]
        offset += 2 * c
        std = np.sqrt(np.maximum(mean_square - mean * mean, 0.0))
        for part in (np.sign(mean) * np.sqrt(np.abs(mean)), np.sqrt(std)):
            blocks.append(part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12))
    return np.hstack(blocks)


@dataclass
class OODScorer:
    """Distance to the nearest class after PCA; higher = less like the training images. Fit on training
    images only; ``threshold`` is set by :func:`choose_threshold`.

    ``class_covariance`` = 0: Mahalanobis distance with one covariance shared by all classes (tied).
    ``class_covariance`` = w > 0: each class c has its own covariance w * S_c + (1 - w) * S_tied, and the
    score is min over c of (Mahalanobis distance to c)^2 + log det of c's covariance (the class's negative
    Gaussian log-likelihood up to a constant), so a tight class is not judged by a wide class's spread.
    """

    n_components: int = DEFAULT_COMPONENTS
    shrinkage: float = 1e-2  # ridge on the covariance, relative to its mean eigenvalue
    threshold: float | None = None
    class_covariance: float = 0.0

    def fit(self, features: np.ndarray, labels: np.ndarray) -> OODScorer:
        features = np.asarray(features, dtype=np.float64)
        labels = np.asarray(labels)
        classes = np.unique(labels)
        self.classes_ = classes
        n = min(self.n_components, features.shape[1], len(features) - len(classes))
        if n < 1:
            raise ValueError(f"{len(features)} training images for {len(classes)} classes: too few to fit")
        self.center_ = features.mean(axis=0)
        _, _, vt = np.linalg.svd(features - self.center_, full_matrices=False)
        self.projection_ = vt[:n].T
        return self._fit_covariances(features, labels)

    def with_shrinkage(self, features: np.ndarray, labels: np.ndarray, shrinkage: float) -> OODScorer:
        """A copy fitted on the same images with another ridge; the PCA is reused, not recomputed."""
        scorer = replace(self, shrinkage=float(shrinkage), threshold=None)
        scorer.classes_, scorer.center_, scorer.projection_ = self.classes_, self.center_, self.projection_
        return scorer._fit_covariances(np.asarray(features, dtype=np.float64), np.asarray(labels))

    def _fit_covariances(self, features: np.ndarray, labels: np.ndarray) -> OODScorer:
        classes, n = self.classes_, self.projection_.shape[1]
        z = (features - self.center_) @ self.projection_
        self.class_means_ = np.stack([z[labels == c].mean(axis=0) for c in classes])
        residual = z - self.class_means_[np.searchsorted(classes, labels)]
        tied = residual.T @ residual / len(residual)
        ridge = self.shrinkage * np.trace(tied) / n * np.eye(n)
        eigenvalues, eigenvectors = np.linalg.eigh(tied + ridge)
        self.whitening_ = eigenvectors / np.sqrt(eigenvalues)
        self.class_whitening_ = self.log_determinants_ = None
        if not 0 <= self.class_covariance <= 1:
            raise ValueError(f"class_covariance must lie in [0, 1], got {self.class_covariance}")
        if self.class_covariance > 0:
            whitening, log_determinants = [], []
            w = self.class_covariance
            for c in classes:
                own = np.cov(z[labels == c].T, bias=True).reshape(n, n)
                values, vectors = np.linalg.eigh(w * own + (1 - w) * tied + ridge)
                whitening.append(vectors / np.sqrt(values))
                log_determinants.append(np.log(values).sum())
            self.class_whitening_ = np.stack(whitening)
            self.log_determinants_ = np.asarray(log_determinants)
        return self

    def own_class_scores(self, features: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Each image's score under its own class (squared Mahalanobis distance, plus the class's log
        determinant): its negative Gaussian log-likelihood up to a constant. For the tied covariance the
        determinant is included too (:meth:`score` leaves it out, as it is the same for every class):
        it differs between ridges, which is what :func:`fit_ood` compares. ``labels`` must be among the
        classes the scorer was fitted on, in the same encoding."""
        z = (np.asarray(features, dtype=np.float64) - self.center_) @ self.projection_
        rows = np.searchsorted(self.classes_, np.asarray(labels))
        centred = z - self.class_means_[rows]
        if self.class_whitening_ is None or self.log_determinants_ is None:
            tied_log_determinant = -2.0 * np.log(np.abs(np.linalg.det(self.whitening_)))
            return ((centred @ self.whitening_) ** 2).sum(axis=1) + tied_log_determinant
        whitened = np.einsum("ij,ijk->ik", centred, self.class_whitening_[rows])
        return (whitened**2).sum(axis=1) + self.log_determinants_[rows]

    def score(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, dtype=np.float64) - self.center_) @ self.projection_
        class_whitening, log_determinants = self.class_whitening_, self.log_determinants_
        if class_whitening is None or log_determinants is None:  # set together by fit and from_dict
            z, means = z @ self.whitening_, self.class_means_ @ self.whitening_
            return (((z[:, None, :] - means[None]) ** 2).sum(axis=2)).min(axis=1)
        distances = [
            (((z - mean) @ whitening) ** 2).sum(axis=1) + log_det
            for mean, whitening, log_det in zip(self.class_means_, class_whitening, log_determinants)
        ]
        return np.min(distances, axis=0)

    def is_uncertain(self, features: np.ndarray) -> np.ndarray:
        if self.threshold is None:
            raise ValueError("no threshold set: call choose_threshold on out-of-fold in-distribution scores")
        return self.score(features) > self.threshold

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to score again (arrays as nested lists, for JSON or npz)."""
        state = {
            "n_components": self.n_components,
            "shrinkage": self.shrinkage,
            "threshold": self.threshold,
            "class_covariance": self.class_covariance,
            "center": self.center_.tolist(),
            "projection": self.projection_.tolist(),
            "whitening": self.whitening_.tolist(),
            "class_means": self.class_means_.tolist(),
        }
        if self.class_whitening_ is not None and self.log_determinants_ is not None:
            state |= {
                "class_whitening": self.class_whitening_.tolist(),
                "log_determinants": self.log_determinants_.tolist(),
            }
        return state

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> OODScorer:
        """Inverse of :meth:`to_dict`; a state without per-class arrays (older files) is the tied score.
        Raises ValueError when the arrays' shapes do not fit together."""
        scorer = cls(
            int(state["n_components"]),
            float(state["shrinkage"]),
            state.get("threshold"),
            float(state.get("class_covariance", 0.0)),
        )
        scorer.center_ = np.asarray(state["center"], dtype=np.float64)
        scorer.projection_ = np.asarray(state["projection"], dtype=np.float64)
        scorer.whitening_ = np.asarray(state["whitening"], dtype=np.float64)
        scorer.class_means_ = np.asarray(state["class_means"], dtype=np.float64)
        scorer.class_whitening_ = scorer.log_determinants_ = None
        if "class_whitening" in state:
            scorer.class_whitening_ = np.asarray(state["class_whitening"], dtype=np.float64)
            scorer.log_determinants_ = np.asarray(state["log_determinants"], dtype=np.float64)
        scorer.check_shapes()
        return scorer

    def check_shapes(self, width: int | None = None) -> None:
        """ValueError unless the fitted arrays fit together (and take ``width`` input features)."""
        width = self.center_.shape[0] if width is None else width
        n = self.projection_.shape[1] if self.projection_.ndim == 2 else -1
        k = self.class_means_.shape[0] if self.class_means_.ndim == 2 else -1
        ok = (
            self.center_.shape == (width,)
            and self.projection_.shape == (width, n)
            and self.whitening_.shape == (n, n)
            and self.class_means_.shape == (k, n)
            and k >= 1
        )
        if self.class_whitening_ is not None:
            ok = (
                ok
                and self.log_determinants_ is not None
                and self.class_whitening_.shape == (k, n, n)
                and self.log_determinants_.shape == (k,)
            )
            ok = ok and self.class_covariance > 0
        if not ok:
            raise ValueError("array shapes do not fit together")


def choose_threshold(in_distribution_scores: np.ndarray, accept: float = DEFAULT_ACCEPT) -> float:
    """The score below which a fraction ``accept`` of in-distribution images fall. The scores must be
    ones the scorer did not fit on (validation / out-of-fold), else the threshold is too tight."""
    if not 0 < accept <= 1:
        raise ValueError(f"accept must lie in (0, 1], got {accept}")
    return float(np.quantile(np.asarray(in_distribution_scores, dtype=np.float64), accept))


def fit_ood(
    features: np.ndarray,
    labels: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    *,
    accept: float = DEFAULT_ACCEPT,
    n_components: int = DEFAULT_COMPONENTS,
    class_covariance: float = DEFAULT_CLASS_COVARIANCE,
    shrinkage: float | None = None,
) -> tuple[OODScorer, np.ndarray]:
    """The scorer fit on all training rows of ``folds`` with its threshold from out-of-fold scores:
    for each fold a scorer fit on the other folds scores the held-out one. Returns (scorer, the
    out-of-fold scores). ``features``/``labels`` index the whole dataset; test rows are never read.
    ``class_covariance`` 0 gives the tied Mahalanobis score (see :class:`OODScorer`).

    ``shrinkage`` None chooses the ridge from :data:`RIDGE_GRID` by the same folds: the one under
    which the held-out training images are most likely under their own class (the sum of
    :meth:`OODScorer.own_class_scores` is lowest). Ties go to the smaller ridge."""

    def new(ridge: float) -> OODScorer:
        return OODScorer(n_components, shrinkage=ridge, class_covariance=class_covariance)

    ridges = RIDGE_GRID if shrinkage is None else (float(shrinkage),)
    best: tuple[float, float, list[np.ndarray]] | None = None
    fitted: list[OODScorer] = []  # per fold, fitted once: its PCA serves every ridge
    for ridge in ridges:
        oof, held_out_nll = [], 0.0
        for k, (train, val) in enumerate(folds):
            if k == len(fitted):
                fitted.append(new(ridge).fit(features[train], labels[train]))
            fold_scorer = fitted[k].with_shrinkage(features[train], labels[train], ridge)
            oof.append(fold_scorer.score(features[val]))
            if len(ridges) > 1:
                known = np.isin(labels[val], fold_scorer.classes_)  # a class absent from a fold's training rows
                held_out_nll += float(fold_scorer.own_class_scores(features[val][known], labels[val][known]).sum())
        if best is None or held_out_nll < best[0]:
            best = (held_out_nll, ridge, oof)
    assert best is not None  # ridges is never empty
    _, ridge, oof = best
    everything = np.unique(np.concatenate([np.concatenate([t, v]) for t, v in folds]))
    scorer = new(ridge).fit(features[everything], labels[everything])
    oof_scores = np.concatenate(oof)
    scorer.threshold = choose_threshold(oof_scores, accept)
    return scorer, oof_scores


def far_ood_examples(neu_image: np.ndarray, size: tuple[int, int] = (224, 224), seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs no steel-surface model should be sure about, as uint8 RGB of ``size``: scikit-image's
    sample photographs (needs scikit-image, bundled files only), a uniform grey, a saturated white
    and a pure-noise frame, and ``neu_image`` heavily blurred (Gaussian, sigma 8 px)."""
    import skimage.data
    from PIL import Image, ImageFilter

    def rgb(array: np.ndarray) -> np.ndarray:
        image = Image.fromarray(np.asarray(array)).convert("RGB")
        return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.uint8)

    names = (
        "astronaut",
        "camera",
        "coffee",
        "chelsea",
        "rocket",
        "coins",
        "hubble_deep_field",
        "immunohistochemistry",
        "page",
        "text",
        "moon",
        "horse",
        "brick",
        "grass",
        "gravel",
        "clock",
        "colorwheel",
        "checkerboard",
    )
    examples = {f"photo:{name}": rgb(np.asarray(getattr(skimage.data, name)())) for name in names}
    examples["grey"] = np.full((*size, 3), 128, np.uint8)
    examples["white"] = np.full((*size, 3), 255, np.uint8)
    examples["noise"] = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    blurred = Image.fromarray(np.asarray(neu_image, dtype=np.uint8)).filter(ImageFilter.GaussianBlur(8))
    examples["blurred NEU"] = rgb(np.asarray(blurred))
    return examples


def percentile_combine(reference: Sequence[np.ndarray], scores: Sequence[np.ndarray]) -> np.ndarray:
    """Several OOD scores as one: each score becomes the fraction of its in-distribution reference
    scores (out-of-fold) that lie below it, and the largest fraction counts. With a threshold from
    :func:`choose_threshold` on the combined reference, an image is flagged when any one score is
    unusually high, at the chosen overall acceptance."""
    if len(reference) != len(scores):
        raise ValueError(f"{len(reference)} reference score sets for {len(scores)} scores")
    combined: np.ndarray | None = None
    for ref, score in zip(reference, scores):
        ordered = np.sort(np.asarray(ref, dtype=np.float64))
        fraction = np.searchsorted(ordered, np.asarray(score, dtype=np.float64), side="left") / len(ordered)
        combined = fraction if combined is None else np.maximum(combined, fraction)
    if combined is None:
        raise ValueError("no scores to combine")
    return combined


# ------------------------------------------------------------------ the rule a deployed model carries

SOFTMAX_SCORE = "1 - max probability"
RULE_FILE = "uncertainty.npz"
RULE_METHOD = "texture Mahalanobis or max softmax"  # tied covariance (files written before per-class)
RULE_METHOD_CLASS_COVARIANCE = "texture per-class Gaussian or max softmax"


@dataclass
class UncertaintyRule:
    """What a deployed model uses to say "uncertain": each image's texture score (:class:`OODScorer`
    on the model's texture statistics output) and its softmax score (1 - top probability) are ranked
    against their out-of-fold in-distribution reference scores, the larger rank counts
    (:func:`percentile_combine`), and an image whose rank exceeds ``threshold`` is uncertain.

    ``combined_reference`` (the out-of-fold training images' combined ranks) lets a user choose another
    acceptance: :meth:`with_accept`. Without texture statistics (a backbone without the texture layers)
    only the softmax score is used.
    """

    softmax_reference: np.ndarray
    combined_reference: np.ndarray
    threshold: float
    accept: float
    scorer: OODScorer | None = None
    channels: tuple[int, ...] = ()
    texture_reference: np.ndarray | None = None

    @property
    def uses_texture(self) -> bool:
        return self.scorer is not None

    def scores(self, probabilities: np.ndarray, texture_raw: np.ndarray | None = None) -> np.ndarray:
        """The combined rank in [0, 1] of each image (higher = less like the training images)."""
        softmax = 1.0 - np.asarray(probabilities, dtype=np.float64).max(axis=1)
        references, scores = [self.softmax_reference], [softmax]
        if self.scorer is not None:  # uses_texture
            if texture_raw is None:
                raise ValueError("this rule needs the model's texture statistics output")
            if self.texture_reference is None:
                raise ValueError("this rule has a texture scorer but no texture reference scores")
            references.append(self.texture_reference)
            scores.append(self.scorer.score(texture_features(texture_raw, self.channels)))
        return percentile_combine(references, scores)

    def uncertain(self, probabilities: np.ndarray, texture_raw: np.ndarray | None = None) -> np.ndarray:
        return self.scores(probabilities, texture_raw) > self.threshold

    def with_accept(self, accept: float) -> UncertaintyRule:
        """The same rule with the threshold that accepts ``accept`` of the in-distribution images."""
        return replace(self, threshold=choose_threshold(self.combined_reference, accept), accept=float(accept))

    def describe(self) -> dict[str, Any]:
        """The rule's small fields, for the model's JSON description (the arrays go in :data:`RULE_FILE`)."""
        return {
            "method": (
                SOFTMAX_SCORE
                if self.scorer is None  # not uses_texture
                else RULE_METHOD_CLASS_COVARIANCE
                if self.scorer.class_covariance > 0
                else RULE_METHOD
            ),
            "threshold": self.threshold,
            "accept": self.accept,
            "texture_layers": list(TEXTURE_LAYERS) if self.uses_texture else [],
            "channels": list(self.channels),
            "reference_images": len(self.combined_reference),
            "file": RULE_FILE,
        }

    def to_npz_bytes(self) -> bytes:
        arrays: dict[str, Any] = {
            "softmax_reference": self.softmax_reference,
            "combined_reference": self.combined_reference,
            "threshold": np.float64(self.threshold),
            "accept": np.float64(self.accept),
            "channels": np.asarray(self.channels, dtype=np.int64),
        }
        if self.scorer is not None:  # uses_texture
            arrays |= {
                "texture_reference": self.texture_reference,
                "n_components": np.int64(self.scorer.n_components),
                "shrinkage": np.float64(self.scorer.shrinkage),
                "center": self.scorer.center_,
                "projection": self.scorer.projection_,
                "whitening": self.scorer.whitening_,
                "class_means": self.scorer.class_means_,
            }
            if self.scorer.class_whitening_ is not None:  # absent = tied score, as in older files
                arrays |= {
                    "class_covariance": np.float64(self.scorer.class_covariance),
                    "class_whitening": self.scorer.class_whitening_,
                    "log_determinants": self.scorer.log_determinants_,
                }
        buffer = io.BytesIO()
        # numpy's stub types **kwds as if a key could be its allow_pickle flag
        np.savez(buffer, **{k: np.asarray(v) for k, v in arrays.items()})  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_npz_bytes(cls, data: bytes) -> UncertaintyRule:
        """Read a rule back; model files are untrusted, so no pickled objects and every shape is checked
        (ValueError on any problem)."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        except Exception as error:  # a damaged archive raises many kinds of error; all mean the same here
            raise ValueError(f"{RULE_FILE} is not a readable NumPy archive ({type(error).__name__})") from error
        try:
            channels = tuple(int(c) for c in arrays["channels"])
            scorer = texture_reference = None
            if "center" in arrays:
                per_class = "class_whitening" in arrays
                scorer = OODScorer(
                    int(arrays["n_components"]),
                    float(arrays["shrinkage"]),
                    None,
                    float(arrays["class_covariance"]) if per_class else 0.0,
                )
                scorer.center_ = arrays["center"].astype(np.float64)
                scorer.projection_ = arrays["projection"].astype(np.float64)
                scorer.whitening_ = arrays["whitening"].astype(np.float64)
                scorer.class_means_ = arrays["class_means"].astype(np.float64)
                scorer.class_whitening_ = arrays["class_whitening"].astype(np.float64) if per_class else None
                scorer.log_determinants_ = arrays["log_determinants"].astype(np.float64) if per_class else None
                texture_reference = np.sort(arrays["texture_reference"].astype(np.float64))
                scorer.check_shapes(2 * sum(channels))
            rule = cls(
                softmax_reference=np.sort(arrays["softmax_reference"].astype(np.float64)),
                combined_reference=np.sort(arrays["combined_reference"].astype(np.float64)),
                threshold=float(arrays["threshold"]),
                accept=float(arrays["accept"]),
                scorer=scorer,
                channels=channels,
                texture_reference=texture_reference,
            )
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(f"{RULE_FILE} does not hold an uncertainty rule ({error})") from error
        if not (0 < rule.accept <= 1 and len(rule.softmax_reference) and len(rule.combined_reference)):
            raise ValueError(f"{RULE_FILE} holds an empty or invalid uncertainty rule")
        return rule


def fit_rule(
    labels: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
    oof_probabilities: np.ndarray,
    *,
    texture_raw: np.ndarray | None = None,
    channels: Sequence[int] = (),
    accept: float = DEFAULT_ACCEPT,
    n_components: int = DEFAULT_COMPONENTS,
    class_covariance: float = DEFAULT_CLASS_COVARIANCE,
    shrinkage: float | None = None,
) -> UncertaintyRule:
    """Fit the rule on the training images only.

    ``labels`` and ``texture_raw`` (the deployed model's own texture statistics output, so a quantized
    model is judged on its own numbers) index the whole dataset; ``oof_probabilities`` too, holding for
    each training image the probabilities of the fold head that did not train on it. Test rows are never
    read. Every reference score is out-of-fold, so the threshold accepts ``accept`` of unseen
    in-distribution images. ``shrinkage``: the texture score's ridge, None to choose it (:func:`fit_ood`).
    """
    validation = np.concatenate([val for _, val in folds])
    softmax_oof = 1.0 - np.asarray(oof_probabilities, dtype=np.float64)[validation].max(axis=1)
    references, oof_scores = [np.sort(softmax_oof)], [softmax_oof]
    scorer = texture_reference = None
    if texture_raw is not None:
        features = np.full((len(labels), texture_features(texture_raw[:1], channels).shape[1]), np.nan)
        rows = np.unique(np.concatenate([np.concatenate([t, v]) for t, v in folds]))
        features[rows] = texture_features(texture_raw[rows], channels)
        scorer, texture_oof = fit_ood(
            features,
            labels,
            folds,
            accept=accept,
            n_components=n_components,
            class_covariance=class_covariance,
            shrinkage=shrinkage,
        )
        texture_reference = np.sort(texture_oof)  # fit_ood's out-of-fold scores follow ``validation``'s order
        references.append(texture_reference)
        oof_scores.append(texture_oof)
    combined = percentile_combine(references, oof_scores)
    return UncertaintyRule(
        softmax_reference=references[0],
        combined_reference=np.sort(combined),
        threshold=choose_threshold(combined, accept),
        accept=accept,
        scorer=scorer,
        channels=tuple(int(c) for c in channels),
        texture_reference=texture_reference,
    )
