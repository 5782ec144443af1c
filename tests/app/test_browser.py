"""Real-browser test: the app started as a user starts it, headless Chromium driven by Playwright.

Opens the app with no input (the demo family is the default) and asserts each page shows the
numbers the backend computes for the demo family. Screenshots are kept in artifacts/.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from analysis.checkpoints import open_checkpoint
from analysis.families.demo import default_demo_dir, demo_is_current
from analysis.sparsity.diff import diff_checkpoints
from analysis.sparsity.overlap import overlap
from conftest import ROOT

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    assert demo_is_current(default_demo_dir()), "build the demo first: make demo"
    port = _free_port()
    runs = tmp_path_factory.mktemp("runs")  # the fine-tune runs this test launches stay out of the user's list
    env = dict(os.environ, HF_HUB_OFFLINE="1", SUBNETSCOPE_RUNS=str(runs))
    log = open(tmp_path_factory.mktemp("server") / "streamlit.log", "w+")  # a file: a pipe nobody reads fills up
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1",
         "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
            assert proc.poll() is None, (log.seek(0), log.read())[1]
        else:
            pytest.fail("streamlit did not start within 90 s")
        yield url
    finally:
        from analysis.jobs import queue

        os.environ["SUBNETSCOPE_RUNS"], saved = str(runs), os.environ.get("SUBNETSCOPE_RUNS")
        queue.shutdown()  # the worker the page started, if any
        if saved is not None:
            os.environ["SUBNETSCOPE_RUNS"] = saved
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def browser_page(app_url):
    if not os.access(CHROMIUM, os.X_OK):  # reported as skipped with this reason (pytest -rs), never as passed
        pytest.skip(f"browser tests NOT run: Chromium is not installed at {CHROMIUM} "
                    "(apt-get install -y chromium; `make test` does it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 2200})
        finally:
            browser.close()


# What a reader needs of every Plotly chart, read from the rendered page: the plot area (the drag
# rectangle of each subplot) takes ≥ 70% of the figure's width (legends and long labels must not
# squeeze it); no tick or title text sticks out of its figure; and a heatmap whose colour range is
# not the fixed, labelled 0–100% scale of the sparsity maps, nor a diverging scale centred on 0
# (relevance, ±max|z|), spans exactly its data's min and max.
_CHART_CHECK = """
() => [...document.querySelectorAll('.js-plotly-plot')].map((el, i) => {
  const svg = el.querySelector('.main-svg');
  if (!svg) return {i, skip: true};
  const box = svg.getBoundingClientRect();
  if (box.width < 50) return {i, skip: true};
  const drag = [...el.querySelectorAll('.nsewdrag')].map(r => r.getBoundingClientRect().width);
  const area = drag.length ? Math.max(...drag) : box.width;
  const over = [...el.querySelectorAll('.xtick text, .ytick text, .g-xtitle text, .g-ytitle text, .gtitle')]
    .filter(t => { const b = t.getBoundingClientRect();
                   return b.width > 0 && (b.left < box.left - 2 || b.right > box.right + 2); })
    .map(t => t.textContent);
  const ranges = (el._fullData || []).filter(d => d.type === 'heatmap' && !(d.zmin === 0 && d.zmax === 1)
                                               && !(d.zmin === -d.zmax))  // diverging: ±max|z| around 0
    .map(d => { const z = (d.z || []).flat().filter(v => v !== null && isFinite(v));
                return {zmin: d.zmin, zmax: d.zmax, lo: Math.min(...z), hi: Math.max(...z)}; });
  const title = (el.layout && el.layout.title && el.layout.title.text) || String(i);
  return {i, title, share: area / box.width, over, ranges};
})
"""


def check_charts(page, where: str) -> int:
    """Asserts the reading checks above on every chart of the page; returns how many were checked."""
    found = [c for c in page.evaluate(_CHART_CHECK) if not c.get("skip")]
    for c in found:
        print(f"{where}: {c['share']:.0%} plot area: {c['title'][:50]}")  # shown with pytest -s
        assert c["share"] >= 0.7, f"{where}: chart {c['title']!r} plot area is {c['share']:.0%} of its width"
        assert not c["over"], f"{where}: chart {c['title']!r} text outside the figure: {c['over'][:3]}"
        for r in c["ranges"]:
            assert abs(r["zmin"] - r["lo"]) <= 1e-9 * max(1, abs(r["lo"])) and \
                abs(r["zmax"] - r["hi"]) <= 1e-9 * max(1, abs(r["hi"])), f"{where}: {c['title']!r} colour range {r}"
    return len(found)


_TITLES = """
() => [...document.querySelectorAll('.gtitle, .g-xtitle text, .g-ytitle text, .cbtitle text')]
  .map(t => t.textContent)
"""


def check_reading(page, where: str) -> None:
    """What a reader reads, on the rendered page: checkpoints by short names (no absolute path of the
    demo family in the visible text), chart titles, axis titles, legends and colour-bar titles in words
    (no snake_case), legends not cut to a few letters, and no tolerance written as a long decimal
    (0.000125893: τ is written 1.26e-4)."""
    import re

    body = page.inner_text("body")
    home = str(default_demo_dir())
    assert home not in body, f"{where}: an absolute path in the page: {body[body.index(home) - 40:][:120]!r}"
    assert not re.search(r"0\.0000?\d{5,}", body), f"{where}: a long decimal: {re.search(r'0[.]0+[0-9]{5,}', body)}"
    titles = page.evaluate(_TITLES)
    # a field's name (update_sparsity, o1_random) in a title; tensor and module names (self_attn.q_proj,
    # o_proj, mlp_norm) are names, not titles, and stay as the model spells them
    ident = re.compile(r"[\w.]*\.[\w.]+|\w+_(proj|norm)\b")
    snake = [t for t in titles if re.search(r"\b[a-z0-9]+_[a-z0-9_]+\b", ident.sub("", t))]
    assert not snake, f"{where}: snake_case titles {snake[:5]}"
    cut = [t for t in titles if t.endswith(("…", "...")) and len(t) <= 8]
    assert not cut, f"{where}: legends cut to a few letters {cut[:5]}"


def _open(page, url: str, shot: str) -> list[str]:
    """Opens a page, waits for its metrics and charts, keeps a screenshot, returns metric values."""
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_test_id("stMetricValue").first.wait_for(timeout=90_000)
    page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
    page.wait_for_timeout(1500)  # let the charts finish drawing for the screenshot
    out = ROOT / "artifacts" / shot
    out.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(out), full_page=True)
    body = page.inner_text("body")
    assert "Traceback" not in body and "Error" not in body
    assert check_charts(page, shot) >= 1
    check_reading(page, shot)
    return page.get_by_test_id("stMetricValue").all_inner_texts()


def test_checkpoints_page_in_chromium(app_url, browser_page):
    """With no input the app opens on the demo family and shows the exact parameter count."""
    expected = open_checkpoint(default_demo_dir() / "base").total_params
    values = _open(browser_page, app_url, "checkpoints-page.png")
    assert values[0] == f"{expected:,}"
    body = browser_page.inner_text("body")
    assert "demo/base" in body and "demo/rl-seed2" in body


def test_typed_bad_path_shows_error_rest_works(app_url, browser_page, tmp_path):
    """A user types a path that does not exist as the base and presses Enter: a red box names it,
    the three fine-tunes are still shown."""
    d = default_demo_dir()
    _open(browser_page, app_url, "checkpoints-page.png")
    bad = str(tmp_path / "no-such-model")
    box = browser_page.get_by_role("combobox", name="Base")  # the sidebar also holds the family form's boxes
    box.click()
    box.fill(bad)
    box.press("Enter")
    alert = browser_page.get_by_test_id("stAlertContentError").first
    alert.wait_for(timeout=60_000)
    browser_page.wait_for_timeout(1000)
    browser_page.screenshot(path=str(ROOT / "artifacts" / "bad-path.png"), full_page=True)
    assert f"{bad}: no such file or directory" in alert.inner_text()
    values = browser_page.get_by_test_id("stMetricValue").all_inner_texts()
    assert values[0] == f"{open_checkpoint(d / 'sft').total_params:,}" and len(values) == 3 * 4


def test_typed_pair_survives_a_reload(app_url, browser_page):
    """Type a base (with a trailing slash), drop two fine-tunes, reload: the same pair is shown, the
    URL carries it, and the typed path is one entry with the demo's own sft."""
    d = default_demo_dir()
    page = browser_page
    page.goto(app_url, wait_until="domcontentloaded")
    page.get_by_test_id("stMetricValue").first.wait_for(timeout=90_000)
    box = page.get_by_role("combobox", name="Base")
    box.click()
    box.fill(str(d / "sft") + "/")
    box.press("Enter")
    page.wait_for_function("() => location.search.includes('demo%2Fsft&')", timeout=30_000)
    for name in ("demo/sft", "demo/rl-seed2"):  # the fine-tunes' chips: remove two, one after the other
        page.get_by_role("button", name=f"Remove {name}").first.click()
        page.wait_for_timeout(1200)
    page.wait_for_function("() => !location.search.includes('rl-seed2')", timeout=30_000)
    assert "base=" in page.url and "rl-seed1" in page.url
    page.reload(wait_until="domcontentloaded")
    page.get_by_test_id("stMetricValue").first.wait_for(timeout=90_000)
    sidebar = page.get_by_test_id("stSidebar").get_by_test_id("stMultiSelect").inner_text()  # the fine-tunes' chips
    assert page.get_by_role("combobox", name="Base").input_value() == "demo/sft"  # one entry
    assert "demo/rl-seed1" in sidebar and "demo/rl-seed2" not in sidebar and "demo/sft" not in sidebar
    page.goto(app_url, wait_until="domcontentloaded")  # back to the default family for the next tests


def test_trajectory_page_in_chromium(app_url, browser_page):
    values = _open(browser_page, app_url + "/trajectory", "trajectory-page.png")
    assert values[0] == "5"  # the demo's RL run saved every 10 steps


def test_update_sparsity_page_in_chromium(app_url, browser_page):
    d = default_demo_dir()
    # each fine-tune against its parent: base -> sft, sft -> rl-seed1, sft -> rl-seed2
    expected = [f"{diff_checkpoints(d / parent, d / run, tol=1e-5).update_sparsity:.2%}"
                for parent, run in (("base", "sft"), ("sft", "rl-seed1"), ("sft", "rl-seed2"))]
    values = _open(browser_page, app_url + "/update_sparsity", "update-sparsity-page.png")
    assert values == expected
    assert browser_page.locator(".js-plotly-plot").count() >= 5


def test_overlap_page_in_chromium(app_url, browser_page):
    d = default_demo_dir()
    (pair,) = pairs = overlap(d / "sft", [d / "rl-seed1", d / "rl-seed2"], tol=1e-5).pairs()  # RL runs of sft
    assert pair["o1"] > pair["o1_random"]
    browser_page.goto(app_url + "/overlap", wait_until="domcontentloaded")
    browser_page.locator(".js-plotly-plot").first.wait_for(timeout=90_000)
    browser_page.wait_for_timeout(1500)
    browser_page.screenshot(path=str(ROOT / "artifacts" / "overlap-page.png"), full_page=True)
    assert check_charts(browser_page, "overlap-page.png") >= 1
    texts = " ".join(browser_page.locator(".js-plotly-plot svg text").all_text_contents())
    for p in pairs:  # the matrix cells show each measured o1 and its random baseline
        assert f"{p['o1']:.2f}" in texts and f"rand {p['o1_random']:.2f}" in texts


def test_importance_page_in_chromium(app_url, browser_page):
    """The page answers, for the demo's RL run, which selector best predicts its subnetwork."""
    from analysis.importance.scores import compute_scores
    from analysis.checkpoints.models import load_model

    d = default_demo_dir()
    changed = {}
    diff_checkpoints(d / "sft", d / "rl-seed1", tol=1e-5, on_mask=changed.__setitem__)
    model, _ = load_model(d / "sft", device="cpu")
    from analysis.importance.evaluation import predictive_power
    auroc = predictive_power(compute_scores(model, "smallest_magnitude"), changed).auroc
    browser_page.goto(app_url + "/importance", wait_until="domcontentloaded")
    # seven selectors, 131 passes of the model: a background job, started by its button (the size it reads
    # said beside it), with a progress bar
    start = browser_page.get_by_role("button", name="Run evaluate 7 selectors in the background")
    ok = browser_page.get_by_test_id("stAlertContentSuccess").first
    start.or_(ok).first.wait_for(timeout=180_000)  # a job finished before (same params and files): its result
    if start.is_visible():
        assert "Reads " in browser_page.inner_text("body")
        start.click()
    ok.wait_for(timeout=180_000)
    browser_page.wait_for_timeout(1500)
    browser_page.screenshot(path=str(ROOT / "artifacts" / "importance-page.png"), full_page=True)
    assert check_charts(browser_page, "importance-page.png") >= 1
    check_reading(browser_page, "importance-page.png")
    text = ok.inner_text()
    assert "Smallest magnitude (SaRA)" in text and f"AUROC {auroc:.3f}" in text


def test_attribution_page_in_chromium(app_url, browser_page):
    """The prompt as coloured tokens, the conservation check and the charts, base against SFT."""
    from analysis.attribution.methods import attribute
    from analysis.families.demo_task import qa_examples
    from analysis.checkpoints.models import load_model

    d = default_demo_dir()
    prompt, answer = qa_examples("held_out")[0]
    r = attribute(*load_model(d / "base", device="cpu"), prompt, answer, "lrp-attn", with_faithfulness=False)
    values = _open(browser_page, app_url + "/attribution", "attribution-page.png")
    assert values[0] == f"{r.target_logit:.4g}"  # the base's target logit, the first metric
    text = browser_page.inner_text("body")
    assert "Conservation error" in text and "Faithfulness" in text
    assert browser_page.locator(".js-plotly-plot").count() >= 6  # tokens, difference, layers, heads x3, ...


def test_behaviour_page_in_chromium(app_url, browser_page):
    """The first fine-tune against its parent: the KL metrics, the tokens shaded by KL, the layers sweep's
    recovered gains drawn (every chart's plot area, colour ranges and reading checked by _open)."""
    values = _open(browser_page, app_url + "/behaviour", "behaviour-page.png")
    assert values[0].endswith("nats") and values[2] == "256"
    browser_page.locator(".js-plotly-plot").nth(1).wait_for(timeout=120_000)  # the sweep, computed after the KL
    browser_page.wait_for_timeout(1500)
    assert check_charts(browser_page, "behaviour-page.png") >= 2
    check_reading(browser_page, "behaviour-page.png")
    text = browser_page.inner_text("body")
    assert "Rose most often" in text and "Which part of the update carries it" in text
    assert browser_page.locator(".js-plotly-plot").count() >= 2  # the KL distribution, the recovered gains


def test_geometry_page_in_chromium(app_url, browser_page):
    """SFT from the base and both RL runs from SFT side by side: three heatmaps, the kind table, α and
    the one-matrix detail (spectra and principal angles) drawn; k = 1% of the demo's rank is 1."""
    values = _open(browser_page, app_url + "/geometry", "geometry-page.png")
    assert values[0] == "1"
    text = browser_page.inner_text("body")
    assert "demo/rl-seed1 (from demo/sft)" in text and "On the principal weights, or off them?" in text
    assert browser_page.locator(".js-plotly-plot").count() >= 6  # 3 heatmaps, α, spectra, angles


def test_finetune_page_in_chromium(app_url, browser_page):
    """Queue a random-mask run and a full run from the form; the page follows them live (no reload)
    until both finish and the comparison panel confirms nothing moved outside the mask."""
    page = browser_page
    page.goto(app_url + "/finetune", wait_until="domcontentloaded")
    page.get_by_role("button", name="Add to queue").wait_for(timeout=90_000)
    for source in ("Random mask", "Full fine-tune"):
        page.get_by_text(source, exact=True).click()
        page.wait_for_timeout(800)
        for label, value in (("Steps", "3"), ("Batch size", "4"), ("Evaluate every", "3")):
            box = page.get_by_label(label, exact=True)
            box.fill(value)
            box.press("Tab")
            page.wait_for_timeout(400)
            # the rerun has ended (the evaluation interval follows the steps: its field is redrawn)
            page.wait_for_function("() => document.querySelector('[data-testid=stApp]')"
                                   ".getAttribute('data-test-script-state') === 'notRunning'", timeout=60_000)
            page.wait_for_timeout(300)
        page.get_by_role("button", name="Add to queue").click()
        page.get_by_text("Queued:").first.wait_for(timeout=60_000)
    ok = page.get_by_test_id("stAlertContentSuccess").first
    ok.wait_for(timeout=180_000)  # appears once both runs have finished, without a reload
    assert "only elements inside its mask" in ok.inner_text()
    page.wait_for_timeout(1500)
    page.screenshot(path=str(ROOT / "artifacts" / "finetune-page.png"), full_page=True)
    assert check_charts(page, "finetune-page.png") >= 1
    charts = page.locator(".js-plotly-plot")
    assert charts.count() >= 2  # loss curves and the metric curves
