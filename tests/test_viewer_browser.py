"""The viewer in a real headless Chromium (Debian's chromium + chromium-driver, driven
by Selenium) against the real stack: a SMILY session end to end on the sample slides.

Screenshots of every step go to var/artifacts/viewer/ (the path is printed).
"""

from __future__ import annotations

import os
import statistics

import httpx
import pytest

from .conftest import ROOT

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = os.path.join(ROOT, "var", "artifacts", "viewer")


@pytest.fixture(scope="module")
def browser():
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            pytest.fail(f"{path} is missing: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--window-size=1280,800",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
    ):
        opts.add_argument(arg)
    # The console, to see any Content-Security-Policy violation.
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium Manager never downloads one.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_window_size(1280, 800)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def concept(http_url, ingested):
    """A concept learned from a few tiles of one slide against tiles of another."""
    with httpx.Client(base_url=http_url, timeout=300) as c:

        def tiles(slide_id):
            hits = c.post(
                "/v1/search",
                json={
                    "region": {"slideId": slide_id, "x": 0, "y": 0, "width": 2048, "height": 2048},
                    "k": 3,
                    "slideIds": [slide_id],
                },
            ).json()
            return [{"region": {k: h[k] for k in ("slideId", "x", "y", "width", "height")}} for h in hits["hits"]]

        r = c.post(
            "/v1/concepts",
            json={"name": "synth-c-like", "withExamples": tiles("synth-c-40x"), "withoutExamples": tiles("synth-a")},
        )
        assert r.status_code == 200, r.text
        yield "synth-c-like"
        c.delete("/v1/concepts/synth-c-like")


def shot(driver, name: str) -> str:
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, f"{name}.png")
    driver.save_screenshot(path)
    print(f"screenshot: {path}")
    return path


def wait(driver, what, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: what(d))


def js(driver, script, *args):
    return driver.execute_script(script, *args)


def hits(driver) -> list[dict]:
    return js(
        driver,
        """return [...document.querySelectorAll('#gallery .hit')].map(e => ({
        slide: e.dataset.slideId, x: e.dataset.x, y: e.dataset.y, score: Number(e.dataset.score)}));""",
    )


def search_and_wait(driver, click) -> list[dict]:
    before = js(driver, "return window.smily.timings.length")
    click()
    wait(driver, lambda d: js(d, "return window.smily.timings.length") > before)
    return hits(driver)


def test_a_smily_session_in_the_browser(browser, http_url, ingested, concept):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(http_url + "/")
    wait(d, lambda d: js(d, "return window.smily && window.smily.ready === true"))
    assert d.find_elements(By.CSS_SELECTOR, '#slide-list button[data-slide-id="synth-a"]')
    # Concept sliders come from ListConcepts; every control has a label.
    assert d.find_elements(By.CSS_SELECTOR, f'input[type=range][data-concept="{concept}"]')
    unlabelled = js(
        d,
        """return [...document.querySelectorAll('input, button')].filter(e =>
        !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim()
        && e.type !== 'hidden').map(e => e.id || e.outerHTML)""",
    )
    assert not unlabelled, unlabelled
    shot(d, "01-page")

    # Filter the slide list, then open a sample slide.
    d.find_element(By.ID, "slide-filter").send_keys("synth-a")
    assert [e.get_attribute("data-slide-id") for e in d.find_elements(By.CSS_SELECTOR, "#slide-list button")] == [
        "synth-a"
    ]
    d.find_element(By.CSS_SELECTOR, '#slide-list button[data-slide-id="synth-a"]').click()
    wait(
        d,
        lambda d: js(
            d, "const w = window.smily.viewer.world; return w.getItemCount() === 1 && w.getItemAt(0).getFullyLoaded()"
        ),
    )
    d.find_element(By.ID, "slide-filter").clear()
    js(d, "document.getElementById('slide-filter').dispatchEvent(new Event('input'))")
    shot(d, "02-slide")

    # Draw a region with the rectangle tool.
    d.find_element(By.ID, "draw").click()
    canvas = d.find_element(By.CSS_SELECTOR, "#viewer .openseadragon-canvas")
    ActionChains(d).move_to_element_with_offset(canvas, -60, -60).click_and_hold().move_by_offset(
        40, 40
    ).move_by_offset(60, 60).release().perform()
    selection = wait(d, lambda d: js(d, "return window.smily.state.selection"))
    assert selection["width"] > 50 and selection["height"] > 50
    shot(d, "03-region")

    # Search: the gallery's hits carry their slide, place and score.
    first_hits = search_and_wait(d, d.find_element(By.ID, "search").click)
    assert len(first_hits) >= 6
    for h in first_hits:
        assert h["slide"] and h["x"].isdigit() and h["y"].isdigit() and 0 < h["score"] <= 1.0001
    scores = [h["score"] for h in first_hits]
    assert scores[0] == max(scores)
    # Thumbnails come lazily through IIIF.
    wait(
        d,
        lambda d: js(
            d, "const i = document.querySelector('#gallery .hit img'); return i.complete && i.naturalWidth === 128"
        ),
    )
    shot(d, "04-gallery")

    # Click the first hit: the viewer moves to it, outlined.
    centre = js(d, "const c = window.smily.viewer.viewport.getCenter(); return [c.x, c.y]")
    first = d.find_element(By.CSS_SELECTOR, "#gallery .hit")
    target = (first.get_attribute("data-slide-id"), first.get_attribute("data-x"), first.get_attribute("data-y"))
    first.find_element(By.CSS_SELECTOR, "button.open").click()
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f'.hit-outline[data-x="{target[1]}"][data-y="{target[2]}"]'))
    wait(d, lambda d: js(d, "return window.smily.state.slide.slideId") == target[0])
    moved = js(d, "const c = window.smily.viewer.viewport.getCenter(); return [c.x, c.y]")
    assert moved != centre
    wait(d, lambda d: js(d, "return window.smily.viewer.world.getItemAt(0).getFullyLoaded()"))
    shot(d, "05-hit")

    # Back returns to the query: its slide, its region, the same gallery.
    d.back()
    wait(
        d,
        lambda d: js(
            d,
            "return window.smily.state.slide.slideId === 'synth-a' && "
            "window.smily.state.selection !== null && !document.querySelector('.hit-outline')",
        ),
    )
    assert hits(d) == first_hits

    # "Less like this" on a hit, search again: it is gone.
    gone = d.find_elements(By.CSS_SELECTOR, "#gallery .hit")[1]
    gone_key = (gone.get_attribute("data-slide-id"), gone.get_attribute("data-x"), gone.get_attribute("data-y"))
    gone.find_element(By.CSS_SELECTOR, "button.less").click()
    after = search_and_wait(d, d.find_element(By.ID, "search").click)
    assert gone_key not in [(h["slide"], h["x"], h["y"]) for h in after]
    assert "1 less like this" in d.find_element(By.ID, "examples").text
    shot(d, "06-negative")

    # A concept slider changes the ranking (keyboard: End moves it to +1).
    slider = d.find_element(By.CSS_SELECTOR, f'input[type=range][data-concept="{concept}"]')
    steered = search_and_wait(d, lambda: slider.send_keys(Keys.END))
    assert slider.get_attribute("value") == "1"
    assert [(h["slide"], h["x"], h["y"]) for h in steered] != [(h["slide"], h["x"], h["y"]) for h in after]
    shot(d, "07-concept")

    # At most one hit per slide.
    box = d.find_element(By.ID, "max-per-slide")
    capped = search_and_wait(d, lambda: box.send_keys(Keys.CONTROL, "a", Keys.NULL, "1", Keys.TAB))
    slides = [h["slide"] for h in capped]
    assert slides and len(slides) == len(set(slides))

    # Whole-slide search from the open slide.
    d.find_element(By.ID, "search-slides").click()
    wait(d, lambda d: "slides like synth-a" in d.find_element(By.ID, "status").text)
    similar = [h["slide"] for h in hits(d)]
    assert similar and "synth-a" not in similar
    shot(d, "08-similar-slides")

    # The open slide's tiles went under a view session the server minted (its info.json).
    assert js(d, "return window.smily.state.viewSession").count(".") == 1
    # The page runs under its CSP without a single violation (no inline script or style).
    violations = [e["message"] for e in d.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not violations, violations

    # Click (or slider change) to the gallery painted, for every search of the session.
    timings = js(d, "return window.smily.timings")
    print(f"search-to-paint ms: {[round(t, 1) for t in timings]} (median {statistics.median(timings):.1f})")


def test_ingest_progress_from_the_page(browser, http_url, ingested):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(http_url + "/")
    wait(d, lambda d: js(d, "return window.smily && window.smily.ready === true"))
    d.find_element(By.CSS_SELECTOR, "#ingest-panel summary").click()
    d.find_element(By.ID, "ingest-source").send_keys("synth-c-40x.svs")
    d.find_element(By.ID, "ingest-id").send_keys("page-c")
    d.find_element(By.ID, "ingest-meta").send_keys("case_id=C-9, stain=HE")
    d.find_element(By.CSS_SELECTOR, "#ingest-form button[type=submit]").click()
    wait(d, lambda d: "page-c: succeeded" in d.find_element(By.ID, "operations").text, timeout=300)
    bar = d.find_element(By.CSS_SELECTOR, "#operations progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") != "1"
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, '#slide-list button[data-slide-id="page-c"]'))
    shot(d, "09-ingest")
    httpx.delete(f"{http_url}/v1/slides/page-c")
