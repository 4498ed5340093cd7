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
CMU_ID = "cmu_small_region"


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


def listed(driver) -> list[str]:
    """The slide ids the slide list shows."""
    return js(driver, "return [...document.querySelectorAll('#slide-list button')].map(b => b.dataset.slideId)")


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

    # Find a slide by its metadata (the test stack searches the `file` key too), then open it.
    everything = listed(d)
    assert len(everything) >= 4
    assert d.find_element(By.ID, "case-key").text == "(case_id)"  # SMILY_CASE_KEY, from the gateway
    find = d.find_element(By.ID, "slide-find")
    find.send_keys("SYNTH-A")
    wait(d, lambda d: listed(d) == ["synth-a"])
    shot(d, "01-find-slides")
    find.send_keys(Keys.CONTROL, "a", Keys.NULL, "organ=nothing-like-this")
    wait(d, lambda d: d.find_element(By.ID, "slide-list").text == "No slide matches.")
    find.send_keys(Keys.CONTROL, "a", Keys.NULL, "file=synth-")  # under one searchable key
    wait(d, lambda d: {"synth-a", "synth-b", "synth-c-40x"} <= set(listed(d)) and CMU_ID not in listed(d))
    find.send_keys(Keys.CONTROL, "a", Keys.NULL, "synth-a", Keys.ENTER)
    wait(d, lambda d: listed(d) == ["synth-a"])
    d.find_element(By.CSS_SELECTOR, '#slide-list button[data-slide-id="synth-a"]').click()
    wait(
        d,
        lambda d: js(
            d, "const w = window.smily.viewer.world; return w.getItemCount() === 1 && w.getItemAt(0).getFullyLoaded()"
        ),
    )
    find.clear()
    find.send_keys(Keys.ENTER)
    wait(d, lambda d: listed(d) == everything)
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
            "window.smily.state.selection !== null && !document.querySelector('.hit-outline.focus')",
        ),
    )
    assert hits(d) == first_hits

    # "Less like this" on a hit re-runs the search: the hit is gone and the page is still full.
    gone = d.find_elements(By.CSS_SELECTOR, "#gallery .hit")[1]
    gone_key = (gone.get_attribute("data-slide-id"), gone.get_attribute("data-x"), gone.get_attribute("data-y"))
    after = search_and_wait(d, gone.find_element(By.CSS_SELECTOR, "button.less").click)
    assert gone_key not in [(h["slide"], h["x"], h["y"]) for h in after]
    assert len(after) == len(first_hits)
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


def centre(d, which="window.smily.viewer") -> list[float]:
    return js(
        d,
        f"const v = {which}.viewport; const c = v.viewportToImageCoordinates(v.getCenter(true)); return [c.x, c.y]",
    )


def loaded(d, which="window.smily.viewer") -> bool:
    return js(d, f"const w = {which}.world; return w.getItemCount() === 1 && w.getItemAt(0).getFullyLoaded()")


def frames(d, n: int) -> None:
    """Waits for n animation frames of the page (OpenSeadragon's events fire on frames)."""
    d.execute_async_script(
        "const done = arguments[arguments.length - 1]; let n = arguments[0];"
        "const step = () => (--n > 0 ? requestAnimationFrame(step) : done()); requestAnimationFrame(step);",
        n,
    )


def test_a_pathologist_reads_navigates_and_compares(browser, http_url, ingested, tmp_path):
    """Items of issue 28 as a pathologist meets them: the first screen, slide thumbnails, scale
    and magnification, label statistics, hit cards, outlines, Back/Forward across slides, a
    reloaded deep link, the heatmap, compare, polygon and freehand queries, an uploaded patch."""
    from PIL import Image
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d = browser
    d.get(http_url + "/")
    wait(d, lambda d: js(d, "return window.smily && window.smily.ready === true"))
    # The first screen says what to do; the favicon and the slide thumbnails load.
    assert d.find_element(By.ID, "first-screen").is_displayed()
    assert "Open a slide" in d.find_element(By.ID, "first-screen").text
    assert js(d, "return fetch('/static/favicon.svg').then(r => r.ok)")
    wait(
        d,
        lambda d: js(d, "return [...document.querySelectorAll('#slide-list img.thumb')].some(i => i.naturalWidth > 0)"),
    )
    assert d.find_element(By.CSS_SELECTOR, "label.file").size["width"] >= d.find_element(
        By.CSS_SELECTOR, "label.file"
    ).get_property("scrollWidth")
    shot(d, "10-first-screen")

    # Open the 40x slide: a scale bar and its µm/px and magnification.
    d.find_element(By.CSS_SELECTOR, '#slide-list button[data-slide-id="synth-c-40x"]').click()
    wait(d, loaded)
    assert not d.find_element(By.ID, "first-screen").is_displayed()
    readout = d.find_element(By.ID, "scale-readout").text
    assert "slide 0.250 µm/px" in readout and "×" in readout
    assert d.find_element(By.ID, "scale-bar").is_displayed()
    assert d.find_element(By.ID, "scale-text").text.endswith(("µm", "mm"))

    # A region query: label statistics of the top k, hit cards with their facts and score cue.
    d.find_element(By.ID, "select-centre").click()
    first = search_and_wait(d, d.find_element(By.ID, "search").click)
    assert first
    stats = d.find_element(By.ID, "label-stats")
    assert stats.is_displayed() and "not a diagnosis" in stats.text
    assert d.find_element(By.ID, "label-key").text == "file"
    assert d.find_element(By.ID, "label-k").text == "60"
    rows = d.find_elements(By.CSS_SELECTOR, "#label-rows tr")
    assert rows and d.find_element(By.ID, "label-majority").text == rows[0].find_element(By.TAG_NAME, "td").text
    card = d.find_element(By.CSS_SELECTOR, "#gallery .hit")
    assert "µm/px" in card.find_element(By.CSS_SELECTOR, ".facts").text
    assert card.find_element(By.TAG_NAME, "meter")
    for h in d.find_elements(By.CSS_SELECTOR, "#gallery .hit"):
        assert ("weak" in h.get_attribute("class")) == (float(h.get_attribute("data-score")) < 0.5)
    # This slide's hits are outlined on it.
    on_slide = [h for h in first if h["slide"] == "synth-c-40x"]
    assert len(d.find_elements(By.CSS_SELECTOR, "#viewer .hit-outline")) == len(on_slide)
    shot(d, "11-labels-and-cards")

    # Open a hit on another slide, then "Back to results": the slide, place, query and results as left.
    before = centre(d)
    label = d.find_element(By.ID, "query-label").text
    other = next(
        e
        for e in d.find_elements(By.CSS_SELECTOR, "#gallery .hit")
        if e.get_attribute("data-slide-id") != "synth-c-40x"
    )
    hit_slide, hit_x = other.get_attribute("data-slide-id"), other.get_attribute("data-x")
    other.find_element(By.CSS_SELECTOR, "button.open").click()
    wait(d, lambda d: js(d, "return window.smily.state.slide.slideId") == hit_slide and loaded(d))
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f'.hit-outline.focus[data-x="{hit_x}"]'))
    assert f"slide={hit_slide}" in d.current_url
    assert d.find_element(By.ID, "back-to-results").is_displayed()
    shot(d, "12-hit-on-another-slide")
    d.find_element(By.ID, "back-to-results").click()
    wait(d, lambda d: js(d, "return window.smily.state.slide.slideId") == "synth-c-40x" and loaded(d))
    wait(d, lambda d: all(abs(a - b) < 2 for a, b in zip(centre(d), before)))
    assert d.find_element(By.ID, "query-label").text == label
    assert hits(d) == first and "slide=synth-c-40x" in d.current_url
    assert not d.find_element(By.ID, "back-to-results").is_displayed()
    assert js(d, "return window.smily.state.selection.slideId") == "synth-c-40x"
    # Forward: the hit again.
    d.forward()
    wait(d, lambda d: js(d, "return window.smily.state.slide.slideId") == hit_slide)
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, f'.hit-outline.focus[data-x="{hit_x}"]'))
    d.back()
    wait(d, lambda d: js(d, "return window.smily.state.slide.slideId") == "synth-c-40x" and loaded(d))

    # The link survives a reload: same slide, same place, the query searched again.
    link = d.current_url
    assert "q=" in link and "zoom=" in link
    d.get("about:blank")
    d.get(link)
    wait(d, lambda d: js(d, "return window.smily && window.smily.ready === true"))
    wait(d, loaded)
    assert all(abs(a - b) < 2 for a, b in zip(centre(d), before))
    assert hits(d) == first and d.find_element(By.ID, "query-label").text == label
    shot(d, "13-deep-link")

    # Heatmap of the query over this slide, with its legend.
    d.find_element(By.ID, "heatmap").click()
    wait(d, lambda d: js(d, "return window.smily.heatmapTimings.length") > 0)
    cells = d.find_elements(By.CSS_SELECTOR, "#viewer .heatmap rect")
    assert cells and d.find_element(By.ID, "heatmap-legend").is_displayed()
    assert float(d.find_element(By.ID, "legend-high").text) >= float(d.find_element(By.ID, "legend-low").text)
    shot(d, "14-heatmap")
    d.find_element(By.ID, "heatmap").click()
    assert not d.find_elements(By.CSS_SELECTOR, "#viewer .heatmap rect")

    # Compare the query with a hit: locked pan and zoom, then unlocked.
    d.find_element(By.CSS_SELECTOR, "#gallery .hit button.compare").click()
    wait(
        d,
        lambda d: (
            js(d, "return !!window.smily.compare")
            and loaded(d, "window.smily.compare.left")
            and loaded(d, "window.smily.compare.right")
        ),
    )
    sel = js(d, "return window.smily.state.query.region")
    hit0 = d.find_element(By.CSS_SELECTOR, "#gallery .hit")
    anchor_q = (sel["x"] + sel["width"] / 2, sel["y"] + sel["height"] / 2)
    anchor_h = (
        int(hit0.get_attribute("data-x")) + int(hit0.get_attribute("data-width")) / 2,
        int(hit0.get_attribute("data-y")) + int(hit0.get_attribute("data-height")) / 2,
    )
    js(d, "window.smily.compare.left.viewport.panBy(new OpenSeadragon.Point(0.02, 0.01), true)")

    mpp = js(d, "return window.smily.compare.mpp")
    assert mpp["left"] == 0.25 and mpp["right"] > 0  # the 40x query slide and its hit's slide

    def offsets(d):
        """Offsets from the query's and the hit's centres, in µm."""
        left, right = centre(d, "window.smily.compare.left"), centre(d, "window.smily.compare.right")
        return (
            ((left[0] - anchor_q[0]) * mpp["left"], (left[1] - anchor_q[1]) * mpp["left"]),
            ((right[0] - anchor_h[0]) * mpp["right"], (right[1] - anchor_h[1]) * mpp["right"]),
        )

    def scales(d):
        """Screen pixels per µm of each view."""
        return [
            js(d, f"const v = window.smily.compare.{side}.viewport; return v.viewportToImageZoom(v.getZoom(true))")
            / mpp[side]
            for side in ("left", "right")
        ]

    # The right view follows the left one's pan (on its next frame): equal offsets in µm, equal scale.
    wait(d, lambda d: all(abs(a - b) < 1 for a, b in zip(*offsets(d))))
    moved, _ = offsets(d)
    assert abs(moved[0]) > 5
    left_scale, right_scale = scales(d)
    assert abs(left_scale - right_scale) / left_scale < 0.01
    shot(d, "15-compare")
    d.find_element(By.ID, "compare-lock").click()
    right = centre(d, "window.smily.compare.right")
    js(d, "window.smily.compare.left.viewport.panBy(new OpenSeadragon.Point(0.05, 0), true)")
    frames(d, 5)
    assert centre(d, "window.smily.compare.right") == right
    d.find_element(By.ID, "compare-close").click()

    # A polygon, by clicks (Enter closes it), searches with the tiles inside it.
    d.find_element(By.ID, "draw-polygon").click()
    canvas = d.find_element(By.CSS_SELECTOR, "#viewer .openseadragon-canvas")
    for dx, dy in ((-120, -100), (120, -90), (140, 110), (-100, 120)):
        ActionChains(d).move_to_element_with_offset(canvas, dx, dy).click().pause(0.3).perform()
    d.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)
    polygon = wait(d, lambda d: js(d, "return window.smily.state.query.region.polygon"))
    assert len(polygon) == 4 and d.find_element(By.ID, "query-label").text.startswith("polygon")
    assert d.find_elements(By.CSS_SELECTOR, "#viewer .query-region")
    by_polygon = search_and_wait(d, d.find_element(By.ID, "search").click)
    assert by_polygon
    shot(d, "16-polygon")

    # The polygon is in the link: reloaded (or shared), it runs the same polygon query.
    timings = js(d, "return window.smily.timings")  # the page's, before the reload starts a new one
    heat = js(d, "return window.smily.heatmapTimings")
    link = d.current_url
    assert "poly=" in link
    d.get("about:blank")
    d.get(link)
    wait(d, lambda d: js(d, "return window.smily && window.smily.ready === true"))
    wait(d, loaded)
    assert js(d, "return window.smily.state.query.region.polygon") == polygon
    assert d.find_element(By.ID, "query-label").text.startswith("polygon")
    assert d.find_elements(By.CSS_SELECTOR, "#viewer .query-region")
    assert hits(d) == by_polygon
    shot(d, "16b-polygon-link")
    canvas = d.find_element(By.CSS_SELECTOR, "#viewer .openseadragon-canvas")

    # Freehand: a drag around a region.
    d.find_element(By.ID, "draw-freehand").click()
    chain = ActionChains(d).move_to_element_with_offset(canvas, -80, -80).click_and_hold()
    for dx, dy in ((60, 0), (60, 0), (0, 60), (0, 60), (-60, 0), (-60, 0)):
        chain = chain.move_by_offset(dx, dy)
    chain.release().perform()
    free = wait(d, lambda d: js(d, "const r = window.smily.state.query.region; return r.polygon && r.polygon.length"))
    assert free >= 4

    # Keyboard: a tool toggles with Space and Escape leaves it.
    tool = d.find_element(By.ID, "draw")
    tool.send_keys(Keys.SPACE)
    assert tool.get_attribute("aria-pressed") == "true"
    tool.send_keys(Keys.ESCAPE)
    assert tool.get_attribute("aria-pressed") == "false"

    # An uploaded patch is previewed and replaces the region query (its box leaves the slide).
    patch = tmp_path / "patch.png"
    Image.new("RGB", (224, 224), (200, 120, 160)).save(patch)
    d.find_element(By.ID, "upload").send_keys(str(patch))
    wait(
        d,
        lambda d: js(d, "const i = document.getElementById('upload-preview'); return !i.hidden && i.naturalWidth > 0"),
    )
    assert d.find_element(By.ID, "upload-name").text == "patch.png"
    assert not d.find_elements(By.CSS_SELECTOR, "#viewer .query-region")
    assert js(d, "return window.smily.state.selection") is None
    search_and_wait(d, d.find_element(By.ID, "search").click)
    shot(d, "17-upload")

    timings += js(d, "return window.smily.timings")
    print(f"search-to-paint ms: {[round(t, 1) for t in timings]} (median {statistics.median(timings):.1f})")
    print(f"heatmap ms: {[round(t, 1) for t in heat]}")


AXE = os.path.join(ROOT, "services", "http", "vendor", "node_modules", "axe-core", "axe.min.js")


def axe(d) -> list[dict]:
    """Serious and critical WCAG 2 A/AA violations axe-core (npm, pinned; read from node_modules) finds."""
    if not os.path.exists(AXE):
        pytest.fail(f"{AXE} is missing: run `make web`")
    with open(AXE) as fh:
        js(d, fh.read())
    found = d.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa']}})"
        ".then(r => done(r.violations.map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target)}))))"
    )
    return [v for v in found if v["impact"] in ("serious", "critical")]


def test_axe_finds_no_serious_violations(browser, http_url, ingested):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(http_url + "/#slide=synth-a&x=1500&y=1100&zoom=2&qslide=synth-a&q=1024,768,512,512")
    wait(d, lambda d: js(d, "return window.smily && window.smily.ready === true"))
    wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery .hit"))
    assert axe(d) == []  # the page with a slide, a query and its results
    d.find_element(By.CSS_SELECTOR, "#gallery .hit button.compare").click()
    assert axe(d) == []  # the compare dialog
