"""A table of bad inputs walked through the command line.

For every row: exit status non-zero, exactly one error line on stderr that names the path or option
(``{placeholders}`` are filled in from the row's world), no traceback, and no file changed, removed
or added anywhere in the world (an existing run folder, the dataset, ...) except under ``{out}``.

Adding a row is one line in ``CASES``: ``Case(id, "argv with {placeholders}", "text the line names")``,
optionally with ``setup=`` (a function of the World, run before the command) and ``as_user=True`` for
permission cases, which run in a subprocess as ``nobody`` (CI runs as root, which ignores permissions).

Placeholders: ``{tmp}`` the world's folder, ``{data}`` a good 3-class dataset, ``{run}`` an existing
run folder (report fixture), ``{out}`` a fresh run folder path, ``{keras}`` the Keras home, in which
the tiny backbone (``tiny``) is registered with valid weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from steeldefect import cli
from steeldefect.models import backbones
from tiny import TINY, make_dataset, register_tiny_backbone

ROOT = Path(__file__).resolve().parents[2]
FAST = "--folds 2 --learning-rates 0.01 --epochs 2 --batch-size 8 --image-size 32"


def _load_run_fixture():
    spec = importlib.util.spec_from_file_location("run_fixture", ROOT / "tests" / "fixtures" / "run_fixture.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_fixture = _load_run_fixture()


@dataclass(frozen=True)
class World:
    tmp: Path
    data: Path
    run: Path
    out: Path
    keras: Path

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, data=self.data, run=self.run, out=self.out, keras=self.keras)


@dataclass(frozen=True)
class Case:
    id: str
    argv: str  # shell-style words after `steeldefect`, with {placeholders}
    names: str  # the error line must contain this (with {placeholders})
    setup: Callable[[World], object] | None = None
    as_user: bool = False  # run as `nobody` in a subprocess: for permission cases


# ------------------------------------------------------------------ setups


def bad_image(kind: str) -> Callable[[World], Path]:
    def setup(world: World) -> Path:
        path = world.data / "dots" / "bad.png"
        good = (world.data / "dots" / "dots_0.png").read_bytes()
        path.write_bytes(
            {
                "corrupt": b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4,
                "truncated": good[: len(good) // 2],
                "zero-byte": b"",
            }[kind]
        )
        return path

    return setup


def corrupt_mobilenet(world: World) -> None:
    """MobileNet's exact size and the HDF5 signature, garbage inside."""
    target = world.keras / "models" / backbones.get_backbone("mobilenet").weights.filename
    size = backbones.get_backbone("mobilenet").weights.size
    target.write_bytes(b"\x89HDF\r\n\x1a\n" + np.random.default_rng(0).bytes(size - 8))


def mkdir(relative: str, mode: int | None = None) -> Callable[[World], None]:
    def setup(world: World) -> None:
        folder = world.tmp / relative
        folder.mkdir(parents=True, exist_ok=True)
        if mode is not None:
            folder.chmod(mode)

    return setup


def chmod(relative: str, mode: int) -> Callable[[World], None]:
    """``relative`` (a {placeholder} path) and every folder under it get ``mode``."""

    def setup(world: World) -> None:
        top = Path(world.fill(relative))
        for folder in [top, *(p for p in top.rglob("*") if p.is_dir())]:
            folder.chmod(mode)

    return setup


# ------------------------------------------------------------------ the table

CASES = [
    # Data
    Case("data-option-missing", f"train --backbone tiny --out {{out}} {FAST}", "--data"),
    Case("data-folder-missing", "train --data {tmp}/nope --backbone tiny --out {out}", "{tmp}/nope"),
    Case("data-is-a-file", "train --data {data}/dots/dots_0.png --backbone tiny --out {out}", "{data}/dots/dots_0.png"),
    Case(
        "image-corrupt",
        f"train --data {{data}} --backbone tiny --out {{out}} {FAST}",
        "{data}/dots/bad.png",
        setup=bad_image("corrupt"),
    ),
    Case(
        "image-truncated",
        f"train --data {{data}} --backbone tiny --out {{out}} {FAST}",
        "{data}/dots/bad.png",
        setup=bad_image("truncated"),
    ),
    Case(
        "image-zero-bytes",
        f"train --data {{data}} --backbone tiny --out {{out}} {FAST}",
        "{data}/dots/bad.png",
        setup=bad_image("zero-byte"),
    ),
    Case("inspect-folder-missing", "data inspect {tmp}/nope", "{tmp}/nope"),
    # Options
    Case("backbone-unknown", "train --data {data} --backbone resnet --out {out}", "--backbone"),
    Case("option-changed-in-run", f"train --data {{data}} --backbone tiny --out {{run}} {FAST}", "{run}/config.json"),
    Case("epochs-zero", "train --data {data} --backbone tiny --out {out} --epochs 0", "--epochs"),
    Case(
        "learning-rate-negative",
        "train --data {data} --backbone tiny --out {out} --learning-rates -1",
        "--learning-rates",
    ),
    Case("batch-size-zero", "train --data {data} --backbone tiny --out {out} --batch-size 0", "--batch-size"),
    Case(
        "test-fraction-above-one",
        "train --data {data} --backbone tiny --out {out} --test-fraction 1.5",
        "--test-fraction",
    ),
    Case("top-k-zero", "predict {tmp}/m.tflite {data} --top-k 0", "--top-k"),
    Case("threads-negative", "evaluate {run} --threads -1", "--threads"),
    Case(
        "out-is-a-file",
        f"train --data {{data}} --backbone tiny --out {{run}}/summary.json {FAST}",
        "{run}/summary.json",
    ),
    Case("predict-model-missing", "predict {tmp}/nope.tflite {data}", "{tmp}/nope.tflite"),
    # Weights
    Case(
        "mobilenet-corrupt-inside",
        f"train --data {{data}} --backbone mobilenet --out {{out}} {FAST}",
        "{keras}/models/mobilenet_1_0_224_tf_no_top.h5",
        setup=corrupt_mobilenet,
    ),
    Case(
        "mobilenet-missing",
        f"train --data {{data}} --backbone mobilenet --out {{out}} {FAST}",
        "{keras}/models/mobilenet_1_0_224_tf_no_top.h5",
    ),
    Case("weights-install-folder-missing", "weights install {tmp}/usb", "{tmp}/usb"),
    Case("weights-download-unknown-backbone", "weights download resnet", "'resnet'"),
    # Run folders
    Case("report-typo", "report {tmp}/runz", "{tmp}/runz"),
    Case("report-on-a-file", "report {run}/summary.json", "{run}/summary.json"),
    Case("report-empty-folder", "report {tmp}/empty", "{tmp}/empty", setup=mkdir("empty")),
    # Permissions (as nobody)
    Case(
        "inspect-unreadable-class-folder",
        "data inspect {data}",
        "{data}/dots",
        setup=chmod("{data}/dots", 0o000),
        as_user=True,
    ),
    Case("report-read-only-run", "report {run}", "{run}", setup=chmod("{run}", 0o555), as_user=True),
    # Fails on the folder before fetching anything, so it never reaches the internet.
    Case(
        "weights-download-read-only-cache",
        "weights download mobilenet",
        "{keras}/models",
        setup=chmod("{keras}", 0o555),
        as_user=True,
    ),
]

# Rows that fail today for a reason someone else is fixing: id -> reason (strict: they must fail).
KNOWN_FAILURES: dict[str, str] = {}


# ------------------------------------------------------------------ the harness


def make_world(base: Path, monkeypatch: pytest.MonkeyPatch) -> World:
    world = World(tmp=base, data=base / "data", run=base / "run", out=base / "out", keras=base / "keras")
    make_dataset(world.data, per_class=8, size=32)
    run_fixture.make_fake_run(world.run)
    register_tiny_backbone(monkeypatch, world.keras)
    monkeypatch.setenv("STEELDEFECT_CACHE", str(base / "cache"))
    return world


def snapshot(world: World) -> dict[str, tuple[int, int, str]]:
    """Every file of the world except caches and {out}: relative path -> (size, mtime_ns, sha256)."""
    skipped = {world.out, world.keras, world.tmp / "cache", world.tmp / "home"}
    state = {}
    for path in sorted(world.tmp.rglob("*")):
        if any(path == s or s in path.parents for s in skipped) or not path.is_file():
            continue
        stat = path.stat()
        state[str(path.relative_to(world.tmp))] = (
            stat.st_size,
            stat.st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
    return state


# TensorFlow's C++ start-up logging (absl / oneDNN), printed by the library before steeldefect runs;
# only subprocess rows see it, since in-process it was printed once when TensorFlow was imported.
_LIBRARY_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} \S+ +\d+ \S+:\d+\]"
    r"|To enable the following instructions|Matplotlib is building the font cache)"
)


def error_lines(stderr: str) -> list[str]:
    """stderr without argparse's usage block and library start-up noise: what the user is told."""
    lines = [line for line in stderr.splitlines() if line.strip() and not _LIBRARY_NOISE.match(line)]
    if lines and lines[0].startswith("usage:"):
        first_error = next((i for i, line in enumerate(lines) if ": error: " in line), 0)
        lines = lines[first_error:]
    return lines


def run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except Exception:  # cli.main re-raises what it does not expect: the user would see this traceback
        code = 1
        print(traceback.format_exc(), file=sys.stderr)
    return code, capsys.readouterr().err


@pytest.fixture(scope="session")
def shared_mpl_dir():
    """One Matplotlib config folder for every subprocess row: its font cache is built once, not per row."""
    folder = Path(tempfile.mkdtemp(prefix="steeldefect-mpl-", dir="/tmp"))
    folder.chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_as_nobody(argv: list[str], world: World, mpl_dir: Path) -> tuple[int, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]),
        "HOME": str(world.tmp / "home"),
        "KERAS_HOME": str(world.keras),
        "MPLCONFIGDIR": str(mpl_dir),
        "STEELDEFECT_CACHE": str(world.tmp / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    command = [
        "setpriv",
        "--reuid=nobody",
        "--regid=nogroup",
        "--clear-groups",
        sys.executable,
        "-m",
        "steeldefect",
        *argv,
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=world.tmp)
    return done.returncode, done.stderr


def _nobody_can_run() -> str | None:
    """None when permission rows can run as nobody here, else why not."""
    if os.geteuid() != 0:
        return None if os.access("/", os.R_OK) else "cannot check"
    if shutil.which("setpriv") is None:
        return "setpriv (util-linux) is not installed, so the test cannot drop root"
    probe = subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c", "import steeldefect"],
        env={"PYTHONPATH": str(ROOT / "src")},
        capture_output=True,
        timeout=60,
    )
    if probe.returncode != 0:
        return f"user nobody cannot import steeldefect from {ROOT} (is the checkout world-readable?)"
    return None


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            c,
            id=c.id,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[c.id])] if c.id in KNOWN_FAILURES else [],
        )
        for c in CASES
    ],
)
def test_bad_input_gets_one_line_and_changes_nothing(case: Case, tmp_path, monkeypatch, capsys, request):
    if case.as_user:
        reason = _nobody_can_run()
        if reason:
            pytest.skip(reason)
        # pytest's tmp_path sits under a root-only folder: the world must be reachable by nobody.
        base = Path(tempfile.mkdtemp(prefix="steeldefect-bad-input-", dir="/tmp"))
        base.chmod(0o755)
        request_cleanup = base
    else:
        base, request_cleanup = tmp_path / "world", None
        base.mkdir()
    try:
        world = make_world(base, monkeypatch)
        if case.as_user:
            for shared in ("home", "cache"):  # nobody's writable places
                (base / shared).mkdir()
                (base / shared).chmod(0o777)
        if case.setup:
            case.setup(world)
        before = snapshot(world)
        argv = ["--quiet", *shlex.split(world.fill(case.argv))]
        if case.as_user:
            code, stderr = run_as_nobody(argv, world, request.getfixturevalue("shared_mpl_dir"))
        else:
            code, stderr = run_in_process(argv, capsys)

        assert code not in (0, None), f"exit status {code}; stderr:\n{stderr}"
        assert "Traceback" not in stderr, stderr
        lines = error_lines(stderr)
        assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n" + "\n".join(lines)
        assert "error" in lines[0] and world.fill(case.names) in lines[0], lines[0]
        if case.as_user:
            chmod_back = [p for p in base.rglob("*") if p.is_dir()]
            for folder in chmod_back:
                folder.chmod(0o755)
        assert snapshot(world) == before
    finally:
        if request_cleanup is not None:
            for folder in [request_cleanup, *(p for p in request_cleanup.rglob("*") if p.is_dir())]:
                folder.chmod(0o755)
            shutil.rmtree(request_cleanup, ignore_errors=True)


def test_table_ids_are_unique():
    assert len({case.id for case in CASES}) == len(CASES)


def test_error_lines_drop_argparse_usage_and_library_noise():
    stderr = (
        "I0000 00:00:1795677373.026670   16581 port.cc:153] oneDNN custom operations are on.\n"
        "usage: steeldefect train [-h] --data DATA\n                         [--seed SEED]\n"
        "steeldefect train: error: argument --epochs: must be >= 1\n"
    )
    assert error_lines(stderr) == ["steeldefect train: error: argument --epochs: must be >= 1"]
    assert error_lines("error: a\nerror: b\n") == ["error: a", "error: b"]


def test_tiny_backbone_is_registered_for_the_table(tmp_path, monkeypatch):
    world = make_world(tmp_path, monkeypatch)
    assert backbones.weights_path(TINY).parent == world.keras / "models"


def test_written_files_follow_the_umask(tmp_path):
    """Atomic writes go through mkstemp (mode 0o600): without a chmod, a run folder or model written by
    one user could not be read by another, even with a permissive umask."""
    from steeldefect.core.files import atomic_save, write_json

    previous = os.umask(0o022)
    try:
        assert write_json(tmp_path / "a.json", {}).stat().st_mode & 0o777 == 0o644
        saved = atomic_save(tmp_path / "b.bin", lambda tmp: Path(tmp).write_bytes(b"x"), ".bin")
        assert saved.stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert write_json(tmp_path / "c.json", {}).stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)
