"""The web page in a real browser: Debian's headless Chromium driven by Selenium (no browser download).
Upload the fixture video, see its sampled frames with timestamps, ask, wait for the streamed answer
(the golden answer), ask a follow-up (history kept in the page); a screenshot is saved."""
import os
import shutil

import pytest

from cogvlm2 import CogVLM2Engine
from cogvlm2.cogvlm2_server import ServerSettings, create_app
from server_utils import REPO, serve_in_thread

VIDEO = os.path.join(REPO, "tests", "fixtures", "bigbuckbunny.mp4")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="no chromium/chromedriver on PATH (apt-get install chromium chromium-driver; "
                                       ".ci/run installs them)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1000,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_page_uploads_asks_and_streams_the_golden_answer(browser, meta, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    yaml = os.path.join(REPO, "configs", "cogvlm2", "predict_cogvlm2_video_tiny.yaml")
    with CogVLM2Engine.from_config(yaml, load_checkpoint=os.path.join(REPO, "tests", "fixtures", "tiny_chat")) \
            as engine, serve_in_thread(create_app(engine, ServerSettings())) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 120)
        browser.find_element(By.ID, "file").send_keys(VIDEO)
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#frames figure")) == 6)
        captions = [f.text for f in browser.find_elements(By.CSS_SELECTOR, "#frames figcaption")]
        assert captions == [f"#{i * 25} · {i}.00 s" for i in range(6)]

        def ask(question):
            browser.find_element(By.ID, "question").send_keys(question)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, ".answer")[-1].get_attribute("data-done") == "true")
            return browser.find_elements(By.CSS_SELECTOR, ".answer")[-1].text

        assert ask("Please describe this video.") == meta["gen_decoded"]
        assert "412 prompt tokens, 20 generated" in browser.find_element(By.ID, "status").text
        follow_up = ask("What happens next?")
        alone = engine.submit("What happens next?", video=VIDEO, max_new_tokens=20,
                              history=[("Please describe this video.", meta["gen_decoded"])]).result(120)
        assert follow_up == alone.text
        assert f"{alone.prompt_tokens} prompt tokens" in browser.find_element(By.ID, "status").text
        shot = tmp_path / "server_page.png"
        assert browser.save_screenshot(str(shot))
        print(f"\nscreenshot: {shot}")
