"""LiteRT export and evaluation on small models and generated data."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from steeldefect.data.splits import make_splits
from steeldefect.deploy import export as quantize
from steeldefect.models import conversion, training
from steeldefect.runtime import litert as runtime
from steeldefect.study import evaluate


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    backbone = keras.Model(inputs, x)
    head = training.build_head(backbone.output_shape[1:], 4)
    return training.join_model(backbone, head, "small")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(small_model, images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tflite")
    return {
        variant: quantize.export_model(small_model, variant, folder / f"m.{variant}.tflite", images[:30])
        for variant in conversion.VARIANTS
    }


def test_all_three_variants_convert_with_batch_one(exported):
    for variant, path in exported.items():
        summary = quantize.tensor_summary(path)
        assert summary["inputs"][0]["shape"] == [1, 32, 32, 3], variant
        assert summary["outputs"][0]["shape"] == [1, 4], variant
    assert "float16" in quantize.tensor_summary(exported["fp16"])["tensor_dtypes"]
    sizes = {variant: path.stat().st_size for variant, path in exported.items()}
    assert sizes["int8"] < sizes["fp16"] < sizes["fp32"]


def test_int8_is_full_integer_with_raw_uint8_pixels_in(exported):
    summary = quantize.tensor_summary(exported["int8"])
    (inp,), (out,) = summary["inputs"], summary["outputs"]
    assert inp["dtype"] == "uint8" and inp["scale"] == 1.0 and inp["zero_point"] == 0
    assert out["dtype"] == "uint8" and out["scale"] == pytest.approx(1 / 256) and out["zero_point"] == 0
    dtypes = summary["tensor_dtypes"]
    assert dtypes.get("int8", 0) > 5 and "float32" not in dtypes


def test_int8_agrees_with_float(small_model, exported, images):
    float_probs = np.asarray(small_model(images.astype(np.float32)))
    interpreter = runtime.make_interpreter(exported["int8"], threads=1)
    int8_probs = runtime.predict_tflite(interpreter, images)
    assert np.abs(int8_probs - float_probs).max() < 0.08
    assert (int8_probs.argmax(1) == float_probs.argmax(1)).mean() >= 0.9
    fp32 = runtime.predict_tflite(runtime.make_interpreter(exported["fp32"], threads=1), images)
    np.testing.assert_allclose(fp32, float_probs, atol=1e-5)


def test_whole_graph_is_delegated_to_xnnpack(exported):
    for variant, path in exported.items():
        interpreter = runtime.make_interpreter(path, threads=1)
        # int8-mixed: one float and one int8 partition (XNNPACK splits at the QUANTIZE between them).
        assert runtime.delegate_partitions(interpreter) == (2 if variant == "int8-mixed" else 1), variant


def test_int8_mixed_keeps_the_high_resolution_start_in_float(small_model, exported, images):
    summary = quantize.tensor_summary(exported["int8-mixed"])
    assert summary["inputs"][0]["dtype"] == "float32" and summary["outputs"][0]["dtype"] == "float32"
    interpreter = runtime.make_interpreter(exported["int8-mixed"], threads=1)
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    kinds = [
        (op["op_name"], details[op["outputs"][0]]["dtype"].__name__)
        for op in interpreter._get_ops_details()
        if op["op_name"] != "DELEGATE"
    ]
    # 32x32 input: the 16x16 convolutions are >= 1/8 resolution, so float; the head is int8.
    assert ("CONV_2D", "float32") in kinds and ("DEPTHWISE_CONV_2D", "float32") in kinds
    assert ("FULLY_CONNECTED", "int8") in kinds and ("QUANTIZE", "int8") in kinds
    probabilities = runtime.predict_tflite(interpreter, images)  # raw pixels, given as float32
    float_probs = np.asarray(small_model(images.astype(np.float32)))
    assert np.abs(probabilities - float_probs).max() < 0.08
    assert (probabilities.argmax(1) == float_probs.argmax(1)).mean() >= 0.9
    with pytest.raises(ValueError, match="calibration"):
        conversion.convert(small_model, "int8-mixed", None)
    # Export hands int8-mixed the full-integer model it just wrote; the result must not change.
    reused = conversion.convert(small_model, "int8-mixed", images[:30], int8_flatbuffer=exported["int8"].read_bytes())
    assert reused == exported["int8-mixed"].read_bytes()


def test_calibration_never_touches_test_images_and_is_balanced():
    labels = np.repeat(np.arange(6), 300)
    splits = make_splits(labels, test_fraction=0.15, n_folds=5, seed=3)
    chosen = quantize.calibration_indices(labels, splits.train_indices, 200, seed=3)
    assert len(chosen) == 200 and len(set(chosen)) == 200
    assert not set(chosen) & set(splits.test_indices.tolist())
    counts = np.bincount(labels[chosen], minlength=6)
    assert counts.max() - counts.min() <= 1
    np.testing.assert_array_equal(chosen, quantize.calibration_indices(labels, splits.train_indices, 200, seed=3))


def test_evaluation_matches_hand_computed_confusion_matrix(tmp_path):
    # A model that answers "bright" (class 1) when the mean pixel is above 128, else "dark" (class 0).
    inputs = keras.Input((8, 8, 3))
    mean = keras.layers.GlobalAveragePooling2D()(inputs)
    logits = keras.layers.Dense(2, activation="softmax")(mean)
    model = keras.Model(inputs, logits)
    model.layers[-1].set_weights([np.array([[-0.1, 0.1]] * 3, np.float32), np.array([12.8 * 3, -12.8 * 3], np.float32)])
    path = quantize.export_model(model, "fp32", tmp_path / "bright.tflite")
    values = [10, 20, 200, 30, 220, 240, 250, 90]
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # image 2 is bright but labelled dark; image 7 the reverse
    images = np.stack([np.full((8, 8, 3), v, np.uint8) for v in values])
    result = evaluate.evaluate_tflite(path, images, labels, 2, threads=1, warmup=1, runs=5)
    assert result["confusion_matrix"] == [[3, 1], [1, 3]]
    assert result["accuracy"] == pytest.approx(75.0)
    assert result["precision_macro"] == pytest.approx(75.0)
    assert result["recall_per_class"] == pytest.approx([75.0, 75.0])
    assert result["latency_ms_median"] > 0 and result["runs"] == 5 and result["threads"] == 1


def test_quantization_error_report_writes_csv_and_png(small_model, images, tmp_path):
    rows = quantize.quantization_error_report(
        small_model, images[:20], images[:4], tmp_path / "q.csv", tmp_path / "q.png"
    )
    assert rows and all("rmse/scale" in row for row in rows)
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "q.csv").read_text().splitlines()[0].count("rmse/scale") == 1


def test_int8_mixed_reuses_the_folds_full_integer_conversion(small_model, images, monkeypatch):
    """Exporting int8 then int8-mixed for one model converts the full-integer graph once: the mixed
    variant reads its tensor names from the int8 flatbuffer it is handed."""
    full_integer_conversions = []
    original = conversion.make_converter

    def counting(model, variant, calibration_images=None):
        converter = original(model, variant, calibration_images)
        if variant == "int8":
            plain_convert = converter.convert

            def convert():
                # The debugger behind int8-mixed calls convert() for its calibrate-only pass, which
                # is its own work; only a complete full-integer conversion counts here.
                if not getattr(converter, "_experimental_calibrate_only", False):
                    full_integer_conversions.append(variant)
                return plain_convert()

            converter.convert = convert
        return converter

    monkeypatch.setattr(conversion, "make_converter", counting)
    int8 = conversion.convert(small_model, "int8", images[:30])
    mixed = conversion.convert(small_model, "int8-mixed", images[:30], int8_flatbuffer=int8)
    assert len(full_integer_conversions) == 1
    # Without the flatbuffer it must convert on its own, to the same model.
    assert conversion.convert(small_model, "int8-mixed", images[:30]) == mixed
    assert len(full_integer_conversions) == 2
