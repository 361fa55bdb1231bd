"""The HTML report and leaderboard site in a real browser: headless Chromium driven by selenium.

The pages load from disk with no console error and no network request; the report has one row per encoder,
a header click re-orders the rows, a cell link opens its runs; the site's filters hide what does not match.
A screenshot of each page (and of the report in dark mode) is written to the test's folder and, when
``MIMBENCH_ARTIFACTS`` names a folder, copied there (CI keeps them as artefacts).
"""
import os
import shutil
from pathlib import Path

import pytest

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
from selenium.webdriver.common.by import By  # noqa: E402  (after the skip: selenium is a dev extra)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="the browser tests need Debian's chromium and "
                                "chromium-driver (apt-get install chromium chromium-driver; .ci/run installs them)")


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--disable-extensions", "--no-first-run"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def _open(driver, path: Path) -> None:
    for log in ("browser", "performance"):  # start each page with empty logs
        driver.get_log(log)
    driver.get(path.as_uri())


def _requests(driver) -> list[str]:
    """The URLs the page asked the network stack for (Network.requestWillBeSent in the performance log)."""
    import json

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _assert_clean_load(driver, path: Path) -> None:
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    remote = [u for u in _requests(driver) if u.lower().startswith(("http:", "https:", "ws:", "wss:"))]
    assert not remote, remote
    assert driver.execute_script("return document.readyState") == "complete"


def _screenshot(driver, tmp_path: Path, name: str) -> Path:
    """The whole page as one PNG (the window grown to the page's height, at most 12000 px)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(max(height, 600), 12000))
    out = tmp_path / f"{name}.png"
    assert driver.save_screenshot(str(out)) and out.stat().st_size > 10_000
    driver.set_window_size(1280, 900)
    artifacts = os.environ.get("MIMBENCH_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy2(out, Path(artifacts) / out.name)
    return out


def _labels(driver) -> list[str]:
    return [row.find_element(By.CSS_SELECTOR, "th").text.split(" control")[0].strip()
            for row in driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")]


def test_report_page_sorts_links_and_loads_nothing_from_the_network(browser, html_pages, tmp_path):
    _open(browser, html_pages["report"])
    _assert_clean_load(browser, html_pages["report"])
    assert _labels(browser) == ["ddae @ 100 ep", "mae @ 800 ep", "random-init"]  # one row per encoder
    control = browser.find_element(By.CSS_SELECTOR, "#summary tbody tr.control")
    assert "random-init" in control.text and "control" in control.text
    images = browser.find_elements(By.CSS_SELECTOR, "img")
    assert len(images) == 7 and all(browser.execute_script("return arguments[0].naturalWidth", i) > 100
                                    for i in images)  # every figure decoded from its data: URI
    _screenshot(browser, tmp_path, "report")

    header = browser.find_element(By.XPATH, "//table[@id='summary']//th[starts-with(normalize-space(.), 'k-NN')]")
    header.click()  # k-NN top-1: ddae 62, mae 60, control 30 -> descending
    assert _labels(browser) == ["ddae @ 100 ep", "mae @ 800 ep", "random-init"]
    header.click()
    assert _labels(browser) == ["random-init", "mae @ 800 ep", "ddae @ 100 ep"]
    assert header.get_attribute("aria-sort") == "ascending"
    browser.find_element(By.XPATH, "//table[@id='summary']//th[starts-with(normalize-space(.), 'technique')]").click()
    assert _labels(browser) == ["random-init", "mae @ 800 ep", "ddae @ 100 ep"]  # by text, descending

    link = browser.find_element(By.CSS_SELECTOR, "#summary tbody tr.control td a")
    target = link.get_attribute("href").split("#", 1)[1]
    link.click()
    assert browser.execute_script("return location.hash") == f"#{target}"
    detail = browser.find_element(By.ID, target)
    assert detail.is_displayed() and "random-init" in detail.text and "hardware and precision" in detail.text
    top = browser.execute_script("return arguments[0].getBoundingClientRect().top", detail)
    assert 0 <= top < 900  # scrolled into view
    _assert_clean_load(browser, html_pages["report"])


def test_report_page_in_dark_mode_and_print(browser, html_pages, tmp_path):
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia",
                            {"features": [{"name": "prefers-color-scheme", "value": "dark"}]})
    try:
        _open(browser, html_pages["report"])
        background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
        color = browser.execute_script("return getComputedStyle(document.body).color")
        assert background == "rgb(13, 17, 23)" and color == "rgb(230, 237, 243)"  # light text on dark
        _screenshot(browser, tmp_path, "report-dark")
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
        assert browser.execute_script("return getComputedStyle(document.querySelector('nav')).display") == "none"
        assert browser.execute_script("return getComputedStyle(document.body).backgroundColor") == "rgb(255, 255, 255)"
    finally:
        browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "", "features": []})


def test_site_pages_filter_by_architecture_and_protocol(browser, html_pages, tmp_path):
    site = html_pages["site"]
    _open(browser, site / "index.html")
    _assert_clean_load(browser, site / "index.html")
    _screenshot(browser, tmp_path, "site-index")
    browser.find_element(By.LINK_TEXT, "linear").click()
    assert browser.current_url.endswith("/linear.html")
    _assert_clean_load(browser, site / "linear.html")
    own = browser.find_elements(By.CSS_SELECTOR, "tr.own")
    assert len(own) == 6 and all(r.is_displayed() for r in own)
    _screenshot(browser, tmp_path, "site-linear")

    def visible(selector):
        return [e for e in browser.find_elements(By.CSS_SELECTOR, selector) if e.is_displayed()]

    everything = len(visible("tbody tr"))
    browser.find_element(By.CSS_SELECTOR, "#filter-arch option[value='vit-l/16']").click()
    rows = visible("tbody tr")
    assert 0 < len(rows) < everything and {r.get_attribute("data-arch") for r in rows} == {"vit-l/16"}
    assert not visible("section[data-protocol='linear/std']")  # the control's own protocol: no vit-l/16 row
    browser.find_element(By.CSS_SELECTOR, "#filter-arch option[value='']").click()
    browser.find_element(By.CSS_SELECTOR, "#filter-protocol option[value='linear/std']").click()
    rows = visible("tbody tr")
    assert len(rows) == 2 and all("not comparable" in r.text for r in rows)
    _assert_clean_load(browser, site / "linear.html")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    """The records, report.html and site of a real ``mimbench demo --quick``."""
    from typer.testing import CliRunner

    from mimbench.cli import app
    from mimbench.results.html_site import write_site

    out = tmp_path_factory.mktemp("quick") / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)], terminal_width=200)
    assert result.exit_code == 0, result.output
    write_site(out / "site", include_runs=[out / "evals"])
    return out


def _column(driver, index: int) -> list[float]:
    cells = [row.find_elements(By.CSS_SELECTOR, "td")[index] for row in
             driver.find_elements(By.CSS_SELECTOR, "#summary tbody tr")]
    return [float(c.text.split()[0]) for c in cells]


@pytest.mark.slow
def test_the_quick_demos_report_and_site_in_the_browser(browser, quick_demo, tmp_path):
    """The page a user gets from ``mimbench demo --quick``: clean load, a row per encoder, sorting by a column's
    values, a cell's link to its runs; the site's k-NN page shows the demo's runs among the published ones."""
    page = quick_demo / "report.html"
    _open(browser, page)
    _assert_clean_load(browser, page)
    encoders = {p.parent.name for p in (quick_demo / "encoders").glob("*/encoder.safetensors")}
    labels = _labels(browser)
    assert len(labels) == len(encoders) == 3 and labels[-1] == "random-init"  # one row per encoder, control last
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#summary thead th")][1:]
    knn = next(i for i, h in enumerate(headers) if h.startswith("k-NN"))
    _screenshot(browser, tmp_path, "demo-quick-report")
    header = browser.find_element(By.XPATH, "//table[@id='summary']//th[starts-with(normalize-space(.), 'k-NN')]")
    header.click()
    assert _column(browser, knn) == sorted(_column(browser, knn), reverse=True)
    header.click()
    values = _column(browser, knn)
    assert values == sorted(values) and header.get_attribute("aria-sort") == "ascending"
    link = browser.find_element(By.CSS_SELECTOR, "#summary tbody tr.control td a")
    target = link.get_attribute("href").split("#", 1)[1]
    link.click()
    detail = browser.find_element(By.ID, target)
    assert detail.is_displayed() and "random-init" in detail.text and "hardware and precision" in detail.text
    _assert_clean_load(browser, page)

    site = quick_demo / "site" / "knn.html"
    _open(browser, site)
    _assert_clean_load(browser, site)
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.own")) == 3  # the demo's three k-NN runs
    _screenshot(browser, tmp_path, "demo-quick-site-knn")
