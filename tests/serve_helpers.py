"""A small exported classifier for the service tests: raw pixels in, 6 NEU class probabilities out.

Random weights, but a real LiteRT model with a real sidecar, so the service, `predict` and the page
all go through the same loading and decoding code they use for a trained model.
"""

from __future__ import annotations

from pathlib import Path

NEU_CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def export_small_classifier(
    folder: Path, variant: str = "fp32", size: int = 32, extra_meta: dict | None = None
) -> Path:
    import keras
    import numpy as np

    from steeldefect.core.files import write_json
    from steeldefect.deploy.export import export_model
    from steeldefect.models import training
    from steeldefect.runtime.modelfile import sidecar_path

    keras.utils.set_random_seed(3)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    backbone = keras.Model(inputs, x)
    head = training.build_head(backbone.output_shape[1:], len(NEU_CLASSES), kind="pooled")
    model = training.join_model(backbone, head, "small")
    calibration = np.random.default_rng(0).integers(0, 256, (24, size, size, 3), dtype=np.uint8)
    path = export_model(model, variant, Path(folder) / f"small.{variant}.tflite", calibration)
    meta = {
        "class_names": NEU_CLASSES,
        "input": {"height": size, "width": size, "channels": 3},
        "variant": variant,
        "backbone": "small-test",
    }
    write_json(sidecar_path(path), {**meta, **(extra_meta or {})})
    return path


def png_declaring(width: int, height: int) -> bytes:
    """A valid PNG of a few dozen bytes whose header declares a ``width`` x ``height`` RGB canvas: a
    signature, an IHDR with a correct CRC, a tiny IDAT (far too little data) and IEND. Decoding it
    would allocate the whole canvas; a header check refuses it first."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
