"""Why ONNX and OpenVINO int8 disagree with LiteRT int8 on an AVX2 CPU: int8 or uint8 weights.

Figures: docs/formats.md, "Agreement" and docs/design-notes.md (an experiment whose variant was not
adopted: it fixes agreement but makes the int8 files slower than fp32 on CPUs without VNNI).

Usage (from the repository root)::

    python experiments/onnx_int8_weights.py --run RUN [--folds 0 1 2] [--out FILE.json]

For each fold model of an exported run (``export --formats tflite onnx``), the fold's fp32 ``.onnx``
is quantized as `export` does (static QDQ, per-channel, MinMax, the same calibration images) in two
ways: weights int8 ("u8s8", what `export` writes) and weights uint8 ("u8u8"). Each is scored on the
run's test split with ONNX Runtime and with OpenVINO reading the same QDQ file, against LiteRT int8's
top-1; then the median 1-thread latency of one image is measured for all of them side by side with
the fp32 files. ONNX Runtime's u8s8 kernels on CPUs without VNNI add pairs of u8 x s8 products in 16
bits (``vpmaddubsw``), which saturate; u8u8 does not, and has no fast kernel there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import benchio
from steeldefect.core import runfolder
from steeldefect.deploy import export as export_stage
from steeldefect.deploy import formats
from steeldefect.runtime.modelfile import Classifier
from steeldefect.study import pipeline

BACKBONE = "efficientnet_lite0"


WEIGHTS = ("u8s8", "u8u8", "u8s7-dense", "u8s7-dense-head", "u8s7")


def reduced_weights(model_path: Path, head: bool) -> dict[str, int]:
    """Weight initializer -> per-channel axis, for the nodes that MLAS and oneDNN run as a u8 x s8
    GEMM, whose pairwise 16-bit sums saturate without VNNI: the Conv nodes that are not depthwise
    (group 1) and, with ``head``, the head's Gemm nodes (axis as ORT's QDQ Gemm quantizer uses)."""
    import onnx

    graph = onnx.load(str(model_path)).graph
    names = {init.name for init in graph.initializer}
    out = {}
    for node in graph.node:
        if len(node.input) < 2 or node.input[1] not in names:
            continue
        attributes = {a.name: a.i for a in node.attribute}
        if node.op_type == "Conv" and attributes.get("group", 1) == 1:
            out[node.input[1]] = 0
        elif node.op_type == "Gemm" and head:
            out[node.input[1]] = 0 if attributes.get("transB", 0) else 1
    return out


def quantize(float_onnx: Path, target: Path, images: np.ndarray, weights: str) -> None:
    """``weights``: u8s8 (what `export` writes); u8u8 (uint8 weights); u8s7-dense (int8 weights, but
    7-bit ones in the group-1 convolutions, so that a pair of products fits in 16 bits:
    2 x 255 x 64 < 32768; depthwise weights keep 8 bits); u8s7-dense-head (the same, and the head's
    Gemm weights 7-bit too); u8s7 (every weight 7-bit, ORT's ``reduce_range``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".prep.onnx")
    quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
    extra = {}
    if weights in ("u8s7-dense", "u8s7-dense-head"):
        extra["TensorQuantOverrides"] = {
            name: [{"axis": axis, "reduce_range": True}]
            for name, axis in reduced_weights(prepared, head=weights == "u8s7-dense-head").items()
        }
    quantize_static(
        str(prepared),
        str(target),
        formats._Calibration(images),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QUInt8 if weights == "u8u8" else QuantType.QInt8,
        per_channel=True,
        calibrate_method=CalibrationMethod.MinMax,
        reduce_range=weights == "u8s7",
        extra_options=extra,
    )


def runners(path: Path, threads: int) -> dict[str, object]:
    """One-image callables returning probabilities, for ONNX Runtime and OpenVINO on the same file."""
    import onnxruntime as ort
    import openvino as ov

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    compiled = ov.Core().compile_model(
        ov.convert_model(str(path)), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    )
    output = next(o for o in compiled.outputs if formats.PROBABILITIES in o.get_names())
    request = compiled.create_infer_request()
    return {
        "onnxruntime": lambda x: session.run([formats.PROBABILITIES], {name: x})[0],
        "openvino": lambda x: request.infer({0: x})[output],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run exported with --formats tflite onnx")
    parser.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calibration-samples", type=int, default=60, help="as `export` was run (default 60)")
    parser.add_argument("--latency-runs", type=int, default=40)
    parser.add_argument("--weights", nargs="+", default=list(WEIGHTS), choices=WEIGHTS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    prepared, options = pipeline.load_run_data(args.run, progress=False)
    test = prepared.splits.test_indices
    images, labels = prepared.images[test], prepared.dataset.labels[test]
    calibration = export_stage.calibration_indices(
        prepared.dataset.labels, prepared.splits.train_indices, args.calibration_samples, seed=options.seed
    )
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for fold in args.folds:
            float_onnx = runfolder.fold_model_path(args.run, BACKBONE, fold, "fp32", "onnx")
            litert8 = Classifier(runfolder.fold_model_path(args.run, BACKBONE, fold, "int8", "tflite"))
            reference = litert8.probabilities(images).argmax(axis=1)
            timed = {"onnx fp32": runners(float_onnx, 1)}
            for weights in args.weights:
                path = Path(folder) / f"fold{fold}.{weights}.onnx"
                quantize(float_onnx, path, prepared.images[calibration], weights)
                timed[weights] = runners(path, 1)
                for runtime, run_one in timed[weights].items():
                    top1 = np.concatenate([run_one(images[i : i + 1]) for i in range(len(images))]).argmax(axis=1)
                    row = {
                        "accuracy": round(100 * float(np.mean(top1 == labels)), 2),
                        "agreement_with_litert_int8": round(100 * float(np.mean(top1 == reference)), 2),
                        "differ": int(np.sum(top1 != reference)),
                    }
                    results[f"fold{fold} {runtime} {weights}"] = row
                    print(f"fold {fold} {runtime:11s} {weights}: {row}", flush=True)
            if fold == args.folds[0]:  # latency side by side, interleaved, one image, 1 thread
                one = images[:1]
                calls = {f"{rt} {key}": fn for key, pair in timed.items() for rt, fn in pair.items()}
                for call in calls.values():
                    for _ in range(5):
                        call(one)
                samples: dict[str, list[float]] = {key: [] for key in calls}
                for _ in range(args.latency_runs):
                    for key, call in calls.items():
                        started = time.perf_counter()
                        call(one)
                        samples[key].append(1000 * (time.perf_counter() - started))
                for key, values in samples.items():
                    results[f"latency_ms_1t fold{fold} {key}"] = round(float(np.median(values)), 2)
                    print(f"latency 1 thread, fold {fold}, {key:28s} {np.median(values):6.2f} ms", flush=True)
    benchio.save("onnx_int8_weights", results, threads=1, out=args.out)


if __name__ == "__main__":
    main()
