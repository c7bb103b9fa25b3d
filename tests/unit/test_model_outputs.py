"""Issue #27: the class probabilities are output 0 of every exported model, in the flatbuffer's output
list and in its TFLite Model Metadata; a deploy model's texture statistics come after them and are
no class head for MediaPipe; files exported before the change keep giving the same answers.

On the tiny deploy model of ``tests/tiny_deploy.py`` (two conv layers carry the texture statistics).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from steeldefect.models import conversion
from steeldefect.runtime import tflite_metadata
from steeldefect.runtime.litert import from_output, make_interpreter, to_input
from steeldefect.runtime.modelfile import Classifier
from tiny_deploy import CHANNELS, CLASSES, VARIANTS, export_tiny_deploy, rule_images, tiny_classifier

REPOSITORY = Path(__file__).resolve().parents[2]
# The last commit before issue #27: its deploy models list the texture statistics first.
BEFORE_ISSUE_27 = "c6ab42d"
TEXTURE_WIDTH = 2 * sum(CHANNELS)


@pytest.fixture(scope="module")
def deploy_files(tmp_path_factory) -> dict[str, Path]:
    return export_tiny_deploy(tmp_path_factory.mktemp("deploy"))


def invoke_all(interpreter, images: np.ndarray) -> list[np.ndarray]:
    """Every output in the file's own order (what `outputs[0]` means to any runtime)."""
    input_detail = interpreter.get_input_details()[0]
    rows = []
    for image in images:
        interpreter.set_tensor(input_detail["index"], to_input(image, input_detail))
        interpreter.invoke()
        rows.append([from_output(interpreter.get_tensor(d["index"])[0], d) for d in interpreter.get_output_details()])
    return [np.stack(column) for column in zip(*rows)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_0_is_the_class_probabilities(deploy_files, variant):
    path = deploy_files[variant]
    interpreter = make_interpreter(path, threads=1)
    outputs = interpreter.get_output_details()
    assert [int(d["shape"][-1]) for d in outputs] == [len(CLASSES), TEXTURE_WIDTH]
    # The signature keeps the Keras outputs' order (output_0 = probabilities) and so does the graph.
    signature = interpreter._get_full_signature_list()["serving_default"]["outputs"]
    assert [signature["output_0"], signature["output_1"]] == [d["index"] for d in outputs]
    images = rule_images()[0][:8]
    probabilities, texture = invoke_all(interpreter, images)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=0.02)
    keras_probabilities = tiny_classifier().predict(images.astype(np.float32), verbose=0)
    assert (probabilities.argmax(1) == keras_probabilities.argmax(1)).mean() >= 0.75, variant
    assert texture.min() >= 0  # means of ReLU activations and of their squares

    # The metadata MediaPipe reads lists the outputs in the same order: labels only on output 0.
    metadata, *_ = tflite_metadata._metadata_writer_modules()
    document = json.loads(metadata.MetadataDisplayer.with_model_file(str(path)).get_metadata_json())
    first, second = document["subgraph_metadata"][0]["output_tensor_metadata"]
    assert first["name"] == "probabilities"
    assert [f["type"] for f in first["associated_files"]] == ["TENSOR_AXIS_LABELS"]
    assert second["name"] == "texture_statistics" and "associated_files" not in second
    (unit,) = second["process_units"]
    assert unit["options_type"] == "ScoreThresholdingOptions"
    assert unit["options"]["global_score_threshold"] >= 3e38
    # And steeldefect.json names them, which is what our Classifier goes by.
    dtype = "uint8" if variant == "int8" else "float32"
    assert tflite_metadata.read_embedded_metadata(path)["outputs"] == [
        {"name": "probabilities", "index": 0, "shape": [1, len(CLASSES)], "dtype": dtype},
        {"name": "texture_statistics", "index": 1, "shape": [1, TEXTURE_WIDTH], "dtype": dtype},
    ]


@pytest.mark.parametrize("variant", VARIANTS)
def test_mediapipe_classifications_0_is_the_probabilities_head(deploy_files, variant):
    pytest.importorskip("mediapipe.tasks.python.vision", reason="mediapipe is not installed")
    import mediapipe as mp
    from mediapipe.tasks.python.core.base_options import BaseOptions
    from mediapipe.tasks.python.vision import ImageClassifier, ImageClassifierOptions

    path = deploy_files[variant]
    images = rule_images()[0][:12]
    ours = Classifier(path, threads=1).probabilities(images)
    options = ImageClassifierOptions(base_options=BaseOptions(model_asset_path=str(path)), max_results=3)
    with ImageClassifier.create_from_options(options) as classifier:
        for image, probabilities in zip(images, ours):
            result = classifier.classify(mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image)))
            head = result.classifications[0]
            assert (head.head_index, head.head_name) == (0, "probabilities")
            assert {c.category_name for c in head.categories} <= set(CLASSES)
            # Its top category is our most probable class, with our probability (random weights give
            # near-ties, and int8 exact ties, so the class is compared through its probability).
            top = head.categories[0]
            assert top.score == pytest.approx(probabilities.max(), abs=1e-6)
            assert probabilities[CLASSES.index(top.category_name)] == pytest.approx(probabilities.max(), abs=1e-6)
            # MediaPipe makes every output a head; the texture statistics' one reports nothing.
            texture = result.classifications[1]
            assert (texture.head_name, texture.categories) == ("texture_statistics", [])


def test_the_order_is_the_keras_outputs_order_not_the_converters(deploy_files):
    """Whatever order the converter lists the outputs in, the file lists them as the Keras model
    does: a model built with the texture statistics first gets them as output 0."""
    import keras

    from steeldefect.runtime import uncertainty

    model = tiny_classifier()
    stats = uncertainty.texture_statistics_model(model, ("tiny_conv1", "tiny_conv2"))
    swapped = keras.Model(model.input, [stats.output, model.output])
    flatbuffer = conversion.convert(swapped, "fp32")
    assert [int(d["shape"][-1]) for d in make_interpreter(flatbuffer).get_output_details()] == [
        TEXTURE_WIDTH,
        len(CLASSES),
    ]
    # order_outputs itself: a graph whose list is scrambled is put back in signature order, bytes
    # elsewhere untouched; converting twice gives the same file.
    from tensorflow.lite.python import schema_py_generated as schema

    scrambled = bytearray(flatbuffer)
    outputs = schema.Model.GetRootAs(scrambled, 0).Subgraphs(0).OutputsAsNumpy()
    outputs[:] = outputs[::-1].copy()
    restored = conversion.order_outputs(bytes(scrambled))
    assert restored == flatbuffer and bytes(scrambled) != flatbuffer
    assert conversion.convert(swapped, "fp32") == flatbuffer


def test_a_file_that_misnames_its_outputs_is_one_line_naming_it(deploy_files, tmp_path):
    """The Classifier trusts the description's names only where they fit the model's outputs."""
    from steeldefect.runtime.litert import ModelFileError
    from steeldefect.runtime.modelfile import read_model_info

    info = read_model_info(deploy_files["fp32"])
    wrong = dict(info.metadata)
    wrong["outputs"] = [dict(entry) for entry in info.metadata["outputs"]]
    wrong["outputs"][0]["index"], wrong["outputs"][1]["index"] = 1, 0
    with pytest.raises(ModelFileError, match=r"output 'probabilities' is described with shape \[1, 4\]"):
        Classifier(deploy_files["fp32"], info=dataclasses.replace(info, metadata=wrong))


def export_with(source: Path, folder: Path, ridge: float | None = None) -> dict[str, Path]:
    """tests/tiny_deploy.py run in a fresh process against the package under ``source``."""
    env = {**os.environ, "PYTHONPATH": str(source), "TF_CPP_MIN_LOG_LEVEL": "3"}
    fixed = [] if ridge is None else ["--ridge", str(ridge)]
    subprocess.run(
        [sys.executable, str(REPOSITORY / "tests" / "tiny_deploy.py"), str(folder), *fixed, *VARIANTS],
        env=env,
        check=True,
        capture_output=True,
    )
    return {variant: folder / f"deploy.{variant}.tflite" for variant in VARIANTS}


def test_files_exported_before_the_change_give_the_same_answers(tmp_path, capsys, make_image):
    """The code of commit c6ab42d (texture statistics listed first) and today's export the same model
    (today's with the old code's fixed ridge: on 40 random images today's rule chooses another); the
    Classifier (`predict`, `serve`, the batch engines) reads both files to the same probabilities,
    uncertainty scores and flags, and `steeldefect predict` prints the same answers."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    old_source = tmp_path / "old"
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY), "archive", BEFORE_ISSUE_27, "src"], capture_output=True, check=False
    )
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE_ISSUE_27} is not in this checkout's history")
    old_source.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old_source)], input=archive.stdout, check=True)
    old = export_with(old_source / "src", tmp_path / "old-models")
    from steeldefect.runtime.uncertainty import RIDGE_GRID

    new = export_with(REPOSITORY / "src", tmp_path / "new-models", ridge=RIDGE_GRID[0])

    from steeldefect import cli

    images = np.concatenate([rule_images()[0], rule_images(seed=7)[0][:20]])
    files = [make_image(tmp_path / "images" / f"{i}.png", array=image) for i, image in enumerate(images[-10:])]
    for variant in VARIANTS:
        # The premise: the old file lists the texture statistics first, the new one the probabilities.
        assert int(make_interpreter(old[variant]).get_output_details()[0]["shape"][-1]) == TEXTURE_WIDTH
        assert int(make_interpreter(new[variant]).get_output_details()[0]["shape"][-1]) == len(CLASSES)
        was, now = Classifier(old[variant], threads=1).judge(images), Classifier(new[variant], threads=1).judge(images)
        np.testing.assert_allclose(now.probabilities, was.probabilities, atol=1e-6, err_msg=variant)
        np.testing.assert_allclose(now.score, was.score, atol=1e-6, err_msg=variant)
        assert now.uncertain.tolist() == was.uncertain.tolist(), variant
        assert 0 < now.uncertain.sum() < len(images), variant  # both answers occur: the flags are compared
        answers = []
        for model in (old[variant], new[variant]):
            assert cli.main(["predict", str(model), *map(str, files), "--format", "json", "--top-k", "2"]) == 0
            answers.append([{k: v for k, v in r.items() if k != "file"} for r in json.loads(capsys.readouterr().out)])
        assert answers[0] == answers[1], variant


def test_the_int8_guards_float_layer_remedy_keeps_the_probabilities_first():
    """The guard's "worst layers in float" remedy converts through the quantization debugger (as
    int8-mixed does), not the plain converter; a deploy model it ships must still have the
    probabilities as output 0 (found on a photometrically shifted NEU, where that remedy's file was
    refused at export)."""
    from steeldefect.deploy import int8guard
    from steeldefect.runtime import uncertainty

    model = tiny_classifier()
    stats = uncertainty.texture_statistics_model(model, ("tiny_conv1", "tiny_conv2"))
    import keras

    joined = keras.Model(model.input, [model.output, stats.output])
    images = rule_images()[0][:8]
    flatbuffer = int8guard.convert_with_float_layers(joined, images, [])
    widths = [int(d["shape"][-1]) for d in make_interpreter(flatbuffer).get_output_details()]
    assert widths == [len(CLASSES), TEXTURE_WIDTH]
