"""The manual (docs/ + mkdocs.yml) builds with `mkdocs build --strict`, and the built site works on an
air-gapped line PC: no page, style sheet or script loads anything from another host, and in headless
Chromium (Debian's, through chromedriver; nothing is downloaded) every request of two pages stays on
the machine and the search box finds a word.

The screenshots of the two pages go to ``$STEELDEFECT_DOCS_SHOTS`` when set (else the test's
temporary folder), so a person can look at them."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import urlopen

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = ("index", "install", "data", "training", "export", "trust", "predict", "service", "results", "api")

# A resource loaded from another host: an attribute that fetches (src, href of <link>, poster, data of
# <object>, srcset), an @import or a url() in CSS. Protocol-relative "//host/..." counts as external.
EXTERNAL = r"""(?:https?:)?//(?!(?:127\.0\.0\.1|localhost)[:/])"""
HTML_LOADS = re.compile(
    r"""<(?:script|link|img|iframe|source|video|audio|embed|object|track|input)\b[^>]*?"""
    r"""\b(?:src|href|poster|data|srcset)\s*=\s*["']?\s*""" + EXTERNAL,
    re.IGNORECASE,
)
CSS_LOADS = re.compile(r"""(?:@import\s+(?:url\(\s*)?|url\(\s*)["']?\s*""" + EXTERNAL, re.IGNORECASE)
JS_LOADS = re.compile(r"""\b(?:src|href)\s*=\s*["']""" + EXTERNAL, re.IGNORECASE)
EXTERNAL_LINK = re.compile(r"""<a\b[^>]*\bhref\s*=\s*["']?\s*""" + EXTERNAL, re.IGNORECASE)


def test_every_bench_script_backs_a_docs_page_that_names_it():
    """Each bench/*.py produces a figure a page quotes: the page names the script, and the script's
    docstring names the page ("Figures: docs/<page>.md, ..."). Each experiment is on the design notes."""
    for script in sorted((ROOT / "bench").glob("*.py")):
        if script.stem == "benchio":  # the shared helper that saves every bench's figures
            continue
        docstring = ast.get_docstring(ast.parse(script.read_text(encoding="utf-8"))) or ""
        pages = re.findall(r"docs/[\w-]+\.md", docstring.partition("Figures:")[2])
        assert pages, f"{script.name}: its docstring names no docs page (Figures: docs/<page>.md, ...)"
        for page in pages:
            assert f"bench/{script.name}" in (ROOT / page).read_text(encoding="utf-8"), f"{page} does not name {script}"
    notes = (ROOT / "docs" / "design-notes.md").read_text(encoding="utf-8")
    for script in sorted((ROOT / "experiments").glob("*.py")):
        assert f"experiments/{script.name}" in notes, f"docs/design-notes.md does not name {script.name}"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocstrings"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed: pip install -e '.[docs]'")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-f", ROOT / "mkdocs.yml", "-d", out],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    return out


def test_strict_build_writes_every_page(site):
    for page in PAGES:
        assert (site / f"{page}.html").is_file(), page
    assert (site / "search" / "search_index.json").is_file()
    api = (site / "api.html").read_text(encoding="utf-8")
    assert "steeldefect.runtime.modelfile" in api and "Classifier" in api  # generated from the docstrings


def test_no_built_file_loads_anything_from_another_host(site):
    problems, links = [], []
    for path in sorted(site.rglob("*")):
        if path.suffix not in {".html", ".css", ".js"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        patterns = {".html": (HTML_LOADS, CSS_LOADS), ".css": (CSS_LOADS,), ".js": (JS_LOADS, CSS_LOADS)}[path.suffix]
        for pattern in patterns:
            problems += [f"{path.relative_to(site)}: {m.group(0)[:120]}" for m in pattern.finditer(text)]
        if path.suffix == ".html":
            links += [f"{path.relative_to(site)}: {m.group(0)[:120]}" for m in EXTERNAL_LINK.finditer(text)]
    assert not problems, "external resources:\n" + "\n".join(problems)
    # Links to other sites would be allowed, but the manual needs none (and the theme's footer link is off).
    assert not links, "external links:\n" + "\n".join(links)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(site):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urlopen(url + "/index.html", timeout=2):
                break
        except OSError:
            if time.monotonic() > deadline or server.poll() is not None:
                server.kill()
                raise
            time.sleep(0.2)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


def start_chromium(profile: Path):
    """Debian's headless Chromium through chromedriver, as the service's page tests start it, with the
    performance log on (every Network.requestWillBeSent) and every host but this machine unresolvable."""
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
        "--disable-features=OptimizationHints,MediaRouter,Translate",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # air-gapped: no other host resolves
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def requested_urls(browser) -> list[str]:
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def off_the_machine(url: str) -> bool:
    parsed = urlparse(url)
    if parsed.scheme in {"data", "about", "blob"}:
        return False
    return parsed.hostname not in {"127.0.0.1", "localhost"}


def wait_for(condition, timeout: float = 60.0, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_two_pages_and_the_search_work_with_no_request_leaving_the_machine(served, tmp_path):
    from selenium.webdriver.common.by import By

    shots = Path(os.environ.get("STEELDEFECT_DOCS_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    browser = start_chromium(tmp_path / "chromium-profile")
    urls: list[str] = []
    try:
        browser.get("about:blank")
        requested_urls(browser)  # drop the browser's own start-up (its new-tab page), before any page of ours
        for page, heading in (("index", "steeldefect"), ("service", "The service")):
            browser.get(f"{served}/{page}.html")
            wait_for(lambda h=heading: h in browser.find_element(By.TAG_NAME, "h1").text, what=f"{page}'s heading")
            # The theme's own style sheet is applied (it would be missing if it came from elsewhere).
            assert browser.execute_script("return getComputedStyle(document.querySelector('.md-header')).position")
            browser.save_screenshot(str(shots / f"{page}.png"))
            urls += requested_urls(browser)

        # The search index and its worker are part of the site: typing a word lists pages offline.
        box = browser.find_element(By.CSS_SELECTOR, "input.md-search__input")
        if not box.is_displayed():  # a narrow window shows only the search icon
            labels = browser.find_elements(By.CSS_SELECTOR, "label[for='__search']")
            next(label for label in labels if label.is_displayed()).click()
        wait_for(box.is_displayed, what="the search box")
        box.click()
        box.send_keys("audit")
        # The theme re-renders the result list as the index answers, so elements found a moment ago
        # can go stale: read every result's text in one script call, until there is some.
        titles = wait_for(
            lambda: " ".join(
                browser.execute_script(
                    "return [...document.querySelectorAll('.md-search-result__item')].map(e => e.innerText)"
                )
            ).strip(),
            what="search results",
        )
        browser.save_screenshot(str(shots / "search.png"))
        urls += requested_urls(browser)
    finally:
        browser.quit()
    assert "service" in titles.lower() or "audit" in titles.lower()
    assert any(url.endswith("/service.html") for url in urls)
    assert any("/assets/" in url for url in urls), urls  # the theme's files were fetched from the site
    leaving = sorted({url for url in urls if off_the_machine(url)})
    assert not leaving, "requests that left the machine:\n" + "\n".join(leaving)
