"""The web page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``) against a real
uvicorn server: upload an X-ray and see the prediction, the bars and the heatmap; the prediction set,
the referral with its reasons, the source caution and the DICOM header fields (or "not checked"); a bad
file shows the server's error; a key-protected server asks for the key."""

from __future__ import annotations

import os

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from chestxray.inference.predict import Predictor, load_model
from chestxray.serving.serve import background_server, create_app
from conftest import xray_array
from factories import CLASSES, build_tiny_bundle, make_bundle, sets_for

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--window-size=1200,1000")
WAIT_SECONDS = 60
HEATMAP_SHOWN = ("const img = document.getElementById('heatmap');"
                 "return !img.hidden && img.complete && img.naturalWidth > 0")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
    pytest.skip("headless Chromium is not installed: apt-get install chromium chromium-driver",
                allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as seen  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return load_model(build_tiny_bundle(tmp_path_factory.mktemp("bundle")))


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    # Chromium keeps a Unix socket in its profile folder, and a socket path may not exceed 107 bytes: under a
    # long TMPDIR (a stranger's machine, CI) the browser would not start. Profile and temporary files go to a
    # short folder of their own under /tmp instead.
    import shutil
    import tempfile

    short = tempfile.mkdtemp(prefix="cxr-chromium-", dir="/tmp")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={short}/profile"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER, env={**os.environ, "TMPDIR": short})
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture
def xray_file(tmp_path: Path) -> Path:
    path = tmp_path / "patient 01 (PA).png"  # spaces and brackets: a name is only a label
    Image.fromarray(xray_array(300, 260, seed=4)).save(path)
    return path


def upload(driver: webdriver.Chrome, path: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(path))


def test_upload_shows_prediction_bars_and_heatmap(browser: webdriver.Chrome, predictor: Predictor,
                                                  xray_file: Path, tmp_path: Path) -> None:
    expected = predictor.predict(xray_file)
    with background_server(create_app(predictor, api_key="")) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, WAIT_SECONDS)
        wait.until(lambda d: "resnet18" in d.find_element(By.ID, "model-line").text)
        assert "not a diagnostic device" in browser.find_element(By.CLASS_NAME, "notice").text.lower()
        upload(browser, xray_file)
        wait.until(seen.visibility_of_element_located((By.ID, "result")))
        wait.until(lambda d: d.execute_script(HEATMAP_SHOWN))
        browser.save_screenshot(str(tmp_path / "page.png"))
        label = browser.find_element(By.ID, "label").text
        bars = browser.find_elements(By.CSS_SELECTOR, "#bars li")
        names = [bar.find_element(By.CLASS_NAME, "bar-name").text for bar in bars]
        top = browser.find_element(By.CSS_SELECTOR, "#bars li.top .bar-name").text
        ood_hidden = browser.execute_script("return document.getElementById('ood').hidden")
        ood_score = browser.execute_script("return document.getElementById('ood-score').textContent")
        key_form_shown = browser.find_element(By.ID, "key-form").is_displayed()
        trust = page_trust(browser)
    assert label == expected.label == top
    assert sorted(names) == sorted(CLASSES)
    assert ood_hidden is True and ood_score == "not checked" and not key_form_shown  # this bundle has no guard
    # nor conformal sets, and a PNG has no DICOM header: every check that did not run says so
    assert "not checked" in trust["set"] and "not checked" in trust["ood_percentile"]
    assert trust["header_hidden"] and "not checked" in trust["header_none"]
    assert trust["refer_hidden"] and trust["reasons"] == [] and trust["cautions"] == []
    assert Image.open(tmp_path / "page.png").size[0] > 0


PAGE_TRUST = """
const text = (id) => document.getElementById(id).textContent.trim();
const items = (id) => Array.from(document.querySelectorAll('#' + id + ' li'), (li) => li.textContent.trim());
return {set: text('prediction-set'), refer_hidden: document.getElementById('refer').hidden,
        reasons: items('reasons'), cautions: items('cautions'), ood_percentile: text('ood-percentile'),
        header_hidden: document.getElementById('header-fields').hidden, header_none: text('header-none'),
        header: Object.fromEntries(Array.from(document.querySelectorAll('#header-rows tr'),
                                              (tr) => [tr.querySelector('th').textContent,
                                                       tr.querySelector('td').textContent]))};
"""


def page_trust(driver: webdriver.Chrome) -> dict:
    """What the page shows about trusting the answer: prediction set, referral with its reasons,
    cautions, the OOD percentile line and the DICOM header fields."""
    return driver.execute_script(PAGE_TRUST)


def test_the_page_shows_the_set_the_referral_its_reasons_the_caution_and_the_header(
        browser: webdriver.Chrome, tmp_path: Path, make_dicom, xray_file: Path) -> None:
    confound = {"method": "test", "threshold": 0.8, "auc": {"normal": 0.91, "pneumonia": 0.97},
                "flagged": ["normal", "pneumonia"], "note": ""}
    bundle = make_bundle(tmp_path / "trusted", conformal=sets_for(0.001), source_confound=confound, guard=False)
    ct = make_dicom("chest ct.dcm", xray_array(80, 80), Modality="CT", ViewPosition="PA")
    with background_server(create_app(load_model(bundle), api_key="")) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, WAIT_SECONDS)
        wait.until(lambda d: "test_efficientnet" in d.find_element(By.ID, "model-line").text)
        upload(browser, ct)
        wait.until(seen.visibility_of_element_located((By.ID, "refer")))
        dicom = page_trust(browser)
        browser.execute_script("document.getElementById('result').hidden = true")
        upload(browser, xray_file)
        wait.until(seen.visibility_of_element_located((By.ID, "result")))
        wait.until(lambda d: page_trust(d)["header_none"])
        png = page_trust(browser)
    both = "uncertain: the 90% prediction set holds normal, pneumonia"
    assert dicom["set"] == "Prediction set at 90% coverage: normal, pneumonia."
    assert not dicom["refer_hidden"] and dicom["reasons"] == [both, "not_frontal_cxr: Modality CT"]
    assert len(dicom["cautions"]) == 1 and "came from a different source than its other images" in dicom["cautions"][0]
    assert not dicom["header_hidden"] and dicom["header"]["Modality"] == "CT" and dicom["header"]["ViewPosition"] == "PA"
    assert dicom["header_none"] == "" and "not checked" in dicom["ood_percentile"]
    assert not png["refer_hidden"] and png["reasons"] == [both] and len(png["cautions"]) == 1
    assert png["header_hidden"] and png["header_none"] == "DICOM header: not checked (not a DICOM file)."


def test_a_bad_file_shows_the_server_error(browser: webdriver.Chrome, predictor: Predictor, tmp_path: Path) -> None:
    bad = tmp_path / "scan.png"
    bad.write_text("this is not an image")
    with background_server(create_app(predictor, api_key="")) as url:
        browser.get(url + "/")
        upload(browser, bad)
        error = WebDriverWait(browser, WAIT_SECONDS).until(seen.visibility_of_element_located((By.ID, "error")))
        assert "scan.png" in error.text and "not a readable image" in error.text
        assert not browser.find_element(By.ID, "result").is_displayed()


def test_a_protected_server_asks_for_the_key(browser: webdriver.Chrome, predictor: Predictor,
                                             xray_file: Path) -> None:
    with background_server(create_app(predictor, api_key="open-sesame")) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, WAIT_SECONDS)
        key_input = wait.until(seen.visibility_of_element_located((By.ID, "api-key")))
        key_input.send_keys("open-sesame")
        browser.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait.until(seen.invisibility_of_element_located((By.ID, "key-form")))
        upload(browser, xray_file)
        wait.until(seen.visibility_of_element_located((By.ID, "result")))
        assert browser.find_element(By.ID, "label").text in CLASSES


REPORT_LAYOUT = """
const page = document.documentElement;
const broken = [];  // non-path cells whose text is laid out on more than one line
for (const cell of document.querySelectorAll('table.rows td:not(.path), table.rows th')) {
  const range = document.createRange();
  range.selectNodeContents(cell);
  const tops = new Set(Array.from(range.getClientRects(), (r) => Math.round(r.top)));
  if (cell.textContent.trim().split(/\\s+/).length === 1 && tops.size > 1) broken.push(cell.textContent);
}
return {scroll: page.scrollWidth, client: page.clientWidth, broken: broken,
        widest: Math.max(...Array.from(document.querySelectorAll('table'), (t) => t.getBoundingClientRect().right))};
"""


def test_the_evaluation_report_fits_a_1280_px_window_without_breaking_words(browser: webdriver.Chrome,
                                                                            tmp_path: Path) -> None:
    import numpy as np
    import pandas as pd
    from scipy.special import softmax

    from chestxray.stats.metrics import classification_metrics
    from chestxray.inference.report import write_report

    classes = ["bacterial_pneumonia", "viral_pneumonia", "covid19", "normal"]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 40)
    probs = softmax(rng.normal(size=(40, 4)), axis=1)
    files = [f"some_site_export_2024/{classes[t]}/patient_{i:05d}_study_2024_01_01_series_3_frontal_posteroanterior"
             f"_view_image.png" for i, t in enumerate(y)]
    frame = pd.DataFrame({"file": files, "truth": [classes[t] for t in y],
                          "prediction": [classes[p] for p in probs.argmax(1)],
                          "prediction_set": ["" if i % 3 == 0 else "bacterial_pneumonia|viral_pneumonia" for i in
                                             range(40)],
                          "refer": [i % 2 == 0 for i in range(40)], "ood": [i % 5 == 0 for i in range(40)],
                          "ood_percentile": rng.uniform(0, 100, 40), **{c: probs[:, k] for k, c in enumerate(classes)}})
    out = write_report(tmp_path / "report.html", title="layout", metrics=classification_metrics(y, probs, classes,
                                                                                                n_boot=10),
                       y_true=y, probs=probs, classes=classes, predictions=frame)
    page = out.read_text(encoding="utf-8")
    assert ">Yes<" in page and ">No<" in page and ">True<" not in page and ">False<" not in page
    assert "<td>(none)</td>" in page
    browser.set_window_size(1280, 900)
    browser.get(out.as_uri())
    layout = browser.execute_script(REPORT_LAYOUT)
    assert browser.execute_script("return window.innerWidth") <= 1280
    assert layout["scroll"] <= layout["client"], layout  # no horizontal scrolling: every column on screen
    assert layout["widest"] <= layout["client"], layout
    assert layout["broken"] == [], layout  # labels, figures and headers never break inside a word
