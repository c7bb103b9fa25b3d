"""Heatmaps: they point at what drives the class, and they depend on the trained head."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from PIL import Image
from scipy.stats import spearmanr

from steeldefect.deploy import explain, explain_files

SQUARE = (slice(3, 9), slice(21, 27))  # rows, columns: off the diagonal, so a transposed map fails


def _bright_square_model() -> keras.Model:
    """Raw pixels -> 4 hand-set detectors (channel 0: bright 3x3 patches; 1-3: dark ones) -> GAP ->
    softmax over (clean, defect), where only the bright detector speaks for "defect"."""
    inputs = keras.Input((32, 32, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="features")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    dense = keras.layers.Dense(2, activation="softmax", name="probabilities")
    model = keras.Model(inputs, dense(x))
    kernel = np.zeros((3, 3, 3, 4), np.float32)
    kernel[..., 0] = 1 / 27
    kernel[..., 1:] = -1 / 27 * np.array([1.0, 0.7, 0.4])
    conv.set_weights([kernel, np.array([-200.0, 110.0, 80.0, 50.0], np.float32)])
    dense.set_weights(
        [np.array([[-1.0, 10.0], [0.005, 0.0], [0.005, 0.0], [0.005, 0.0]], np.float32), np.zeros(2, np.float32)]
    )
    return model


def _images(n: int = 6) -> np.ndarray:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 120, (n, 32, 32, 3)).astype(np.uint8)
    images[:, SQUARE[0], SQUARE[1]] = 255
    return images


@pytest.mark.parametrize("method", explain.METHODS)
def test_heatmap_maximum_falls_on_the_bright_square(method):
    model = _bright_square_model()
    images = _images()
    assert (model.predict(images.astype(np.float32), verbose=0).argmax(1) == 1).all()
    maps = explain.grad_cam(model, images, layer="features", method=method)
    assert maps.shape == (len(images), 32, 32) and maps.min() >= 0 and maps.max() <= 1
    for heatmap in maps:
        row, col = np.unravel_index(heatmap.argmax(), heatmap.shape)
        assert SQUARE[0].start - 1 <= row < SQUARE[0].stop + 1 and SQUARE[1].start - 1 <= col < SQUARE[1].stop + 1
    # The softmax was bypassed only while computing: the model still outputs probabilities.
    assert np.allclose(model.predict(images[:1].astype(np.float32), verbose=0).sum(), 1.0)


@pytest.mark.parametrize("fill", ["blur", "mean"])
def test_occlusion_maximum_falls_on_the_bright_square(fill):
    model = _bright_square_model()

    def probabilities(batch):
        return model.predict_on_batch(batch.astype(np.float32))

    maps = explain.occlusion(probabilities, _images(3), patch=6, stride=2, fill=fill, flip=True)
    assert maps.shape == (3, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    for heatmap in maps:
        row, col = np.unravel_index(heatmap.argmax(), heatmap.shape)
        assert SQUARE[0].start - 2 <= row < SQUARE[0].stop + 2 and SQUARE[1].start - 2 <= col < SQUARE[1].stop + 2


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")
def test_randomising_the_head_changes_the_synthetic_maps():
    model = _bright_square_model()
    images = _images()
    trained = explain.grad_cam(model, images, class_index=1, layer="features")
    random = explain.grad_cam(explain.randomize_head(model, seed=3), images, class_index=1, layer="features")
    rhos = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(trained, random)]
    assert np.median(np.nan_to_num(rhos)) < 0.5  # a constant map (NaN correlation) has no ranks in common


def test_unknown_layer_or_method_is_one_clear_error():
    model = _bright_square_model()
    with pytest.raises(ValueError, match="no layer nope"):
        explain.grad_cam(model, _images(1), layer="nope")
    with pytest.raises(ValueError, match="method"):
        explain.grad_cam(model, _images(1), layer="features", method="magic")


def test_overlay_is_a_png_with_the_heatmap_drawn(tmp_path):
    image = _images(1)[0]
    heatmap = np.zeros((8, 8), np.float32)
    heatmap[1, 6] = 1.0
    path = explain_files.save_overlay(image, heatmap, "defect 0.97", tmp_path / "overlay.png")
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 200
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas


@pytest.mark.integration
def test_randomising_the_head_of_a_real_neu_model_changes_its_maps(neu_dir, pooled_neu_run):
    from steeldefect.data.decode import read_image

    # The run's model to deploy (trained on all its training images), on NEU images it never saw.
    model = keras.models.load_model(pooled_neu_run / "deploy" / "model.keras")
    classes = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
    paths = [neu_dir / "IMAGES" / f"{name}_{i}.jpg" for name in classes for i in range(291, 296)]
    images = np.stack([read_image(p) for p in paths])
    trained = explain.grad_cam(model, images)
    random = explain.grad_cam(explain.randomize_head(model), images)
    rho = np.median([spearmanr(a.ravel(), b.ravel()).statistic for a, b in zip(trained, random)])
    assert rho < 0.5


def test_annotation_xml_files_are_not_images(tmp_path, make_neu_dataset):
    from steeldefect.data.dataset import scan_dataset

    root = make_neu_dataset(tmp_path / "NEU-DET")
    images = root / "IMAGES" if (root / "IMAGES").is_dir() else root
    count = len(scan_dataset(root))
    annotations = root / "ANNOTATIONS"
    annotations.mkdir(exist_ok=True)
    for path in sorted(images.glob("*.jpg")):
        (annotations / (path.stem + ".xml")).write_text("<annotation><object/></annotation>")
    assert len(scan_dataset(root)) == count


# --- explain_paths, `predict --explain`, the report gallery ------------------------------------------

CLASSES = ("clean", "defect")


def _save_model(path) -> object:
    """The bright-square model as a .keras file with the sidecar `predict` reads class names from."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    _bright_square_model().save(path)
    meta = {"class_names": list(CLASSES), "input": {"height": 32, "width": 32, "channels": 3}, "variant": "keras"}
    (path.parent / (path.name + ".json")).write_text(json.dumps(meta))
    return path


def _write_pngs(folder, images, names):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, name in zip(images, names):
        Image.fromarray(image).save(folder / name)
        paths.append(folder / name)
    return paths


def _peak_on_square(heatmap) -> bool:
    row, col = np.unravel_index(heatmap.argmax(), heatmap.shape)
    return SQUARE[0].start - 1 <= row < SQUARE[0].stop + 1 and SQUARE[1].start - 1 <= col < SQUARE[1].stop + 1


def _png_title(path) -> str:
    with Image.open(path) as png:
        return png.text["Title"]


def test_explain_paths_writes_titled_overlays_with_the_maximum_on_the_square(tmp_path):
    model = _save_model(tmp_path / "models" / "fold0.keras")
    images = _images(3)
    paths = _write_pngs(tmp_path / "a", images[:2], ["x.png", "y.png"]) + _write_pngs(
        tmp_path / "b", images[2:], ["x.png"]
    )
    bad = tmp_path / "a" / "broken.jpg"
    bad.write_bytes(b"not an image")
    results = explain_files.explain_paths(model, [*paths, bad], tmp_path / "heat", progress=False)
    good, broken = results[:3], results[3]
    assert broken.error and "broken.jpg" in broken.error and broken.png is None
    # Two inputs named x.png from different folders: neither heatmap overwrites the other.
    assert [r.png.name for r in good] == ["x.png", "y.png", "x_2.png"]
    for result in good:
        assert result.class_name == "defect" and result.probability > 0.5
        assert result.heatmap.shape == (32, 32) and _peak_on_square(result.heatmap)
        assert _png_title(result.png) == f"defect {result.probability:.3f}"
    assert sorted(p.name for p in (tmp_path / "heat").iterdir()) == ["x.png", "x_2.png", "y.png"]

    # Another model's answer (what `predict` printed from the .tflite) is what the PNG explains and shows.
    (other,) = explain_files.explain_paths(
        model, paths[:1], tmp_path / "other", answers=[[("clean", 0.6)]], progress=False
    )
    assert other.class_name == "clean" and _png_title(other.png) == "clean 0.600"
    clean_map = explain.grad_cam(_bright_square_model(), images[:1], class_index=0)[0]
    assert np.allclose(other.heatmap, clean_map, atol=1e-5) and not np.allclose(other.heatmap, good[0].heatmap)
    with pytest.raises(ValueError, match="has no class rust"):
        explain_files.explain_paths(model, paths[:1], None, answers=[[("rust", 0.9)]], progress=False)
    # An image the deployed model flagged says so in its title, as `predict` says so in its line.
    flagged = explain_files.explain_paths(
        model, paths[:2], tmp_path / "flagged", answers=[[("clean", 0.6)]] * 2, uncertain=[True, False], progress=False
    )
    assert [_png_title(r.png) for r in flagged] == ["clean 0.600 (uncertain)", "clean 0.600"]


def test_predict_explain_cli_prints_predictions_and_writes_one_png_per_image(tmp_path, capsys):
    from steeldefect.cli import main

    model = _save_model(tmp_path / "models" / "fold0.keras")
    paths = _write_pngs(tmp_path / "images", _images(2), ["crazing_1.png", "crazing_2.png"])
    out = tmp_path / "heat"
    assert main(["--quiet", "predict", str(model), *map(str, paths), "--explain", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("defect") >= 2 and "summary: 2 classified" in captured.out
    assert "heatmaps: 2 PNGs" in captured.err
    assert sorted(p.name for p in out.iterdir()) == ["crazing_1.png", "crazing_2.png"]
    assert _png_title(out / "crazing_1.png").startswith("defect ")


def test_predict_explain_with_a_tflite_alone_is_one_line_and_exit_1(tmp_path, capsys):
    from steeldefect.cli import main

    lonely = tmp_path / "elsewhere" / "fold0.int8.tflite"
    lonely.parent.mkdir()
    lonely.write_bytes(b"TFL3" + bytes(60))
    image = _write_pngs(tmp_path / "images", _images(1), ["a.png"])[0]
    out = tmp_path / "heat"
    assert main(["--quiet", "predict", str(lonely), str(image), "--explain", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(lonely) in err[0] and "no gradients" in err[0] and "Traceback" not in err[0]
    assert not out.exists()  # refused before any work


def test_a_tflite_finds_the_keras_model_beside_it(tmp_path):
    keras_path = _save_model(tmp_path / "models" / "fold3.keras")
    tflite = tmp_path / "models" / "fold3.int8.tflite"
    tflite.write_bytes(b"TFL3")
    assert explain_files.keras_model_for(tflite) == keras_path
    deploy = _save_model(tmp_path / "run" / "deploy" / "model.keras")
    (tmp_path / "run" / "config.json").write_text("{}")
    (tmp_path / "run" / "deploy" / "model.int8.tflite").write_bytes(b"TFL3")
    assert explain_files.keras_model_for(tmp_path / "run" / "deploy" / "model.int8.tflite") == deploy
    assert explain_files.keras_model_for(tmp_path / "run") == deploy


def test_predict_explain_into_a_file_is_one_line(tmp_path, capsys):
    from steeldefect.cli import main

    model = _save_model(tmp_path / "models" / "fold0.keras")
    image = _write_pngs(tmp_path / "images", _images(1), ["a.png"])[0]
    taken = tmp_path / "heat.png"
    taken.write_bytes(b"x")
    assert main(["--quiet", "predict", str(model), str(image), "--explain", str(taken)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and str(taken) in err[0] and "is a file" in err[0]
    assert captured.out == "" and taken.read_bytes() == b"x"


def _gallery_run(tmp_path):
    """A run folder with the bright-square model as the final model and 4 test images per class, of
    which two 'clean' ones carry the bright square (the model calls them defects: wrong)."""
    from steeldefect.core import runfolder

    run = tmp_path / "run"
    _save_model(runfolder.fold_model_path(run, "tiny", runfolder.FINAL, "keras"))
    rng = np.random.default_rng(1)
    clean = rng.integers(0, 120, (4, 32, 32, 3)).astype(np.uint8)
    clean[:2, SQUARE[0], SQUARE[1]] = 255  # look like defects
    images = np.concatenate([clean, _images(4)])
    labels = np.array([0] * 4 + [1] * 4)
    files = [f"IMAGES/clean_{i}.jpg" for i in range(4)] + [f"IMAGES/defect_{i}.jpg" for i in range(4)]
    return run, images, labels, files


def _read_csv(path):
    import csv

    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_gallery_has_two_correct_per_class_and_every_wrong_or_uncertain_image(tmp_path):
    from steeldefect.core import runfolder

    run, images, labels, files = _gallery_run(tmp_path)
    path = explain_files.write_gallery(run, "tiny", images, labels, files, CLASSES, progress=False)
    rows = _read_csv(path)
    assert [(r["file"], r["label"], r["predicted"], r["uncertain"]) for r in rows] == [
        ("IMAGES/clean_2.jpg", "clean", "clean", "false"),
        ("IMAGES/clean_3.jpg", "clean", "clean", "false"),
        ("IMAGES/defect_0.jpg", "defect", "defect", "false"),
        ("IMAGES/defect_1.jpg", "defect", "defect", "false"),
        ("IMAGES/clean_0.jpg", "clean", "defect", "false"),
        ("IMAGES/clean_1.jpg", "clean", "defect", "false"),
    ]
    for row in rows:
        png = runfolder.gallery_dir(run, "tiny") / row["png"]
        assert _png_title(png).startswith(f"{row['predicted']} {float(row['probability']):.3f}")
    assert _png_title(runfolder.gallery_dir(run, "tiny") / "clean_0.png").endswith("- is clean")

    # The trust step marks a correct image uncertain: it joins the list, a correct one replaces it.
    trust = runfolder.test_predictions_path(run, "tiny")
    trust.parent.mkdir(parents=True)
    trust.write_text("file,label,predicted,probability,uncertain\nIMAGES/defect_1.jpg,defect,defect,0.6,true\n")
    rows = _read_csv(explain_files.write_gallery(run, "tiny", images, labels, files, CLASSES, progress=False))
    assert [(r["file"], r["uncertain"]) for r in rows][2:4] == [
        ("IMAGES/defect_0.jpg", "false"),
        ("IMAGES/defect_2.jpg", "false"),
    ]
    assert ("IMAGES/defect_1.jpg", "true") in [(r["file"], r["uncertain"]) for r in rows[4:]]
    assert sorted(p.name for p in runfolder.gallery_dir(run, "tiny").glob("*.png")) == sorted(r["png"] for r in rows)

    # Unchanged model, flags and method: the gallery is kept, not recomputed.
    before = path.stat().st_mtime_ns
    explain_files.write_gallery(run, "tiny", images, labels, files, CLASSES, progress=False)
    assert path.stat().st_mtime_ns == before


def test_report_shows_the_gallery_without_tensorflow(tmp_path):
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from steeldefect.core import runfolder

    spec = importlib.util.spec_from_file_location(
        "run_fixture", Path(__file__).resolve().parents[1] / "fixtures" / "run_fixture.py"
    )
    run_fixture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_fixture)
    run = tmp_path / "run"
    run_fixture.make_fake_run(run)
    backbone = run_fixture.BACKBONE
    folder = runfolder.gallery_dir(run, backbone)
    folder.mkdir(parents=True)
    rows = []
    for i, (label, predicted) in enumerate(
        [("crazing", "crazing"), ("patches", "patches"), ("inclusion", "scratches")]
    ):
        heatmap = np.zeros((8, 8), np.float32)
        heatmap[i, i] = 1
        explain_files.save_overlay(_images(1)[0], heatmap, f"{predicted} 0.900", folder / f"img{i}.png")
        rows.append(f"IMAGES/{label}_{i}.jpg,{label},{predicted},0.900000,false,img{i}.png")
    runfolder.gallery_csv_path(run, backbone).write_text(
        "file,label,predicted,probability,uncertain,png\n" + "\n".join(rows) + "\n"
    )
    # In a fresh interpreter, so that "no TensorFlow" is checked, not inherited from this process.
    script = (
        "import sys; from steeldefect.study.report import write_report; write_report(sys.argv[1]); "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'report imported TensorFlow'"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(explain.__file__).parents[2]), os.environ.get("PYTHONPATH")])
        ),
    }
    subprocess.run([sys.executable, "-c", script, str(run)], check=True, env=env)
    report = runfolder.report_path(run).read_text()
    assert "## Where the model looked" in report
    assert f"plots/gallery_{backbone}_correct.png" in report and f"plots/gallery_{backbone}_wrong_1.png" in report
    assert "`IMAGES/inclusion_2.jpg` | inclusion | scratches" in report
    with Image.open(run / "plots" / f"gallery_{backbone}_correct.png") as grid, Image.open(folder / "img0.png") as one:
        assert grid.size == (2 * one.width, one.height)  # two correct images side by side


@pytest.mark.integration
def test_predict_explain_and_gallery_on_a_real_neu_run(neu_dir, pooled_neu_run, tmp_path, capsys):
    from steeldefect.cli import main
    from steeldefect.core import runfolder
    from steeldefect.study.rundata import load_run_data

    # `predict RUN --explain`: the run's int8 model prints, its .keras draws; one PNG per image.
    paths = [neu_dir / "IMAGES" / f"{name}_296.jpg" for name in ("crazing", "inclusion", "scratches")]
    out = tmp_path / "heat"
    assert main(["--quiet", "predict", str(pooled_neu_run), *map(str, paths), "--explain", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()[:3]
    for path, line in zip(paths, printed):
        answer = line.split(": ", 1)[1]
        flagged = answer.startswith("UNCERTAIN (most likely ")
        printed_class = answer.removeprefix("UNCERTAIN (most likely ").split()[0]
        title = _png_title(out / (path.stem + ".png"))
        assert title.split()[0] == printed_class and title.endswith("(uncertain)") == flagged

    # The gallery of the run's model to deploy: two correct per class and every wrong test image.
    prepared, _ = load_run_data(pooled_neu_run, progress=False)
    dataset, test = prepared.dataset, prepared.splits.test_indices
    files = [dataset.relative_names[i] for i in test]
    model_path = runfolder.deploy_model_path(pooled_neu_run, "keras")
    csv_path = explain_files.write_gallery(
        tmp_path / "run",
        "efficientnet_lite0",
        prepared.images[test],
        dataset.labels[test],
        files,
        dataset.class_names,
        model_path=model_path,
        progress=False,
    )
    rows = _read_csv(csv_path)
    model = keras.models.load_model(model_path)
    predicted = model.predict(prepared.images[test].astype(np.float32), verbose=0, batch_size=32).argmax(axis=1)
    wrong = {f for f, p, y in zip(files, predicted, dataset.labels[test]) if p != y}
    assert {r["file"] for r in rows if r["predicted"] != r["label"]} == wrong
    correct = [r["label"] for r in rows if r["predicted"] == r["label"]]
    assert sorted(correct) == sorted(list(dataset.class_names) * 2)


def test_a_shared_maximum_is_marked_at_the_centre_of_its_plateau():
    heatmap = np.zeros((9, 9), np.float32)
    heatmap[6:9, 0:3] = 1.0  # a border cell upsampled: flat out to the edge
    assert explain.peak(heatmap) == (7, 1)  # not (6, 0), argmax's first tied pixel on the image edge
    heatmap[2, 5] = 2.0
    assert explain.peak(heatmap) == (2, 5)  # a single maximum is itself
