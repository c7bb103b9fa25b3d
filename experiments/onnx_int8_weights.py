"""Why ONNX and OpenVINO int8 disagreed with LiteRT int8 on an AVX2 CPU, and what fixes it: the
weights' bits, layer by layer.

Figures: docs/formats.md, "Why, on this CPU" and docs/design-notes.md (the variants not adopted).

Usage (from the repository root)::

    python experiments/onnx_int8_weights.py --run RUN [--folds 0 1 2] [--weights ...] [--out FILE.json]

For each fold model of an exported run (``export --formats tflite onnx``), the fold's fp32 ``.onnx``
is quantized (static QDQ, per-channel, MinMax, the same calibration images as `export`) with the
weights of ``--weights``: int8 everywhere ("u8s8", what `export` wrote before it counted
saturation), uint8 ("u8u8"), 7-bit in every non-depthwise convolution ("u8s7-dense"), 7-bit
everywhere ("u8s7"), or as `export` writes them now ("export": 7-bit only where the pair sums
saturate). Each is scored on the run's test split with ONNX Runtime and with OpenVINO reading the
same QDQ file, against LiteRT int8's top-1; then the median 1-thread latency of one image is
measured for all of them side by side with the fp32 files. Without VNNI, the u8 x s8 kernels add
products in pairs in 16 bits (``vpmaddubsw``), which saturate; u8u8 does not, and has no fast
kernel there.
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


WEIGHTS = ("u8s8", "u8u8", "u8s7-dense", "u8s7", "export")


def reduced_weights(model_path: Path) -> dict[str, int]:
    """Weight initializer -> per-channel axis of every Conv node that is not depthwise (group 1): the
    ones MLAS and oneDNN run as a u8 x s8 GEMM, whose pairwise 16-bit sums saturate without VNNI.
    (Giving the head's Gemm weights 7 bits too changed no answer.)"""
    import onnx

    graph = onnx.load(str(model_path)).graph
    names = {init.name for init in graph.initializer}
    out = {}
    for node in graph.node:
        groups = {a.name: a.i for a in node.attribute}.get("group", 1)
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in names and groups == 1:
            out[node.input[1]] = 0
    return out


def quantize(float_onnx: Path, target: Path, images: np.ndarray, weights: str) -> None:
    """``weights``: u8s8 (int8 weights everywhere); u8u8 (uint8 weights); u8s7-dense (int8 weights,
    but 7-bit ones in every group-1 convolution, so that a pair of products fits in 16 bits:
    2 x 255 x 64 < 32768; depthwise weights keep 8 bits); u8s7 (every weight 7-bit, ORT's
    ``reduce_range``); export (what `export` writes: 7-bit weights only in the convolutions whose
    pair sums saturate on the calibration images, `formats.quantize_onnx`)."""
    if weights == "export":
        formats.quantize_onnx(float_onnx, target, images)
        return
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = target.with_suffix(".prep.onnx")
    quant_pre_process(str(float_onnx), str(prepared), skip_symbolic_shape=True)
    extra = {}
    if weights == "u8s7-dense":
        extra["TensorQuantOverrides"] = {
            name: [{"axis": axis, "reduce_range": True}] for name, axis in reduced_weights(prepared).items()
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
