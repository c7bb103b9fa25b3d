"""ONNX and OpenVINO models behind the one runtime interface: chosen by the file, described by the
file, and every bad file refused in one line (issue #25). Tiny models built without TensorFlow,
plus one export of a small Keras model through `deploy.formats` (the real-NEU agreement is in
tests/integration/test_formats_neu.py)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import write_image
from steeldefect import cli
from steeldefect.runtime.backends import PROBABILITIES, TEXTURE, open_backend, read_embedded
from steeldefect.runtime.litert import ModelFileError
from steeldefect.runtime.modelfile import Classifier, read_model_info
from tiny_formats import CLASS_NAMES, SIZE, colour_images, description, tiny_onnx, tiny_openvino

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert "Traceback" not in "\n".join(err)
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(params=["onnx", "openvino"])
def model(request, tmp_path):
    if request.param == "onnx":
        return tiny_onnx(tmp_path / "m.fp32.onnx", meta=description())
    return tiny_openvino(tmp_path / "m.fp32.xml", meta=description())


def test_each_format_classifies_with_the_class_names_inside_the_file(model):
    info = read_model_info(model)
    assert info.class_names == tuple(CLASS_NAMES) and info.input_size == (SIZE, SIZE) and info.variant == "fp32"
    assert info.described_by == model  # no sidecar: the file alone
    images, labels = colour_images()
    classifier = Classifier(model, threads=1)
    assert classifier.runtime == {".onnx": "ONNX Runtime", ".xml": "OpenVINO"}[model.suffix]
    probabilities = classifier.probabilities(images)
    assert probabilities.shape == (len(images), 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert (probabilities.argmax(axis=1) == labels).all()


def test_predict_prints_class_names_from_an_onnx_and_an_openvino_file(model, tmp_path, capsys):
    images, _ = colour_images(1)
    for label, image in enumerate(images):
        write_image(tmp_path / "in" / f"{label}.png", array=image)
    assert cli.main(["--quiet", "predict", str(model), str(tmp_path / "in"), "--format", "json"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    rows = rows if isinstance(rows, list) else rows.get("predictions", rows)
    assert "red" in out and "green" in out and "blue" in out, out


def test_backends_read_outputs_by_name_not_order(tmp_path):
    path = tiny_onnx(tmp_path / "t.onnx", meta=description(), texture_width=8)
    backend = open_backend(path, 1)
    assert backend.output_widths == {PROBABILITIES: 3, TEXTURE: 8}
    out = backend.run(colour_images(1)[0])
    assert out[PROBABILITIES].shape == (3, 3) and out[TEXTURE].shape == (3, 8)


def test_onnx_description_is_metadata_props_and_openvino_rt_info(tmp_path):
    onnx_path = tiny_onnx(tmp_path / "a.onnx", meta=description("int8"))
    xml_path = tiny_openvino(tmp_path / "a.xml", meta=description("int8"))
    for path in (onnx_path, xml_path):
        meta, rule = read_embedded(path)
        assert meta["variant"] == "int8" and meta["class_names"] == CLASS_NAMES and rule is None


# ------------------------------------------------------------------ bad files, one line each


def test_corrupt_onnx_is_one_line_naming_the_file(tmp_path, capsys):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x08\x07" + bytes(range(256)) * 8)
    with pytest.raises(ModelFileError, match=str(bad)):
        read_model_info(bad)
    write_image(tmp_path / "a.png")
    assert cli.main(["--quiet", "predict", str(bad), str(tmp_path / "a.png")]) != 0
    line = one_error_line(capsys)
    assert str(bad) in line and "ONNX" in line


def test_truncated_onnx_is_refused_when_opened(tmp_path, capsys):
    good = tiny_onnx(tmp_path / "good.onnx", meta=description())
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    write_image(tmp_path / "a.png")
    assert cli.main(["--quiet", "predict", str(bad), str(tmp_path / "a.png")]) != 0
    assert str(bad) in one_error_line(capsys)


def test_openvino_xml_without_its_bin_names_the_bin(tmp_path, capsys):
    xml = tiny_openvino(tmp_path / "m.xml", meta=description())
    xml.with_suffix(".bin").unlink()
    with pytest.raises(ModelFileError, match=r"m\.bin"):
        Classifier(xml)
    write_image(tmp_path / "a.png")
    assert cli.main(["--quiet", "predict", str(xml), str(tmp_path / "a.png")]) != 0
    line = one_error_line(capsys)
    assert str(xml) in line and "m.bin" in line


@pytest.mark.parametrize(
    "suffix, content, says",
    [
        (".onnx", b"\x1c\x00\x00\x00TFL3" + bytes(200), "not an ONNX model"),
        (".tflite", "onnx", "not a LiteRT model"),
        (".xml", "onnx", "not an OpenVINO IR"),
        (".onnx", b'<?xml version="1.0"?><net name="x"></net>', "not an ONNX model"),
    ],
)
def test_a_file_of_another_format_behind_a_known_extension(tmp_path, capsys, suffix, content, says):
    target = tmp_path / f"model{suffix}"
    if content == "onnx":
        target.write_bytes(tiny_onnx(tmp_path / "real.onnx", meta=description()).read_bytes())
    else:
        target.write_bytes(content)
    with pytest.raises(ModelFileError, match=says):
        Classifier(target)
    write_image(tmp_path / "a.png")
    assert cli.main(["--quiet", "predict", str(target), str(tmp_path / "a.png")]) != 0
    line = one_error_line(capsys)
    assert str(target) in line and says in line


@pytest.mark.parametrize("fmt, module, extra", [("onnx", "onnxruntime", "onnx"), ("openvino", "openvino", "openvino")])
def test_a_format_whose_extra_is_missing_names_the_extra(tmp_path, capsys, monkeypatch, fmt, module, extra):
    path = (
        tiny_onnx(tmp_path / "m.onnx", meta=description())
        if fmt == "onnx"
        else tiny_openvino(tmp_path / "m.xml", meta=description())
    )
    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    write_image(tmp_path / "a.png")
    assert cli.main(["--quiet", "predict", str(path), str(tmp_path / "a.png")]) != 0
    line = one_error_line(capsys)
    assert str(path) in line and f"pip install steeldefect[{extra}]" in line


def test_description_damaged_inside_an_onnx_is_one_line(tmp_path):
    import onnx

    path = tiny_onnx(tmp_path / "m.onnx", meta=description())
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {"steeldefect.json": "{not json"})
    onnx.save(model, str(path))
    with pytest.raises(ModelFileError, match="not valid JSON"):
        read_model_info(path)


def _pointwise_convolutions(path, convolutions: dict[str, tuple[list[list[float]], list[float] | None]]) -> None:
    """An .onnx of uint8 NHWC pixels (4x4, 2 channels) -> one 1x1 convolution per output name:
    ``{output: (weights [out channels][2 input channels], bias or None)}``."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["pixels"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]),
    ]
    inits, outputs = [], []
    for name, (weights, bias) in convolutions.items():
        inputs = ["nchw", f"w_{name}"]
        inits.append(helper.make_tensor(inputs[1], TensorProto.FLOAT, [len(weights), 2, 1, 1], np.ravel(weights)))
        if bias is not None:
            inputs.append(f"b_{name}")
            inits.append(helper.make_tensor(inputs[2], TensorProto.FLOAT, [len(bias)], bias))
        nodes.append(helper.make_node("Conv", inputs, [name], kernel_shape=[1, 1]))
        outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, len(weights), 4, 4]))
    graph = helper.make_graph(
        nodes, "pointwise", [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [1, 4, 4, 2])], outputs, inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.save(model, str(path))


def _two_convolutions(path) -> None:
    """Two 1x1 convolutions of the 2 channels: ``sums`` (weights 1, 1: its uint8 x int8 pair sums
    reach 2 x 255 x 127, beyond int16) and ``first`` (1, 0.001: 255 x 127, within it)."""
    _pointwise_convolutions(path, {"sums": ([[1.0, 1.0]], None), "first": ([[1.0, 0.001]], None)})


def test_int8_gives_7_bit_weights_to_the_convolutions_whose_16_bit_pair_sums_saturate(tmp_path):
    """Without VNNI, ONNX Runtime and OpenVINO sum u8 x s8 products in pairs in int16: a convolution
    whose pairs overflow must get 7-bit weights, so its int8 answer stays the float one on any CPU."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from steeldefect.deploy import formats

    float_path, int8_path = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _two_convolutions(float_path)
    rng = np.random.default_rng(0)
    images = rng.integers(200, 256, (8, 4, 4, 2), dtype=np.uint8)
    images[1:] = 255  # bright images: both channels at the top of the uint8 range

    seven_bit = formats.quantize_onnx(float_path, int8_path, images)
    assert seven_bit == ["w_sums"]
    weights = {w.name: numpy_helper.to_array(w) for w in onnx.load(str(int8_path)).graph.initializer}
    assert np.abs(weights["w_sums_quantized"]).max() <= 64  # 2 x 255 x 64 < 32768
    assert np.abs(weights["w_first_quantized"]).max() == 127  # the other keeps its 8 bits

    session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
    sums, first = session.run(["sums", "first"], {"pixels": images[1:2]})
    assert np.allclose(sums, 510, rtol=0.02), sums  # a saturated pair would give about half
    assert np.allclose(first, 255, rtol=0.02), first
    assert formats.saturation_rates(int8_path, images) == {"w_sums": 0.0, "w_first": 0.0}


def test_int8_export_keeps_onnx_runtimes_per_channel_chatter_out_of_the_log(tmp_path, caplog):
    """ONNX Runtime's quantizer logs one INFO line to the root logger per weight channel it rescales
    (83 for Lite0's deploy model), which the CLI would print; our own summary line stays."""
    import logging

    from steeldefect.deploy import formats

    # Weights of 1e-9 beside a bias of 1: the int32 bias scale (input x weight scale) is too fine,
    # so the quantizer raises the weight scale of each channel and says so.
    _pointwise_convolutions(tmp_path / "fp32.onnx", {"out": ([[1e-9, 1e-9]] * 3, [1.0, 2.0, 3.0])})
    images = np.random.default_rng(0).integers(0, 256, (8, 4, 4, 2), dtype=np.uint8)

    with caplog.at_level(logging.INFO):
        formats.quantize_onnx(tmp_path / "fp32.onnx", tmp_path / "int8.onnx", images)
        assert logging.getLogger().level == logging.INFO  # the root logger's level is back once it is done
    messages = [record.getMessage() for record in caplog.records]
    assert not [m for m in messages if "Increased scale" in m], messages
    assert any(m.startswith("int8: ") for m in messages), messages


def test_the_onnx_and_openvino_files_of_one_model_share_one_conversion_and_one_quantization(tmp_path, monkeypatch):
    """`export --formats onnx openvino` converts each fold's Keras model to ONNX once and quantizes it
    once; the OpenVINO int8 is that very ONNX int8."""
    import keras

    from steeldefect.deploy import formats

    calls = {"keras_to_onnx": 0, "quantize_onnx": 0}
    for name in calls:
        original = getattr(formats, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(formats, name, counted)
    keras.utils.set_random_seed(0)
    pixels = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(pixels)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(pixels, keras.layers.Dense(3, activation="softmax")(x))
    images, _ = colour_images(4)
    built: dict[str, bytes] = {}
    files = {}
    for fmt, exporter in formats.EXPORTERS.items():
        for variant in ("fp32", "int8"):
            path = tmp_path / f"m.{variant}.{'onnx' if fmt == 'onnx' else 'xml'}"
            exporter(model, variant, path, images, metadata=description(variant), built=built)
            files[fmt, variant] = path
    assert calls == {"keras_to_onnx": 1, "quantize_onnx": 1}
    expected = model.predict(images.astype(np.float32), verbose=0)
    answers = {}
    for (fmt, variant), path in files.items():
        assert read_model_info(path).variant == variant
        answers[fmt, variant] = Classifier(path, threads=1).probabilities(images)
        np.testing.assert_allclose(answers[fmt, variant], expected, atol=0.01 if variant == "fp32" else 0.05)
    for variant in ("fp32", "int8"):  # the same ONNX graph behind both runtimes
        np.testing.assert_allclose(answers["onnx", variant], answers["openvino", variant], atol=0.01)


def test_an_openvino_fp32_model_runs_in_fp32_on_cpus_with_native_bf16(tmp_path):
    """The CPU plugin runs float layers in bf16 by default where the CPU has native bf16 (AVX512_BF16,
    AMX): an fp32 IR would then disagree with LiteRT fp32. The backend asks for f32 on every CPU."""
    import openvino as ov

    backend = open_backend(tiny_openvino(tmp_path / "m.fp32.xml", meta=description()), 1)
    assert backend.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.f32


def test_an_openvino_model_on_fewer_threads_than_cores_is_not_pinned(tmp_path):
    """The archive engine runs one single-thread worker per core. OpenVINO pins inference threads by
    default, and two pinned one-thread workers share one core: the archive ran at half speed
    (bench/runtimes.py). A model given every core keeps the pinning."""
    import os

    if (os.cpu_count() or 1) < 2:
        pytest.skip("one core: one thread is every core")
    path = tiny_openvino(tmp_path / "m.fp32.xml", meta=description())
    assert open_backend(path, 1).compiled.get_property("ENABLE_CPU_PINNING") is False
    assert open_backend(path, os.cpu_count()).compiled.get_property("ENABLE_CPU_PINNING") is True


def test_vnni_int8_weights_stay_8_bit_where_the_portable_ones_go_7_bit(tmp_path):
    """`export --int8-weights vnni` quantizes once, 8 bits throughout: on a CPU with VNNI the
    saturating convolution then answers as the float one too, with its full precision."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from steeldefect.core import cpuinfo
    from steeldefect.deploy import formats

    float_path, int8_path = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    _two_convolutions(float_path)
    images = np.full((8, 4, 4, 2), 255, np.uint8)
    assert formats.quantize_onnx(float_path, int8_path, images, "vnni") == []
    weights = {w.name: numpy_helper.to_array(w) for w in onnx.load(str(int8_path)).graph.initializer}
    assert np.abs(weights["w_sums_quantized"]).max() == 127
    if not cpuinfo.saturating_int8():  # where the 16-bit pair sums would halve it, the runtime refuses the file
        session = ort.InferenceSession(str(int8_path), providers=["CPUExecutionProvider"])
        (sums,) = session.run(["sums"], {"pixels": images[:1]})
        assert np.allclose(sums, 510, rtol=0.02), sums
    with pytest.raises(ValueError, match="portable"):
        formats.quantize_onnx(float_path, int8_path, images, "avx2")


@pytest.mark.parametrize("fmt", ["onnx", "openvino"])
@pytest.mark.parametrize(
    "weights, saturating, refused", [("vnni", True, True), ("vnni", False, False), ("portable", True, False)]
)
def test_a_vnni_int8_file_is_refused_in_one_line_on_a_cpu_whose_int8_sums_saturate(
    tmp_path, capsys, monkeypatch, fmt, weights, saturating, refused
):
    """On x86 without VNNI its 16-bit pair sums saturate (17 points lost on NEU): `predict` refuses it
    in one line naming the file and the way out; a portable file runs there, a VNNI one elsewhere."""
    from steeldefect.core import cpuinfo

    meta = description("int8") | {"int8_weights": weights}
    path = (
        tiny_onnx(tmp_path / "m.int8.onnx", meta=meta)
        if fmt == "onnx"
        else tiny_openvino(tmp_path / "m.int8.xml", meta=meta)
    )
    monkeypatch.setattr(cpuinfo, "saturating_int8", lambda: saturating)
    images, _ = colour_images(1)
    write_image(tmp_path / "in" / "0.png", array=images[0])
    code = cli.main(["--quiet", "predict", str(path), str(tmp_path / "in")])
    if refused:
        assert code != 0
        line = one_error_line(capsys)
        assert str(path) in line and "--int8-weights vnni" in line and "--int8-weights portable" in line, line
    else:
        assert code == 0, capsys.readouterr().err


def test_saturating_int8_is_x86_without_vnni(monkeypatch):
    from steeldefect.core import cpuinfo

    for machine, flags, saturates in [
        ("x86_64", {"avx2", "fma"}, True),
        ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
        ("x86_64", {"avx2", "avx_vnni"}, False),
        ("aarch64", {"asimd"}, False),
    ]:
        monkeypatch.setattr(cpuinfo.platform, "machine", lambda machine=machine: machine)
        monkeypatch.setattr(cpuinfo, "cpu_flags", lambda flags=flags: flags)
        assert cpuinfo.saturating_int8() is saturates, (machine, flags)


def test_export_with_vnni_int8_weights_is_refused_up_front_on_a_cpu_whose_int8_sums_saturate(
    tmp_path, capsys, monkeypatch
):
    """Export runs each file it writes (the deploy model's rule is fitted on the file's outputs), so
    VNNI files cannot be made right on a CPU that would saturate them: one line, before any work."""
    from steeldefect.core import cpuinfo

    monkeypatch.setattr(cpuinfo, "saturating_int8", lambda: True)
    run = tmp_path / "run"
    run.mkdir()
    command = ["--quiet", "export", str(run), "--formats", "tflite", "onnx", "--int8-weights", "vnni"]
    assert cli.main(command) != 0
    line = one_error_line(capsys)
    assert "--int8-weights vnni" in line and "no int8 dot product" in line, line
    assert list(run.iterdir()) == []  # nothing written
