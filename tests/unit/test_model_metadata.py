"""Model files that describe themselves: metadata written at export, read back by `predict`."""

from __future__ import annotations

import io
import json
import warnings
import zipfile

import keras
import numpy as np
import pytest

from steeldefect import cli
from steeldefect.deploy import export as export_stage
from steeldefect.deploy.predict import predict_paths
from steeldefect.models import training
from steeldefect.runtime import litert as runtime
from steeldefect.runtime import tflite_metadata
from steeldefect.runtime.litert import ModelFileError
from steeldefect.runtime.modelfile import Classifier, read_model_info, sidecar_path

CLASSES = ["dots", "stripes", "flat", "speckle"]


@pytest.fixture(scope="module")
def small_model():
    keras.utils.set_random_seed(2)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    backbone = keras.Model(inputs, x)
    return training.join_model(backbone, training.build_head(backbone.output_shape[1:], len(CLASSES)), "small")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(3).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)


def description(variant: str) -> dict:
    """A sidecar-like description, with the fields the other parts of the tool add."""
    return {
        "class_names": CLASSES,
        "input": {"height": 32, "width": 32, "channels": 3, "pixels": "RGB 0..255"},
        "backbone": "small",
        "variant": variant,
        "fold": 0,
        "dataset_fingerprint": "ab" * 32,
        "weights": "sha256:" + "cd" * 32,
        "temperature_scaling": {"temperature": 1.37},
        "uncertainty": {"score": "energy", "threshold": -3.2},
        "provenance": {"run": "unit-run", "source": "0123abc", "test_accuracy": {"of": "keras", "accuracy": 97.5}},
    }


@pytest.fixture(scope="module")
def exported(small_model, images, tmp_path_factory):
    """Every variant, each written once without and once with metadata."""
    folder = tmp_path_factory.mktemp("meta")
    paths = {}
    for variant in ("fp32", "fp16", "int8", "int8-mixed"):
        calibration = images[:16] if variant in ("int8", "int8-mixed") else None
        int8 = paths[("int8", False)].read_bytes() if variant == "int8-mixed" else None
        paths[(variant, False)] = export_stage.export_model(
            small_model, variant, folder / f"plain.{variant}.tflite", calibration, int8_flatbuffer=int8
        )
        # The same conversion, with metadata embedded, so the graphs can be compared byte for byte.
        flatbuffer = paths[(variant, False)].read_bytes()
        with_meta = folder / f"meta.{variant}.tflite"
        with_meta.write_bytes(tflite_metadata.embed_metadata(flatbuffer, description(variant)))
        paths[(variant, True)] = with_meta
    return paths


def test_export_model_embeds_the_description(small_model, images, tmp_path):
    path = export_stage.export_model(
        small_model, "int8", tmp_path / "m.int8.tflite", images[:16], metadata=description("int8")
    )
    embedded = tflite_metadata.read_embedded_metadata(path)
    # The description as given, plus the names and order of the model's outputs (issue #27).
    assert {key: value for key, value in embedded.items() if key != "outputs"} == description("int8")
    assert embedded["outputs"] == [{"name": "probabilities", "index": 0, "shape": [1, len(CLASSES)], "dtype": "uint8"}]
    assert not sidecar_path(path).exists()


@pytest.mark.parametrize("variant", ["fp32", "fp16", "int8", "int8-mixed"])
def test_metadata_changes_no_number_and_no_delegation(exported, images, variant):
    plain = runtime.make_interpreter(exported[(variant, False)], threads=1)
    with_meta = runtime.make_interpreter(exported[(variant, True)], threads=1)
    assert runtime.predict_tflite(with_meta, images).tobytes() == runtime.predict_tflite(plain, images).tobytes()
    assert runtime.delegate_partitions(with_meta) == runtime.delegate_partitions(plain)
    assert [op["op_name"] for op in with_meta._get_ops_details()] == [op["op_name"] for op in plain._get_ops_details()]


def test_round_trip_and_predict_with_nothing_but_the_model_file(exported, images, tmp_path, make_image):
    path = exported[("int8", True)]
    info = read_model_info(path)
    assert not sidecar_path(path).exists()
    assert info.class_names == tuple(CLASSES) and info.input_size == (32, 32) and info.variant == "int8"
    assert info.described_by == path
    assert info.metadata["temperature_scaling"] == {"temperature": 1.37}
    assert info.metadata["uncertainty"]["threshold"] == -3.2
    assert info.metadata["provenance"]["test_accuracy"]["accuracy"] == 97.5
    files = [make_image(tmp_path / f"img{i}.png", array=images[i]) for i in range(4)]
    results = predict_paths(path, files)
    expected = Classifier(path).probabilities(images[:4]).argmax(1)
    assert [r.top[0][0] for r in results] == [CLASSES[i] for i in expected]


def test_standard_metadata_is_what_mediapipe_reads(exported):
    metadata, *_ = tflite_metadata._metadata_writer_modules()
    displayer = metadata.MetadataDisplayer.with_model_file(str(exported[("int8-mixed", True)]))
    document = json.loads(displayer.get_metadata_json())
    assert document["name"] == "steeldefect small int8-mixed"
    assert document["version"] == "unit-run fold0"
    assert document["min_parser_version"] == "1.0.0"
    (image,) = document["subgraph_metadata"][0]["input_tensor_metadata"]
    assert image["process_units"][0]["options"] == {"mean": [0.0], "std": [1.0]}
    assert image["content"]["content_properties"]["color_space"] == "RGB"
    (scores,) = document["subgraph_metadata"][0]["output_tensor_metadata"]
    assert scores["associated_files"][0]["type"] == "TENSOR_AXIS_LABELS"
    assert displayer.get_associated_file_buffer("labels.txt").decode().splitlines() == CLASSES


def test_min_parser_version_follows_the_schema_changelog():
    _, _, _, schema = tflite_metadata._metadata_writer_modules()
    import flatbuffers

    def version(metadata) -> str:
        builder = flatbuffers.Builder(0)
        builder.Finish(metadata.Pack(builder), b"M001")
        return tflite_metadata.min_parser_version(builder.Output())

    metadata = schema.ModelMetadataT()
    subgraph = schema.SubGraphMetadataT()
    subgraph.inputTensorMetadata, subgraph.outputTensorMetadata = [schema.TensorMetadataT()], [schema.TensorMetadataT()]
    metadata.subgraphMetadata = [subgraph]
    assert version(metadata) == "1.0.0"
    labels = schema.AssociatedFileT()
    labels.name, labels.version = "labels.txt", "2"
    subgraph.outputTensorMetadata[0].associatedFiles = [labels]
    assert version(metadata) == "1.4.1"
    subgraph.customMetadata = [schema.CustomMetadataT()]
    assert version(metadata) == "1.5.0"


def test_sidecar_that_disagrees_is_named_and_the_file_wins(exported, tmp_path):
    path = tmp_path / "m.int8.tflite"
    path.write_bytes(exported[("int8", True)].read_bytes())
    stale = description("int8") | {"class_names": list(reversed(CLASSES)), "tflite": {"inputs": []}}
    sidecar_path(path).write_text(json.dumps(stale))
    with pytest.warns(UserWarning, match=rf"{sidecar_path(path).name}: disagrees .* on class_names; the model file"):
        info = read_model_info(path)
    assert info.class_names == tuple(CLASSES)
    # Fields the sidecar alone records (the tensor summary) are no disagreement.
    sidecar_path(path).write_text(json.dumps(description("int8") | {"tflite": {"inputs": []}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_model_info(path).class_names == tuple(CLASSES)
    # A broken sidecar cannot stop a model that describes itself.
    sidecar_path(path).write_text("{broken")
    with pytest.warns(UserWarning, match=rf"{sidecar_path(path).name}: not a JSON metadata file .* ignored"):
        assert read_model_info(path).class_names == tuple(CLASSES)


def test_old_export_without_metadata_still_works_with_its_sidecar(exported, images, tmp_path):
    path = tmp_path / "old.int8.tflite"
    path.write_bytes(exported[("int8", False)].read_bytes())
    assert tflite_metadata.read_embedded_metadata(path) is None
    with pytest.raises(ModelFileError, match="no metadata inside the model file and no sidecar old.int8.tflite.json"):
        read_model_info(path)
    sidecar_path(path).write_text(json.dumps(description("int8")))
    info = read_model_info(path)
    assert info.described_by == sidecar_path(path) and info.class_names == tuple(CLASSES)
    assert Classifier(path, info=info).probabilities(images[:2]).shape == (2, len(CLASSES))


def _with_archive(flatbuffer: bytes, files: dict[str, bytes]) -> bytes:
    """A model with the given files appended as its associated-file archive (as the writer packs them)."""
    stream = io.BytesIO(flatbuffer)
    stream.seek(0, io.SEEK_END)
    with zipfile.ZipFile(stream, "a") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return stream.getvalue()


def test_corrupt_metadata_is_one_clear_line_naming_the_file(exported, tmp_path, make_image, capsys):
    plain = exported[("int8", False)].read_bytes()
    good = json.dumps(description("int8")).encode()
    cases = {
        "notjson.tflite": (_with_archive(plain, {"steeldefect.json": b"{not json"}), "not valid JSON"),
        "notobject.tflite": (_with_archive(plain, {"steeldefect.json": b"[1, 2]"}), "not a JSON object"),
        "labels.tflite": (
            _with_archive(plain, {"labels.txt": b"a\nb\nc\nd", "steeldefect.json": good}),
            "name different classes",
        ),
        "noclasses.tflite": (
            _with_archive(plain, {"steeldefect.json": json.dumps({"input": {"height": 32, "width": 32}}).encode()}),
            "no class_names",
        ),
    }
    big = json.dumps(description("int8") | {"padding": " " * (2 << 20)}).encode()
    cases["huge.tflite"] = (_with_archive(plain, {"steeldefect.json": big}), "more than the 1048576")
    # A flipped byte inside the stored JSON: the archive's checksum no longer matches.
    damaged = bytearray(exported[("int8", True)].read_bytes())
    offset = damaged.rindex(b'"dataset_fingerprint"')
    damaged[offset + 1] ^= 0x01
    cases["crc.tflite"] = (bytes(damaged), "damaged metadata in the model file")
    image = make_image(tmp_path / "img.png", size=(32, 32))
    for name, (content, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ModelFileError, match=message) as raised:
            read_model_info(path)
        assert str(path) in str(raised.value) and "\n" not in str(raised.value)
        assert cli.main(["--quiet", "predict", str(path), str(image)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {path}") and message in err and len(err.splitlines()) == 1


def test_embed_refuses_a_description_that_does_not_fit_the_model(exported):
    flatbuffer = exported[("fp32", False)].read_bytes()
    with pytest.raises(ValueError, match="3 class names for a model with 4 outputs"):
        tflite_metadata.embed_metadata(flatbuffer, description("fp32") | {"class_names": CLASSES[:3]})
    with pytest.raises(ValueError, match="input size 64x64"):
        tflite_metadata.embed_metadata(flatbuffer, description("fp32") | {"input": {"height": 64, "width": 64}})
    with pytest.raises(ValueError, match="already carries TFLite metadata"):
        tflite_metadata.embed_metadata(exported[("fp32", True)].read_bytes(), description("fp32"))


def test_export_stage_embeds_what_the_sidecar_says(tmp_path, monkeypatch, capsys):
    from steeldefect.study import pipeline
    from tiny import TINY, make_dataset, register_tiny_backbone

    register_tiny_backbone(monkeypatch, tmp_path / "keras")
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    data = make_dataset(tmp_path / "data")
    run = tmp_path / "line-3"
    pipeline.train(
        data,
        run,
        backbones=[TINY],
        learning_rates=[0.01],
        epochs=3,
        batch_size=8,
        n_folds=2,
        image_size=32,
        progress=False,
    )
    pipeline.export(run, variants=["int8"], calibration_samples=12, quant_report=False, progress=False)
    model = run / TINY / "models" / "fold1.int8.tflite"
    embedded = tflite_metadata.read_embedded_metadata(model)
    sidecar = json.loads(sidecar_path(model).read_text())
    assert embedded == {key: value for key, value in sidecar.items() if key != "tflite"}
    assert embedded["variant"] == "int8" and embedded["fold"] == 1
    provenance = embedded["provenance"]
    assert provenance["run"] == "line-3"
    keras_metrics = json.loads((run / TINY / "test_metrics_keras.json").read_text())["per_model"][1]
    assert provenance["test_accuracy"] == {
        "of": "keras",
        "accuracy": keras_metrics["accuracy"],
        "n_images": int(np.sum(keras_metrics["confusion_matrix"])),
    }
    # The model file alone is enough for `predict`.
    sidecar_path(model).unlink()
    capsys.readouterr()
    assert cli.main(["--quiet", "predict", str(model), str(data)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("summary: 36 classified, 0 failed")
