"""Every command's options, defined once: one frozen dataclass per command holds the defaults, the
help text and the checks. The CLI builds its arguments from these fields, the Python API takes the
same objects, and the run folder records ``asdict`` of them, so the three cannot drift apart.

A value that fails its check is refused before any work starts, by argparse with the usual
``argument --epochs: ...`` line, or by the dataclass itself with the same wording for API callers.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

VARIANTS = ("fp32", "fp16", "int8", "int8-mixed")
# The reference's three, plus int8-mixed: on CPUs without int8 dot products (AVX2-only x86) full int8
# is no faster than fp32, int8-mixed is (bench/latency.py).
DEFAULT_VARIANTS = VARIANTS
QUANTIZED_VARIANTS = ("int8", "int8-mixed")

# "attention": a 1x1-conv head that scores every feature-map cell and pools the cells' class logits
# with learned attention weights (steeldefect.models.training.build_head); --boxes teaches it where to look.
HEAD_CHOICES = ("flatten", "pooled", "attention")
# What the frozen backbone hands the head: its last feature map, or the channel means of several
# layers side by side (steeldefect.models.backbones.multilayer_model).
FEATURES_CHOICES = ("maps", "multilayer")
# How --augment's views are made: random flips/transposes/shifts/brightness/contrast, or the
# 7 non-identity flips and 90-degree rotations (a steel surface has no "up").
VIEWS_CHOICES = ("random", "dihedral")
DIHEDRAL_VIEWS = 7
PREPROCESSING_CHOICES = ("model", "reference")
WEIGHTS_CHOICES = ("imagenet", "none")
FORMAT_CHOICES = ("table", "csv", "json")
CLASS_WEIGHT_CHOICES = ("auto", "balanced", "none")
ENGINE_CHOICES = ("local", "ray")


@dataclass(frozen=True)
class Check:
    """A value check: ``accepts(value)`` and how to say what is wanted ("an integer >= 1")."""

    accepts: Callable[[Any], bool]
    wanted: str


AT_LEAST_1 = Check(lambda v: v >= 1, "an integer >= 1")
AT_LEAST_0 = Check(lambda v: v >= 0, "an integer >= 0")
POSITIVE = Check(lambda v: v > 0, "a number > 0")
FRACTION = Check(lambda v: 0 < v < 1, "a fraction strictly between 0 and 1")
SHARE = Check(lambda v: 0 <= v <= 1, "a share in [0, 1]")
ACCEPT = Check(lambda v: 0 < v <= 1, "a fraction in (0, 1]")
AT_LEAST_2 = Check(lambda v: v >= 2, "an integer >= 2")
NON_NEGATIVE = Check(lambda v: v >= 0, "a number >= 0")
INT8_GUARD_CHOICES = ("off", "warn", "fix")
INT8_WEIGHTS_CHOICES = ("portable", "vnni")


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    check: Check | None = None,
    choices: tuple[str, ...] | None = None,
    resume_free: bool = False,
    additive: bool = False,
) -> Any:
    """A dataclass field carrying its CLI flag, help, check and how a resumed run treats it.

    ``resume_free``: changes how a run is carried out, not what it computes (a resumed run may
    change it). ``additive``: a list that may only grow in a resumed run (export variants).
    """
    if isinstance(default, (list, tuple)):
        default_tuple = tuple(default)
        return field(
            default_factory=lambda: default_tuple,
            metadata=dict(
                help=help, flag=flag, check=check, choices=choices, resume_free=resume_free, additive=additive
            ),
        )
    return field(
        default=default,
        metadata=dict(help=help, flag=flag, check=check, choices=choices, resume_free=resume_free, additive=additive),
    )


class _Options:
    """Checks every field on construction, so an API caller is refused like a CLI user."""

    # Declared for type checkers: every subclass is a dataclass (mypy's DataclassInstance protocol).
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, list):  # lists from JSON or callers; a frozen options object holds tuples
                value = tuple(value)
                object.__setattr__(self, spec.name, value)
            problem = _problem(spec, value)
            if problem:
                raise ValueError(f"{flag_of(spec)}: {problem}")

    def record(self) -> dict[str, Any]:
        """The options as the run folder records them (JSON-ready)."""
        return {key: _jsonable(value) for key, value in dataclasses.asdict(self).items()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _problem(spec: dataclasses.Field, value: Any) -> str | None:
    many = str(spec.type).startswith("tuple[")
    if many != isinstance(value, tuple):
        return f"must be {'a list of values' if many else 'a single value'}, got {value!r}"
    values = value if many else (value,)
    if many and not value:
        return "needs at least one value"
    check, choices = spec.metadata.get("check"), spec.metadata.get("choices")
    base, _ = _base_type(spec.type)
    for item in values:
        if item is None:
            continue
        if base in (int, float) and (
            isinstance(item, bool) or not isinstance(item, (int, float) if base is float else int)
        ):
            return f"must be {'a number' if base is float else 'an integer'}, got {item!r}"
        if choices and item not in choices:
            return f"invalid choice {item!r} (choose from {', '.join(choices)})"
        if check and not check.accepts(item):
            return f"must be {check.wanted}, got {item!r}"
    return None


def flag_of(spec: dataclasses.Field) -> str:
    return spec.metadata.get("flag") or "--" + spec.name.replace("_", "-")


# Backbone names, so options are checked without importing Keras (`serve` and `predict` never need it).
# The registry itself is this dict: steeldefect.models.backbones fills it with its specs when imported,
# and a backbone registered at run time (the tests' tiny one) is accepted too.
BUILTIN_BACKBONES = ("mobilenet", "efficientnetb0", "vgg16", "efficientnet_lite0")
BACKBONE_REGISTRY: dict[str, Any] = {}


def _is_backbone(name: str) -> bool:
    return name == "all" or name in BUILTIN_BACKBONES or name in BACKBONE_REGISTRY


@dataclass(frozen=True)
class DataOptions(_Options):
    """How a dataset becomes arrays and splits."""

    seed: int = option(42, "fixes splits, initialisation and shuffling")
    test_fraction: float = option(0.15, "share of each class held out as the test split", check=FRACTION)
    n_folds: int = option(5, "cross-validation folds", flag="--folds", check=AT_LEAST_2)
    image_size: int = option(224, "square input size in pixels", check=AT_LEAST_1)
    cache_dir: Path | None = option(
        None, "decoded-image and feature cache (default $STEELDEFECT_CACHE or ~/.cache/steeldefect)", resume_free=True
    )
    skip_bad: bool = option(False, "exclude unreadable images with a warning")


@dataclass(frozen=True)
class TrainOptions(DataOptions):
    """`train`: features -> learning-rate grid x CV folds -> test metrics -> joined .keras models."""

    backbones: tuple[str, ...] = option(
        ("efficientnet_lite0",),
        "backbones to train (mobilenet, efficientnetb0, "
        "vgg16, efficientnet_lite0); 'all' skips those whose weights are missing",
        flag="--backbone",
        check=Check(lambda v: _is_backbone(v), "a registered backbone or 'all'"),
    )
    weights: str = option("imagenet", "'none' = random init, explicitly", choices=WEIGHTS_CHOICES)
    preprocessing: str = option(
        "model",
        "'reference' feeds raw 0..255 pixels with no scaling, as the reference study did",
        choices=PREPROCESSING_CHOICES,
    )
    head: str = option(
        "flatten",
        "classifier head on the frozen features; 'attention' pools per-cell class scores with learned "
        "weights that are the model's heatmap (taught by --boxes)",
        choices=HEAD_CHOICES,
    )
    boxes: Path | None = option(
        None,
        "folder of Pascal VOC defect boxes (DIR/<image name>.xml) that teach --head attention where the "
        "defects are; only training images' boxes are used",
    )
    features: str = option(
        "maps",
        "what the head sees: the backbone's last feature map, or 'multilayer' = the channel means of "
        "five Lite0 layers side by side (best with few images; the head is then a Dense stack)",
        choices=FEATURES_CHOICES,
    )
    learning_rates: tuple[float, ...] = option((0.01, 0.001, 0.0001), "the learning-rate grid", check=POSITIVE)
    epochs: int = option(15, "epochs per head", check=AT_LEAST_1)
    batch_size: int = option(64, "head training batch size", check=AT_LEAST_1)
    class_weight: str = option(
        "auto",
        "loss weight per class: 'balanced' = n_images / (n_classes x class count); "
        "'auto' = balanced when the largest class has more than twice the images of the "
        "smallest",
        choices=CLASS_WEIGHT_CHOICES,
    )
    augment: int = option(
        0,
        "K augmented views (flips, transposes, shifts, brightness, contrast) of every training image "
        "as extra head-training rows; validation and test images are never augmented",
        check=AT_LEAST_0,
    )
    augment_views: str = option(
        "random",
        f"how --augment's views are made: 'random' as above, or 'dihedral' = the {DIHEDRAL_VIEWS} flips and "
        f"90-degree rotations of each image (--augment 1..{DIHEDRAL_VIEWS})",
        choices=VIEWS_CHOICES,
    )

    # Fine-tuning (steeldefect.models.finetune; docs/training.md).
    fine_tune: int = option(
        0,
        "after the frozen grid, fine-tune the backbone's top N blocks with each fold's and the final head "
        "(BatchNormalization frozen; 0 = frozen backbone)",
        check=AT_LEAST_0,
    )
    fine_tune_epochs: int = option(
        10, "fine-tuning epochs (one augmented view of each image per epoch)", check=AT_LEAST_1
    )
    fine_tune_lr: float = option(
        1e-4, "fine-tuning learning rate (Adam), decayed to 0 by a cosine over the epochs", check=POSITIVE
    )
    fine_tune_views: int = option(
        0, "augmented views cached per training image for fine-tuning (0 = one per epoch)", check=AT_LEAST_0
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        # Combinations no single option can refuse on its own.
        if self.features == "multilayer" and self.head == "pooled":
            raise ValueError("--head pooled: multilayer features are already channel means; use --head flatten")
        if self.features == "multilayer" and self.fine_tune:
            raise ValueError("--fine-tune needs --features maps (the fine-tuned blocks feed one feature map)")
        if self.boxes is not None and self.head != "attention":
            raise ValueError("--boxes teaches an attention head where to look; it needs --head attention")
        if self.head == "attention":
            if self.boxes is None:
                raise ValueError("--head attention needs --boxes DIR (the defect boxes that teach it where to look)")
            if self.features != "maps":
                raise ValueError("--head attention needs --features maps (it scores every cell of the feature map)")
            if self.augment or self.fine_tune:
                # Their views and crops would move the defects away from their boxes.
                raise ValueError("--head attention does not go with --augment or --fine-tune")
        if self.augment_views == "dihedral" and not 1 <= self.augment <= DIHEDRAL_VIEWS:
            raise ValueError(f"--augment-views dihedral: --augment must be 1..{DIHEDRAL_VIEWS}, got {self.augment}")


LEARNING_CURVE_METHODS = ("frozen", "augmented", "fine-tuned", "multilayer", "multilayer-tta")


@dataclass(frozen=True)
class LearningCurveOptions(DataOptions):
    """`learning-curve`: accuracy vs training images per class (or an imbalance profile), per method."""

    backbone: str = option(
        "efficientnet_lite0",
        "backbone whose frozen features the heads use",
        check=Check(lambda v: v != "all" and _is_backbone(v), "a registered backbone"),
    )
    weights: str = option("imagenet", "'none' = random init, explicitly", choices=WEIGHTS_CHOICES)
    preprocessing: str = option("model", "as for train", choices=PREPROCESSING_CHOICES)
    per_class: tuple[int, ...] = option(
        (5, 10, 20, 50),
        "training images per class, one point each; with --class-order, one count per class "
        "(an imbalance profile, assigned in that order)",
        check=AT_LEAST_1,
    )
    draws: int = option(5, "seeded stratified draws per point", check=AT_LEAST_1)
    methods: tuple[str, ...] = option(
        ("frozen", "augmented", "multilayer"),
        "what to train on each draw ('multilayer' = train --features multilayer --augment 7 --augment-views "
        "dihedral; 'multilayer-tta' = the same head scored as `export --tta` files answer)",
        choices=LEARNING_CURVE_METHODS,
    )
    class_weights: tuple[str, ...] = option(
        ("none",),
        "loss weight per class, each one a separate series",
        flag="--class-weight",
        choices=CLASS_WEIGHT_CHOICES,
    )
    augment: int = option(8, "augmented views per training image for the 'augmented' method", check=AT_LEAST_1)
    steps: int = option(1000, "Adam steps per head, whatever the sample size", check=AT_LEAST_1)
    learning_rate: float = option(
        0.001, "head learning rate (the full-data `train --head pooled --augment 8` grid's choice)", check=POSITIVE
    )
    batch_size: int = option(64, "head batch size (smaller samples: the whole sample)", check=AT_LEAST_1)
    fine_tune_blocks: int = option(2, "fine-tuned: backbone blocks unfrozen", check=AT_LEAST_1)
    fine_tune_learning_rate: float = option(1e-4, "fine-tuned: learning rate", check=POSITIVE)
    fine_tune_epochs: int = option(5, "fine-tuned: epochs", check=AT_LEAST_1)


MODEL_FORMATS = ("tflite", "onnx", "openvino")
FORMAT_VARIANTS = ("fp32", "int8")  # what the formats beyond tflite are exported in


@dataclass(frozen=True)
class ExportOptions(_Options):
    """`export`: LiteRT variants of every fold model of a run."""

    variants: tuple[str, ...] = option(
        DEFAULT_VARIANTS,
        "int8-mixed: int8 except the high-resolution start, "
        "kept float (for CPUs without int8 dot-product instructions)",
        choices=VARIANTS,
        additive=True,
    )
    formats: tuple[str, ...] = option(
        ("tflite",),
        "model file formats: tflite (LiteRT, the --variants), onnx (ONNX Runtime, fp32 + int8; "
        "pip install steeldefect[onnx]), openvino (OpenVINO IR, fp32 + int8; steeldefect[openvino])",
        choices=MODEL_FORMATS,
        additive=True,
    )
    calibration_samples: int = option(200, "training images used to calibrate int8", check=AT_LEAST_1)
    int8_weights: str = option(
        "portable",
        "ONNX/OpenVINO int8 weights: portable = 7-bit where the int16 sums of x86 CPUs without VNNI would "
        "saturate (right on every CPU); vnni = 8-bit throughout, closer to LiteRT int8 on CPUs with an int8 "
        "dot product (AVX-512 VNNI, AVX-VNNI, ARM), refused by the runtime on x86 CPUs without one",
        choices=INT8_WEIGHTS_CHOICES,
    )
    tta: bool = option(
        False,
        "every file answers with the mean over the 8 flips/90-degree rotations of each image "
        "(test-time augmentation: 8x the inference cost; the .keras models stay single-view)",
    )
    quant_report: bool = option(
        True, "per-layer int8 error report (--no-quant-report skips it)", flag="--no-quant-report", resume_free=True
    )
    workers: int = option(
        0, "folds converted at once, each in its own process (0 = one per core)", check=AT_LEAST_0, resume_free=True
    )
    # The int8 guard (steeldefect.deploy.int8guard; docs/int8-guard.md).
    int8_guard: str = option(
        "fix",
        "check each int8 variant against its float model on out-of-fold images; fix: above the threshold "
        "try remedies (recalibration, worst layers in float, int8-mixed) and ship the first that passes; "
        "warn: only say so; off: no check",
        choices=INT8_GUARD_CHOICES,
    )
    int8_guard_accuracy: float = option(
        0.5, "int8 guard threshold: accuracy points int8 may lose against float", check=NON_NEGATIVE
    )
    int8_guard_recall: float = option(
        2.0, "int8 guard threshold: recall points any one class may lose against float", check=NON_NEGATIVE
    )


@dataclass(frozen=True)
class EvaluateOptions(_Options):
    """`evaluate`: test metrics, size and latency of a run's .tflite models."""

    threads: int = option(0, "interpreter threads (0 = all cores)", check=AT_LEAST_0, resume_free=True)
    warmup: int = option(10, "untimed invokes before timing", check=AT_LEAST_1, resume_free=True)
    runs: int = option(50, "timed invokes per model", check=AT_LEAST_1, resume_free=True)


@dataclass(frozen=True)
class PredictOptions(_Options):
    """`predict`: classify images with an exported model."""

    top_k: int = option(1, "how many classes to list per image", check=AT_LEAST_1)
    format: str = option("table", "output format on stdout", choices=FORMAT_CHOICES)
    threads: int = option(0, "interpreter threads (0 = all cores)", check=AT_LEAST_0)
    accept: float | None = option(
        None,
        "share of in-distribution images the model's uncertainty rule accepts, e.g. 0.95 flags more "
        "(default: the model's own, 0.99)",
        check=ACCEPT,
    )
    # Scoring an image archive (steeldefect.deploy.batch; docs/predict.md).
    out: Path | None = option(None, "write results to FILE (.parquet, .csv or .jsonl) as they come; re-run to resume")
    engine: str = option(
        "local",
        "ray: Ray Data on this machine or on a cluster (needs steeldefect[ray] and --out)",
        choices=ENGINE_CHOICES,
    )
    address: str | None = option(None, "Ray cluster address (default: $RAY_ADDRESS, else this machine)")
    workers: int | None = option(
        None,
        "local: N > 1 = N worker processes, 1 thread each (default with --out: one "
        "per core); 1 = one interpreter on --threads cores in this process (default without "
        "--out); ray: actors (default one per CPU)",
        check=AT_LEAST_1,
    )
    batch_size: int | None = option(
        None,
        "images per committed part (default 64 local, 256 ray); an interruption loses at most the batches in flight",
        check=AT_LEAST_1,
    )
    # Heatmaps (steeldefect.deploy.explain; docs/trust.md): computed on the model's .keras.
    explain: Path | None = option(
        None,
        "also write a heatmap PNG per image into this folder (a run folder, a .keras, or a .tflite with its .keras)",
    )


@dataclass(frozen=True)
class CompareOptions(_Options):
    """`compare`: two model files on the same gate images, and the verdict (steeldefect.study.compare)."""

    alpha: float = option(0.05, "keep when NEW is less accurate and McNemar's exact p is below this", check=FRACTION)
    max_recall_drop: float = option(
        2.0,
        "keep when a class OLD knows loses more than this many percentage points of recall",
        check=Check(lambda v: 0 <= v <= 100, "a number of percentage points from 0 to 100"),
    )
    threads: int = option(0, "interpreter threads (0 = all cores)", check=AT_LEAST_0)
    accept: float | None = option(
        None, "share of in-distribution images the uncertainty rule accepts (default: each model's own)", check=ACCEPT
    )
    out: Path | None = option(None, "also write compare.json and compare.csv into this folder")


PORT = Check(lambda v: 0 <= v <= 65535, "a TCP port from 0 to 65535")


@dataclass(frozen=True)
class ServeOptions(_Options):
    """`serve`: the model as an HTTP service with the inspector's page and an audit log."""

    host: str = option("127.0.0.1", "address to bind; 127.0.0.1 answers this machine only")
    port: int = option(8000, "TCP port", check=PORT)
    workers: int = option(0, "interpreters answering at once, one inference each (0 = one per core)", check=AT_LEAST_0)
    threads: int = option(1, "threads per interpreter (0 = all cores)", check=AT_LEAST_0)
    token: str | None = option(
        None,
        "bearer token required by every endpoint except health (visible to every user in the process list: "
        "prefer --token-file or $STEELDEFECT_TOKEN); when not given, --token-file, then $STEELDEFECT_TOKEN, "
        "and no token when neither is set",
    )
    token_file: Path | None = option(None, "read the bearer token from this file (one line; keep it mode 600)")
    tls_cert: Path | None = option(None, "serve HTTPS with this PEM certificate (chain); needs --tls-key")
    tls_key: Path | None = option(None, "the PEM private key of --tls-cert")
    insecure: bool = option(False, "allow a --host beyond this machine without a token (anyone there can use it)")
    audit: Path = option(Path("steeldefect-audit.sqlite"), "SQLite audit log of every answered prediction")
    no_audit: bool = option(False, "do not record predictions")
    audit_keep: int = option(1_000_000, "newest audit rows kept", check=AT_LEAST_1)
    audit_fsync: bool = option(False, "each audit commit waits for the disk: answered rows survive a power cut too")
    queue: int = option(32, "requests that may wait for an interpreter (then 503)", check=AT_LEAST_1)
    max_upload_mb: float = option(8.0, "largest request body accepted, in MiB", check=POSITIVE)
    # steeldefect.data.decode.DEFAULT_MAX_PIXELS (why 50 MP is said there); tests check they agree.
    max_pixels: int = option(
        50_000_000,
        "largest image accepted, in pixels (width x height, read from the header before decoding)",
        check=AT_LEAST_1,
    )
    top_k: int = option(3, "classes per answer unless the request says top_k", check=AT_LEAST_1)
    accept: float | None = option(
        None, "share of in-distribution images the uncertainty rule accepts (default: the model's, 0.99)", check=ACCEPT
    )
    review: Path | None = option(
        None, "keep the images of uncertain answers (and a sample of the rest) in this folder for review"
    )
    review_sample: float = option(0.01, "share of confident answers kept for review too (seeded)", check=SHARE)
    review_max_mb: float | None = option(
        None, "size cap of the review store in MiB: oldest unreviewed images go first", check=POSITIVE
    )
    models_dir: Path = option(
        Path("steeldefect-models"), "private folder where POST /v1/model stores uploaded models (needs --token)"
    )
    max_model_mb: float = option(256.0, "largest model upload accepted by POST /v1/model, in MiB", check=POSITIVE)
    drift_window: int = option(500, "answers in the drift monitor's rolling window", check=AT_LEAST_1)


def resume_free_options(*classes: type) -> set[str]:
    return {spec.name for cls in classes for spec in dataclasses.fields(cls) if spec.metadata.get("resume_free")}


def recorded_defaults(*classes: type) -> dict[str, Any]:
    """Each option's default as `record` writes it, read from the fields (no instance is built: the
    backbone check would import Keras)."""
    defaults = {}
    for cls in classes:
        for spec in dataclasses.fields(cls):
            if spec.default is not dataclasses.MISSING:
                defaults[spec.name] = _jsonable(spec.default)
            elif spec.default_factory is not dataclasses.MISSING:
                defaults[spec.name] = _jsonable(spec.default_factory())
    return defaults


def additive_options(*classes: type) -> set[str]:
    return {spec.name for cls in classes for spec in dataclasses.fields(cls) if spec.metadata.get("additive")}


def _default_of(spec: dataclasses.Field[Any]) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    raise TypeError(f"{spec.name}: an options field needs a default")


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    defaults: dict[str, Any] | None = None,
    extra_choices: dict[str, tuple[str, ...]] | None = None,
    only: tuple[str, ...] | None = None,
) -> None:
    """One argparse argument per field of ``cls``: flag, default, help, choices and check from the field.

    ``defaults`` overrides a field's default for this command only (``reproduce`` trains ``all``);
    ``extra_choices`` lists choices known only at parse time (the backbone registry).
    """
    defaults = defaults or {}
    for spec in dataclasses.fields(cls):
        if only is not None and spec.name not in only:
            continue
        default = defaults.get(spec.name, _default_of(spec))
        flag = flag_of(spec)
        help_text = spec.metadata["help"]
        if spec.type in ("bool", bool):
            # A flag switches the default off (--no-quant-report) or on (--skip-bad, --no-audit).
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, dest=spec.name, action=action, default=default, help=help_text)
            continue
        base, many = _base_type(spec.type)
        choices = (extra_choices or {}).get(spec.name) or spec.metadata.get("choices")
        kwargs: dict[str, Any] = dict(
            dest=spec.name,
            default=list(default) if many else default,
            type=_checked(base, spec),
            help=f"{help_text} (default: %(default)s)",
        )
        if many:
            kwargs["nargs"] = "+"
        if choices:
            kwargs["choices"] = list(choices)
            kwargs["metavar"] = "{" + ",".join(choices) + "}"
        parser.add_argument(flag, **kwargs)


def _base_type(annotation: Any) -> tuple[Callable[[str], Any], bool]:
    text = str(annotation)
    many = text.startswith("tuple[")
    if "float" in text:
        return float, many
    if "int" in text:
        return int, many
    if "Path" in text:
        return Path, many
    return str, many


def _checked(base: Callable[[str], Any], spec: dataclasses.Field) -> Callable[[str], Any]:
    check = spec.metadata.get("check")

    def parse(text: str) -> Any:
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"must be {check.wanted if check else base.__name__}, got {text!r}"
            ) from None
        if check and not check.accepts(value):
            raise argparse.ArgumentTypeError(f"must be {check.wanted}, got {text}")
        return value

    parse.__name__ = base.__name__
    return parse


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """The dataclass of ``cls`` filled from parsed arguments (lists become tuples)."""
    values = {}
    for spec in dataclasses.fields(cls):
        value = getattr(namespace, spec.name)
        values[spec.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values)
