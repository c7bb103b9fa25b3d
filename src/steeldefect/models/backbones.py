"""Backbone registry: name -> frozen ImageNet feature extractor that takes raw RGB pixels 0..255.

Each entry knows where its weights come from and how to check them (``BackboneSpec.weights``: an
official Keras file, or Lite0's package converted once), and its preprocessing, which is built *into*
the model so that every exported model (Keras or LiteRT) takes the same raw pixels. Pretrained weights
are only ever read from Keras' own cache (``$KERAS_HOME/models``); they are downloaded only when asked
(:func:`download_weights`).
"""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from steeldefect.core.files import keras_home
from steeldefect.core.options import (
    BACKBONE_REGISTRY,
    BUILTIN_BACKBONES,
    FEATURES_CHOICES,
    PREPROCESSING_CHOICES,
    WEIGHTS_CHOICES,
)
from steeldefect.models import efficientnet_lite
from steeldefect.models.weights import (
    KERAS_WEIGHTS_HOST,
    PackageWeights,
    WeightFile,
    WeightsDownloadError,
    WeightsMissingError,
    _download_one,
    _first_line,
)

# ImageNet BGR channel means that VGG-16 was trained with (keras.applications.imagenet_utils, "caffe").
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


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
class BackboneSpec:
    name: str
    display_name: str
    feature_shape: tuple[int, int, int]
    # Where the pretrained weights come from and how they are checked: an official Keras file, or
    # (Lite0) an installed package converted into Keras' cache. Both answer the same questions.
    weights: WeightFile | PackageWeights
    # (weights file or None, preprocessing inside?, input shape) -> model
    _build: Callable[[Path | None, bool, tuple[int, int, int]], keras.Model]
    # ``features="multilayer"``: the layers whose channel means, side by side, are the features.
    # Empty: the backbone offers only its last feature map.
    multilayer: tuple[str, ...] = ()


def _keras_application(constructor, preprocess_layer: Callable[[], keras.layers.Layer] | None):
    def build(weights_path: Path | None, preprocessing: bool, input_shape: tuple[int, int, int]) -> keras.Model:
        # The official file is loaded into the bare Keras application first (its HDF5 loader matches
        # layers by position), then the preprocessing is put in front of it.
        base = constructor(
            include_top=False, weights=str(weights_path) if weights_path else None, input_shape=input_shape
        )
        if not (preprocessing and preprocess_layer):
            return base
        inputs = keras.Input(shape=input_shape, name="pixels")
        return keras.Model(inputs, base(preprocess_layer()(inputs)), name=base.name)

    return build


def _build_lite0(weights_path: Path | None, preprocessing: bool, input_shape: tuple[int, int, int]) -> keras.Model:
    return efficientnet_lite.build_lite0_trunk(weights_path, preprocessing, input_shape)


_BUILT_IN: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="mobilenet",
            display_name="MobileNetV1",
            feature_shape=(7, 7, 1024),
            weights=WeightFile(
                "mobilenet_1_0_224_tf_no_top.h5",
                "tensorflow/keras-applications/mobilenet/mobilenet_1_0_224_tf_no_top.h5",
                17_225_924,
                None,
            ),
            # MobileNet was trained on pixels scaled to [-1, 1].
            _build=_keras_application(
                keras.applications.MobileNet, lambda: keras.layers.Rescaling(1 / 127.5, offset=-1.0)
            ),
        ),
        BackboneSpec(
            name="efficientnetb0",
            display_name="EfficientNetB0",
            feature_shape=(7, 7, 1280),
            weights=WeightFile(
                "efficientnetb0_notop.h5",
                "keras-applications/efficientnetb0_notop.h5",
                16_705_208,
                "50bc09e76180e00e4465e1a485ddc09d",
            ),
            # Keras' EfficientNet already rescales and normalises inside the model.
            _build=_keras_application(keras.applications.EfficientNetB0, None),
        ),
        BackboneSpec(
            name="vgg16",
            display_name="VGG-16",
            feature_shape=(7, 7, 512),
            weights=WeightFile(
                "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                "tensorflow/keras-applications/vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
                58_889_256,
                "6d6bbae143d832006294945121d1f1fc",
            ),
            _build=_keras_application(keras.applications.VGG16, caffe_preprocess_layer),
        ),
        BackboneSpec(
            name="efficientnet_lite0",
            display_name="EfficientNet-Lite0",
            feature_shape=(7, 7, 1280),
            weights=PackageWeights(),
            _build=_build_lite0,
            # Mid-level texture (blocks 7 and 10 at 14x14) beside the last blocks: chosen by the
            # few-image learning curve (docs/results.md, "Few images"), 4,736 values per image.
            multilayer=("block7_dw_relu", "block10_dw_relu", "block14_dw_relu", "block15_dw_relu", "head_relu"),
        ),
    )
}
# The options check names against this same dict (steeldefect.core.options), without importing Keras.
REGISTRY: dict[str, BackboneSpec] = BACKBONE_REGISTRY
REGISTRY.update(_BUILT_IN)
assert tuple(_BUILT_IN) == BUILTIN_BACKBONES, "core.options.BUILTIN_BACKBONES names the built-in backbones"

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


def keras_hosted() -> list[BackboneSpec]:
    """The registered backbones whose weights are an official Keras file (what install/download handle)."""
    return [spec for spec in REGISTRY.values() if isinstance(spec.weights, WeightFile)]


def missing_weights_message(spec: BackboneSpec, reason: str = "missing") -> str:
    """One line: which weights, what is wrong, the file, and how to get it."""
    return f"{spec.display_name} ImageNet weights {reason}: {spec.weights.path()}; {spec.weights.how_to_get(spec.name)}"


def weights_path(name: str) -> Path:
    """The checked local weight file for ``name``; raises WeightsMissingError naming it if unusable."""
    spec = get_backbone(name)
    try:
        return spec.weights.ensure()
    except ValueError as error:
        raise WeightsMissingError(missing_weights_message(spec, str(error))) from error


def weights_id(name: str, weights: str) -> str:
    """A short identity of the weights a backbone would load, for cache keys and run records."""
    if weights == "none":
        return "random-init"
    spec = get_backbone(name)
    try:
        return spec.weights.identity()
    except ValueError as error:
        raise WeightsMissingError(missing_weights_message(spec, str(error))) from error


def cache_weights_id(name: str, weights: str, seed: int) -> str:
    """The weights part of a feature cache key: random weights are a different backbone per seed."""
    return weights_id(name, weights) + (f"-seed{seed}" if weights == "none" else "")


def backbone_factory(
    name: str,
    *,
    weights: str,
    preprocessing: str,
    seed: int,
    image_size: tuple[int, int],
    features: str = "maps",
) -> Callable[[], Any]:
    """A callable that builds the backbone on its first call and returns the same model after: a
    warm feature cache never needs the backbone, so it is only built when something asks for it."""
    return functools.cache(
        lambda: build_backbone(
            name,
            weights=weights,
            preprocessing=preprocessing,
            seed=seed,
            image_size=(image_size[0], image_size[1]),
            features=features,
        )
    )


def check_features(name: str, features: str) -> None:
    """Refuse, in one line, a feature kind the backbone does not offer."""
    if features not in FEATURES_CHOICES:
        raise ValueError(f"--features must be one of {', '.join(FEATURES_CHOICES)}, got {features!r}")
    if features == "multilayer" and not get_backbone(name).multilayer:
        offering = ", ".join(spec.name for spec in REGISTRY.values() if spec.multilayer)
        raise ValueError(f"--features multilayer is defined for {offering} only, not {name}")


def feature_name(name: str, features: str) -> str:
    """The name a backbone's features are cached and recorded under: the backbone's own name for its
    last feature map, ``<name>+multilayer`` for the multi-layer vector (different numbers, own files)."""
    return name if features == "maps" else f"{name}+{features}"


def multilayer_model(backbone: keras.Model, layers: Sequence[str]) -> keras.Model:
    """``backbone`` with one output: the channel means of ``layers`` side by side, (N, sum of channels).

    The layers stay the backbone's own (same names, same weights), so the Grad-CAM layer and the
    texture statistics are found in a joined model exactly as with the plain backbone."""
    pooled = [
        keras.layers.GlobalAveragePooling2D(name=f"multilayer_mean_{index}")(backbone.get_layer(layer).output)
        for index, layer in enumerate(layers)
    ]
    output = keras.layers.Concatenate(name="multilayer_features")(pooled)
    return keras.Model(backbone.input, output, name=f"{backbone.name}_multilayer")


def build_backbone(
    name: str,
    *,
    weights: str = "imagenet",
    preprocessing: str = "model",
    seed: int = 0,
    image_size: tuple[int, int] = (224, 224),
    features: str = "maps",
) -> keras.Model:
    """A frozen feature extractor taking raw RGB pixels 0..255 of shape (*image_size, 3).

    ``features="maps"`` outputs the last feature map (N, h, w, C); ``"multilayer"`` the channel
    means of the spec's ``multilayer`` layers side by side (N, D).

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
    try:
        model = spec._build(path, preprocessing == "model", (*image_size, 3))
    except OSError as error:
        if path is None:
            raise
        # The checks above passed but HDF5 still failed to read the file (e.g. it changed since).
        raise WeightsMissingError(missing_weights_message(spec, f"unreadable ({_first_line(error)})")) from error
    model.trainable = False
    if features != "maps":
        check_features(name, features)
        model = multilayer_model(model, spec.multilayer)
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
    return [
        WeightsStatus(
            spec.name,
            spec.display_name,
            spec.weights.problem() or "present",
            spec.weights.path(),
            spec.weights.describe(),
        )
        for spec in REGISTRY.values()
    ]


def install_weights(folder: Path) -> list[tuple[str, str]]:
    """Copy official Keras weight files found under ``folder`` into Keras' cache after checking them.

    Returns (file name, outcome) for every Keras-hosted backbone. A file that fails its check (size and
    hash, or size and a full HDF5 read where Keras pins no hash) is not copied; one already present and
    valid is left alone.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder")
    outcomes = []
    for spec in keras_hosted():
        wanted = spec.weights
        assert isinstance(wanted, WeightFile)  # keras_hosted() keeps only these
        target = wanted.path()
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


def download_weights(
    names: Sequence[str] = ("all",), *, host: str = KERAS_WEIGHTS_HOST, progress: bool = True
) -> list[tuple[str, str]]:
    """Fetch the official Keras weight files of ``names`` (``all``: every backbone) into Keras' cache.

    Each file goes through ``keras.utils.get_file`` with the hash Keras' source pins, into a private
    folder beside the target, then through the same check as ``install`` (size + full HDF5 read for
    MobileNet, which has no pinned hash), and only then is moved into place: a refused or interrupted
    download leaves nothing behind. Files already present and valid are not fetched again; backbones
    whose weights come from a package are reported as such. ``host`` exists for tests (a local server).

    Returns (file name, outcome); raises WeightsDownloadError, one line, when the host cannot be reached.
    """
    outcomes = []
    for name in resolve_backbones(list(names)):
        spec = get_backbone(name)
        if not isinstance(spec.weights, WeightFile):
            outcomes.append((name, f"nothing to download: {spec.weights.describe()}"))
            continue
        wanted = spec.weights
        target = wanted.path()
        if wanted.check(target) is None:
            outcomes.append((wanted.filename, f"already present: {target}"))
            continue
        outcomes.append((wanted.filename, _download_one(wanted, target, wanted.url(host), progress)))
    return outcomes


__all__ = [
    "ALL_BACKBONES",
    "KERAS_WEIGHTS_HOST",
    "REFERENCE_BACKBONES",
    "REGISTRY",
    "BackboneSpec",
    "caffe_preprocess_layer",
    "WeightsMissingError",
    "WeightsDownloadError",
    "build_backbone",
    "download_weights",
    "keras_hosted",
    "get_backbone",
    "install_weights",
    "keras_home",
    "resolve_backbones",
    "weights_id",
    "weights_path",
    "weights_status",
]
