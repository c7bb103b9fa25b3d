"""Tiny ONNX and OpenVINO classifiers built without TensorFlow (fast), in the form `export --formats`
writes them: uint8 raw pixels in, outputs named ``probabilities`` (and ``texture_statistics``), the
description in ``metadata_props`` / ``rt_info``. The class decided by an image is the channel with
the highest mean (red -> class 0, green -> 1, blue -> 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CLASS_NAMES = ["red", "green", "blue"]
SIZE = 16


def description(variant: str = "fp32", class_names=CLASS_NAMES, size: int = SIZE) -> dict:
    return {"class_names": list(class_names), "input": {"height": size, "width": size}, "variant": variant}


def tiny_onnx(path: Path, *, size: int = SIZE, meta: dict | None = None, texture_width: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper

    weights = helper.make_tensor("w", TensorProto.FLOAT, [3, 3], (20.0 * np.eye(3) / 255).ravel().tolist())
    nodes = [
        helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "w"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1),
    ]
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2])
    outputs = [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, 3])]
    inits = [weights, axes]
    if texture_width:
        inits.append(helper.make_tensor("tw", TensorProto.FLOAT, [3, texture_width], [0.01] * (3 * texture_width)))
        nodes.append(helper.make_node("MatMul", ["mean", "tw"], ["texture_statistics"]))
        outputs.append(helper.make_tensor_value_info("texture_statistics", TensorProto.FLOAT, [1, texture_width]))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, size, size, 3])],
        outputs,
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    if meta is not None:
        helper.set_model_props(model, {"steeldefect.json": json.dumps(meta)})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return Path(path)


def tiny_openvino(path: Path, *, size: int = SIZE, meta: dict | None = None) -> Path:
    import openvino as ov

    onnx_path = Path(path).with_suffix(".src.onnx")
    tiny_onnx(onnx_path, size=size)
    model = ov.convert_model(str(onnx_path))
    onnx_path.unlink()
    if meta is not None:
        model.set_rt_info(json.dumps(meta), ["steeldefect", "json"])
    ov.save_model(model, str(path), compress_to_fp16=False)
    return Path(path)


def colour_images(n_per_class: int = 2, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images dominated by one channel each, and their classes."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for label in range(3):
        for _ in range(n_per_class):
            image = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            image[..., label] = rng.integers(180, 256, (size, size), dtype=np.uint8)
            images.append(image)
            labels.append(label)
    return np.stack(images), np.asarray(labels)
