"""`steeldefect serve` as a real process on a free loopback port: hit over HTTP, stopped, killed; and
the inspector page driven by real headless browsers uploading real NEU images.

The model is ``$STEELDEFECT_SERVE_MODEL`` (a .tflite or a run folder, e.g. runs/neu-pooled) when set,
else a small exported model built here. Chromium needs Debian's ``chromium`` and ``chromium-driver``
and the ``selenium`` package; Firefox needs ``firefox-esr`` and ``marionette-driver`` (no geckodriver).
Each browser test skips, saying what is missing, without them, and saves a screenshot to
``test-artifacts/inspector-<browser>.png`` (git-ignored).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
from serve_helpers import export_small_classifier  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
TOKEN = "line-3-token"


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> Path:
    given = os.environ.get("STEELDEFECT_SERVE_MODEL")
    if given:
        return Path(given)
    return export_small_classifier(tmp_path_factory.mktemp("model"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m steeldefect serve ...` in a subprocess, its stderr in a file."""

    def __init__(self, model: Path, folder: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / f"serve-{self.port}.log"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
        env.pop("STEELDEFECT_TOKEN", None)
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "steeldefect", "serve", str(model), "--port", str(self.port), *args],
            cwd=folder,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 120  # the CLI imports TensorFlow before it reaches serve
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}: {self.log_path.read_text()}")
            try:
                if request(f"{self.url}/readyz")[0] == 200:
                    return
            except OSError:
                time.sleep(0.3)
        self.stop(signal.SIGKILL)
        raise AssertionError(f"server not ready after 120 s: {self.log_path.read_text()}")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            code = self.process.wait(timeout=30)
        finally:
            self.log.close()
        return code

    def output(self) -> str:
        return self.log_path.read_text()


def request(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=30) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        body, status = error.read(), error.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, {"text": body.decode(errors="replace")}


def neu_samples(neu_dir: Path, per_class: int) -> list[Path]:
    from conftest import NEU_CLASSES

    return [neu_dir / "IMAGES" / f"{name}_{i}.jpg" for name in NEU_CLASSES for i in range(1, per_class + 1)]


def test_real_process_answers_over_http_and_stops_cleanly(served_model, tmp_path, make_image):
    image = make_image(tmp_path / "strip.png", size=(90, 70))
    server = Server(served_model, tmp_path, "--audit", "audit.sqlite", "--workers", "2", "--threads", "1")
    try:
        status, answer = request(
            f"{server.url}/v1/predict", image.read_bytes(), {"Content-Type": "image/png", "X-Client-Id": "coil-17"}
        )
        assert status == 200 and answer["client_id"] == "coil-17"
        status, error = request(f"{server.url}/v1/predict", b"plain text", {"Content-Type": "image/png"})
        assert status == 422 and "not an image" in error["error"]
        status, history = request(f"{server.url}/v1/history")
        assert [e["id"] for e in history["entries"]] == [answer["audit_id"]]
        assert request(f"{server.url}/metrics")[0] == 200
    finally:
        code = server.stop(signal.SIGTERM)
    # Uvicorn shuts down gracefully, then re-raises the signal so the exit status tells how it ended.
    assert code in (0, -signal.SIGTERM)
    log = server.output()
    assert "steeldefect serve: stopping (1 answered)" in log
    assert "steeldefect serve: " in log and f"on http://127.0.0.1:{server.port}" in log
    assert "422 POST /v1/predict from 127.0.0.1: body: not an image" in log
    assert "Traceback" not in log


def test_sigkill_right_after_answers_loses_no_audit_entry(served_model, tmp_path, make_image):
    image = make_image(tmp_path / "strip.jpg", size=(64, 64)).read_bytes()
    server = Server(served_model, tmp_path, "--audit", "audit.sqlite")
    try:
        ids = [
            request(f"{server.url}/v1/predict", image, {"Content-Type": "image/jpeg"})[1]["audit_id"] for _ in range(40)
        ]
    finally:
        server.stop(signal.SIGKILL)  # no shutdown hook runs: only what was committed survives
    start_line = [line for line in server.output().splitlines() if line.startswith("steeldefect serve: ")]
    assert len(start_line) == 1 and f"{os.cpu_count()} worker(s) x 1 thread(s)" in start_line[0]
    assert "Traceback" not in server.output()
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        stored = [row[0] for row in db.execute("SELECT id FROM predictions ORDER BY id")]
    assert stored == ids


def test_serve_refuses_a_bad_model_and_a_busy_port(served_model, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "steeldefect", "serve", *map(str, args), "--no-audit"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\0" * 100)
    done = run(bad)
    assert done.returncode == 2
    # Checked by content before its metadata is read (issue #25: a file of the wrong format behind a
    # known suffix is one line).
    assert done.stderr.strip().splitlines()[-1] == f"error: {bad}: not a LiteRT model (no TFL3 identifier)"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run(served_model, "--port", taken.getsockname()[1])
    assert done.returncode != 0
    assert "address already in use" in done.stderr and "Traceback" not in done.stderr
    assert list(tmp_path.glob("*.sqlite")) == []


# What the page shows, read the same way in both browsers.
PAGE_STATE = """
return {
  cards: Array.from(document.querySelectorAll('.card')).map(c => [c.dataset.file, c.dataset.class || null,
                                                                 c.dataset.error || null]),
  pending: document.querySelectorAll('.card.pending').length,
  tally: Array.from(document.querySelectorAll('.tally-row')).map(r => [r.dataset.class,
                                                                      Number(r.querySelector('.n').textContent)]),
  count: document.getElementById('count').textContent,
  tokenShown: !document.getElementById('token-field').hidden
    && getComputedStyle(document.getElementById('token-field')).display !== 'none',
  model: document.getElementById('model').textContent,
};
"""


def wait_for(condition, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def uploads_for(neu_dir: Path, folder: Path) -> tuple[list[Path], Path]:
    samples = neu_samples(neu_dir, 2)
    broken = folder / "broken_strip.jpg"
    broken.write_bytes(samples[0].read_bytes()[:900])  # a truncated camera frame: shown as an error
    return samples, broken


def check_page_against_api(
    server: Server, state: dict, samples: list[Path], broken: Path, headers: dict | None = None
) -> None:
    """Each card shows the class the API gives for the same file; the tally counts them."""
    shown = {name: (cls, error) for name, cls, error in state["cards"]}
    api = {
        path.name: request(
            f"{server.url}/v1/predict", path.read_bytes(), {"Content-Type": "image/jpeg", **(headers or {})}
        )
        for path in [*samples, broken]
    }
    assert len(state["cards"]) == len(samples) + 1 and state["pending"] == 0
    for path in samples:
        status, answer = api[path.name]
        assert status == 200
        assert shown[path.name] == (answer["class"], None), path.name
    status, error = api[broken.name]
    assert status == 422 and shown[broken.name][0] is None
    assert shown[broken.name][1] == error["error"].replace("body: ", f"{broken.name}: ", 1)
    expected: dict[str, int] = {}
    for path in samples:
        expected[api[path.name][1]["class"]] = expected.get(api[path.name][1]["class"], 0) + 1
    assert {name: n for name, n in state["tally"] if n} == expected
    assert state["count"] == f"{len(samples)} images"


def start_chromium(profile: Path):
    """Debian's headless Chromium through chromedriver (both from apt; nothing is downloaded)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("headless Chromium not available: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


@pytest.mark.integration
def test_inspector_page_in_headless_chromium_shows_the_apis_answers(served_model, tmp_path, neu_dir):
    from selenium.webdriver.common.by import By

    samples, broken = uploads_for(neu_dir, tmp_path)
    browser = start_chromium(tmp_path / "chromium-profile")
    server = Server(served_model, tmp_path, "--token", TOKEN, "--audit", "audit.sqlite")
    try:
        browser.get(server.url + "/")
        # The page learns from the 401 that it needs a token and asks for it.
        wait_for(lambda: browser.execute_script(PAGE_STATE)["tokenShown"], what="the token field")
        browser.find_element(By.ID, "token").send_keys(TOKEN + "\t")
        wait_for(lambda: "sha256" in browser.execute_script(PAGE_STATE)["model"], what="the model line")
        browser.find_element(By.ID, "client").send_keys("coil-4711")
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in [*samples, broken]))
        state = wait_for(
            lambda: (lambda s: s if len(s["cards"]) == len(samples) + 1 and not s["pending"] else None)(
                browser.execute_script(PAGE_STATE)
            ),
            what="every card answered",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "inspector-chromium.png"))
        auth = {"Authorization": f"Bearer {TOKEN}"}
        history = request(f"{server.url}/v1/history", headers=auth)[1]
        check_page_against_api(server, state, samples, broken, auth)
    finally:
        browser.quit()
        server.stop()
    assert len(history["entries"]) == len(samples)  # the page's answers went to the audit log, with the coil
    assert {entry["client_id"] for entry in history["entries"]} == {"coil-4711"}


@pytest.mark.integration
def test_inspector_page_flags_uncertain_answers_with_their_calibrated_confidence(pooled_neu_run, tmp_path, neu_dir):
    """The real deploy model (its uncertainty rule and temperature inside the file): among NEU images,
    a photograph gets the page's "uncertain" badge; every card shows the calibrated confidence the API
    gives."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (test extra) provides the photograph")
    from steeldefect.core.runfolder import deployable_model

    photo = tmp_path / "astronaut.jpg"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    samples = [*neu_samples(neu_dir, 1)[:2], photo]
    browser = start_chromium(tmp_path / "chromium-profile")
    server = Server(deployable_model(pooled_neu_run).resolve(), tmp_path, "--no-audit")
    try:
        browser.get(server.url + "/")
        wait_for(lambda: "sha256" in browser.execute_script(PAGE_STATE)["model"], what="the model line")
        browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in samples))
        wait_for(
            lambda: len(browser.find_elements(By.CSS_SELECTOR, ".card:not(.pending)")) == len(samples),
            what="every card answered",
        )
        cards = {card.get_attribute("data-file"): card for card in browser.find_elements(By.CSS_SELECTOR, ".card")}
        shown = {
            name: (
                "uncertain" in card.get_attribute("class"),
                [badge.text for badge in card.find_elements(By.CSS_SELECTOR, ".badge")],
                card.find_element(By.CSS_SELECTOR, ".meta").text,
            )
            for name, card in cards.items()
        }
        count = browser.find_element(By.ID, "count").text
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "inspector-chromium-uncertain.png"))
        api = {
            path.name: request(f"{server.url}/v1/predict", path.read_bytes(), {"Content-Type": "image/jpeg"})[1]
            for path in samples
        }
    finally:
        browser.quit()
        server.stop()
    assert api[photo.name]["uncertain"] is True  # a photograph is not a steel surface
    n_uncertain = sum(answer["uncertain"] for answer in api.values())
    assert count == f"{len(samples)} images · {n_uncertain} uncertain"
    for path in samples:
        answer = api[path.name]
        flagged, badges, meta = shown[path.name]
        assert flagged == answer["uncertain"] and ("uncertain" in badges) == answer["uncertain"], path.name
        assert meta.startswith(f"calibrated confidence {100 * answer['confidence']:.1f}%"), path.name


@pytest.mark.integration
def test_inspector_page_in_headless_firefox_shows_the_apis_answers(served_model, tmp_path, neu_dir):
    """Firefox through its own Marionette protocol (no geckodriver needed), a service without token."""
    marionette = pytest.importorskip(
        "marionette_driver.marionette", reason="marionette-driver is not installed (pip install marionette-driver)"
    )
    firefox = shutil.which("firefox-esr") or shutil.which("firefox")
    if not firefox:
        pytest.skip("headless Firefox not available: apt-get install firefox-esr")
    from marionette_driver.by import By

    samples, broken = uploads_for(neu_dir, tmp_path)
    server = Server(served_model, tmp_path, "--no-audit")
    profile = tmp_path / "firefox-profile"
    profile.mkdir()
    port = free_port()
    prefs = {
        "marionette.port": port,
        "app.update.disabledForTesting": True,
        "browser.shell.checkDefaultBrowser": False,
        "datareporting.policy.dataSubmissionEnabled": False,
        "toolkit.telemetry.enabled": False,
        "network.captive-portal-service.enabled": False,
        "network.connectivity-service.enabled": False,
        "browser.safebrowsing.malware.enabled": False,
        "browser.safebrowsing.phishing.enabled": False,
        "extensions.update.enabled": False,
        "app.normandy.enabled": False,
        "browser.startup.homepage_override.mstone": "ignore",
    }
    user_js = "".join(f"user_pref({json.dumps(key)}, {json.dumps(value)});\n" for key, value in prefs.items())
    (profile / "user.js").write_text(user_js)
    browser = subprocess.Popen(
        [firefox, "--headless", "--marionette", "--no-remote", "-profile", str(profile)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = None
    try:
        client = marionette.Marionette(host="127.0.0.1", port=port, startup_timeout=60)
        client.start_session()
        client.set_window_rect(width=1400, height=1000)
        client.navigate(server.url + "/")
        state = wait_for(
            lambda: (lambda s: s if "sha256" in s["model"] else None)(client.execute_script(PAGE_STATE)),
            what="the model line",
        )
        assert not state["tokenShown"]  # no token on this service: the page does not ask for one
        client.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in [*samples, broken]))
        state = wait_for(
            lambda: (lambda s: s if len(s["cards"]) == len(samples) + 1 and not s["pending"] else None)(
                client.execute_script(PAGE_STATE)
            ),
            what="every card answered",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "inspector-firefox.png").write_bytes(client.screenshot(format="binary"))
        check_page_against_api(server, state, samples, broken)
    finally:
        if client is not None:
            client.delete_session()
        browser.terminate()
        browser.wait(timeout=30)
        server.stop()
