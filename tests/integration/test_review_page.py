"""The inspector's review tab in headless Chromium against a real `steeldefect serve` process: real NEU
images answered through the API are kept for review, and a reviewer confirms one, corrects one and
names a new kind on the page; the decisions land in the audit database. The drift banner shows when
the service's drift alarm is on. Screenshot: ``test-artifacts/review-chromium.png`` (git-ignored)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e '.[serve]')")
from test_serve_live import ARTIFACTS, TOKEN, Server, request, start_chromium, wait_for  # noqa: E402

AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUEUE_STATE = """
const cards = [...document.querySelectorAll('#queue .review-card')];
return {
  tab: !document.getElementById('review-view').hidden,
  askName: !document.getElementById('reviewer-form').hidden,
  name: document.getElementById('reviewer-name').textContent,
  cards: cards.map(c => ({sha: c.dataset.sha256, decided: c.dataset.decided || null,
    answer: c.querySelector('.class').firstChild.textContent,
    image: c.querySelector('img.thumb') ? c.querySelector('img.thumb').naturalWidth : 0,
    outcome: c.querySelector('.outcome').textContent})),
  drift: document.getElementById('drift').hidden ? null : document.getElementById('drift').textContent,
};
"""


@pytest.fixture(scope="module")
def rule_model(tmp_path_factory) -> Path:
    from tiny_tflite import export_tiny_with_rule

    return export_tiny_with_rule(tmp_path_factory.mktemp("rule-model"), seed=1, accept=0.5)


@pytest.mark.integration
def test_a_reviewer_confirms_corrects_and_names_a_new_kind_on_the_page(rule_model, tmp_path, neu_dir):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    samples = [neu_dir / "IMAGES" / f"{name}_1.jpg" for name in ("crazing", "patches", "scratches", "inclusion")]
    browser = start_chromium(tmp_path / "chromium-profile")
    server = Server(
        rule_model, tmp_path, "--token", TOKEN, "--audit", "audit.sqlite", "--review", "review",
        "--review-sample", "1", "--drift-window", "100",
    )  # fmt: skip
    try:
        answers = [
            request(
                f"{server.url}/v1/predict",
                path.read_bytes(),
                {**AUTH, "Content-Type": "image/jpeg", "X-Client-Id": f"coil-{i}"},
            )[1]
            for i, path in enumerate(samples)
        ]
        browser.get(server.url + "/")
        wait_for(lambda: browser.execute_script("return !document.getElementById('token-field').hidden"), what="token")
        browser.find_element(By.ID, "token").send_keys(TOKEN + "\t")
        wait_for(lambda: browser.find_element(By.ID, "tab-review").is_displayed(), what="the review tab")
        browser.find_element(By.ID, "tab-review").click()
        assert browser.execute_script(QUEUE_STATE)["askName"]  # the page asks the reviewer's name once
        browser.find_element(By.ID, "reviewer").send_keys("ana\n")
        state = wait_for(
            lambda: (lambda s: s if len(s["cards"]) == 4 and all(c["image"] for c in s["cards"]) else None)(
                browser.execute_script(QUEUE_STATE)
            ),
            what="four queued images shown",
        )
        by_sha = {a["image"]["sha256"]: a for a in answers}
        assert [c["sha"] for c in state["cards"]] == [a["image"]["sha256"] for a in answers]
        assert [c["answer"] for c in state["cards"]] == [a["class"] for a in answers]
        cards = browser.find_elements(By.CSS_SELECTOR, "#queue .review-card")
        cards[0].find_element(By.CSS_SELECTOR, "button.confirm").click()
        other = Select(cards[1].find_element(By.CSS_SELECTOR, "select.other"))
        corrected = other.options[0].get_attribute("value")
        other.select_by_value(corrected)
        cards[1].find_element(By.CSS_SELECTOR, "button.pick").click()
        cards[2].find_element(By.CSS_SELECTOR, "input.kind").send_keys("oil_stain")
        cards[2].find_element(By.CSS_SELECTOR, "input.note").send_keys("shiny patch")
        cards[2].find_element(By.CSS_SELECTOR, "button.name-kind").click()
        cards[3].find_element(By.CSS_SELECTOR, "input.kind").send_keys("../etc")  # refused: not a folder name
        cards[3].find_element(By.CSS_SELECTOR, "button.name-kind").click()
        state = wait_for(
            lambda: (
                lambda s: s if sum(bool(c["decided"]) for c in s["cards"]) == 3 and s["cards"][3]["outcome"] else None
            )(browser.execute_script(QUEUE_STATE)),
            what="three decisions and one refusal shown",
        )
        ARTIFACTS.mkdir(exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "review-chromium.png"))
        # The same image over and over: one class where training had four evenly, so the drift alarm starts.
        same = samples[0].read_bytes()
        for _ in range(100):
            request(f"{server.url}/v1/predict", same, {**AUTH, "Content-Type": "image/jpeg"})
        browser.refresh()
        drift_state = wait_for(
            lambda: (lambda s: s if s["drift"] else None)(browser.execute_script(QUEUE_STATE)), what="the drift banner"
        )
        browser.find_element(By.ID, "tab-review").click()
        reloaded = wait_for(
            lambda: (lambda s: s if s["tab"] and s["cards"] and all(c["image"] for c in s["cards"]) else None)(
                browser.execute_script(QUEUE_STATE)
            ),
            what="the queue after a reload",
        )
        browser.save_screenshot(str(ARTIFACTS / "review-chromium-drift.png"))
    finally:
        browser.quit()
        server.stop()
    assert [c["decided"] for c in state["cards"][:3]] == [answers[0]["class"], corrected, "oil_stain"]
    assert "letters, digits" in state["cards"][3]["outcome"]
    assert drift_state["drift"].startswith("Drift alarm")
    assert not reloaded["askName"] and reloaded["name"] == "ana"  # remembered in localStorage
    assert [c["sha"] for c in reloaded["cards"]] == [answers[3]["image"]["sha256"]]  # the undecided one
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        rows = db.execute(
            "SELECT image_sha256, reviewer, decided_class, new_kind, note, model_class "
            "FROM review_decisions ORDER BY id"
        ).fetchall()
    shas = [a["image"]["sha256"] for a in answers]
    assert rows == [
        (shas[0], "ana", answers[0]["class"], 0, None, answers[0]["class"]),
        (shas[1], "ana", corrected, 0, None, answers[1]["class"]),
        (shas[2], "ana", "oil_stain", 1, "shiny patch", answers[2]["class"]),
    ]
    assert corrected != by_sha[shas[1]]["class"]
    assert "drift alarm: started" in server.output() and "Traceback" not in server.output()
