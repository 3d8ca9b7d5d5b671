"""The playground page (GET /) in a real browser: headless Chromium from Debian (`chromium`,
`chromium-driver`) driven by selenium. It runs wherever Chromium is installed; where it must run
(CI, or RLPHF_REQUIRE_BROWSER=1, both set by .ci/run) a missing browser is a failure, not a skip.

Set RLPHF_UPDATE_SCREENSHOT=1 to refresh docs/playground.png (written too when it is missing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from openai import OpenAI

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
DRIVER = shutil.which("chromedriver")
REQUIRED = any(os.environ.get(name, "") not in ("", "0") for name in ("CI", "RLPHF_REQUIRE_BROWSER"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "playground.png"


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason}; this run requires the browser test (CI or RLPHF_REQUIRE_BROWSER=1): "
                    "apt-get install -y chromium chromium-driver")
    pytest.skip(f"{reason} (apt-get install -y chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and DRIVER):
        _unavailable("no Chromium or chromedriver on PATH")
    try:
        from selenium import webdriver
    except ImportError:
        _unavailable("selenium is not installed (pip install -e '.[dev]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    driver.set_window_size(1200, 760)
    yield driver
    driver.quit()


def wait_for(driver, predicate, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: predicate(d))


def test_playground_streams_the_answer_of_the_soup_its_sliders_make(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser.get(f"{served.url}/")
    assert browser.title == "rlphf playground"
    find = browser.find_element
    sliders = {s.get_attribute("id") for s in browser.find_elements(By.CSS_SELECTOR, "input[type=range]")}
    assert sliders == {"slider-expertise", "slider-informativeness", "slider-style"}
    assert find(By.ID, "spec").text == "base"  # every slider in the middle: no policy

    prompt = "What is a volcano?"
    find(By.ID, "prompt").send_keys(prompt)
    temperature = find(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    find(By.ID, "slider-informativeness").send_keys(Keys.HOME)  # all the way to 'concise'
    style = find(By.ID, "slider-style")
    style.send_keys(Keys.HOME)  # 'friendly' at 1, then half way back
    style.send_keys(*[Keys.ARROW_RIGHT] * 10)
    assert find(By.ID, "spec").text == "concise=1,friendly=0.5"
    find(By.ID, "slider-expertise").send_keys(Keys.END)  # 'expert' has no policy here: the slider stays put
    assert find(By.ID, "slider-expertise").get_attribute("value") == "0"
    # ... because its half of the slider is cut off, and its label says why.
    assert find(By.ID, "slider-expertise").get_attribute("max") == "0"
    expert = browser.find_element(By.CSS_SELECTOR, "#slider-expertise").find_element(By.XPATH, "..")
    assert expert.find_element(By.CSS_SELECTOR, ".poles .right").text == "expert (no policy)"
    assert find(By.ID, "spec").text == "concise=1,friendly=0.5"

    find(By.ID, "send").click()
    output = find(By.ID, "output")
    wait_for(browser, lambda d: output.get_attribute("data-state") == "streaming")
    wait_for(browser, lambda d: output.get_attribute("data-state") in ("done", "error"))
    assert output.get_attribute("data-state") == "done", find(By.ID, "status").text
    shown = find(By.ID, "answer").text
    assert int(output.get_attribute("data-chunks")) > 3  # it arrived in pieces
    assert "finish: stop" in find(By.ID, "status").text or "finish: length" in find(By.ID, "status").text

    client = OpenAI(base_url=f"{served.url}/v1", api_key="-", max_retries=0)
    expected = client.chat.completions.create(model="concise=1,friendly=0.5", temperature=0, max_tokens=48,
                                              messages=[{"role": "user", "content": prompt}])
    assert shown == expected.choices[0].message.content.strip()
    # Offline: the page loaded nothing from anywhere but the server.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(name.startswith(served.url) for name in loaded), loaded

    browser.save_screenshot(str(Path(served.run) / "playground.png"))
    if os.environ.get("RLPHF_UPDATE_SCREENSHOT") or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(Path(served.run) / "playground.png", SCREENSHOT)

    # An error is shown, not swallowed: more tokens than the context holds.
    max_tokens = find(By.ID, "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys("1000")
    find(By.ID, "send").click()
    wait_for(browser, lambda d: output.get_attribute("data-state") == "error")
    assert "400" in find(By.ID, "status").text and "context" in find(By.ID, "status").text


def test_playground_asks_for_the_key_once_and_keeps_it_in_the_tab(browser, serve_recipe):
    from helpers import running_server
    from selenium.webdriver.common.by import By

    key = "sk-playground-123456"
    with running_server(serve_recipe, api_keys=(key,)) as server:
        browser.get(f"{server.url}/")
        find = browser.find_element
        output = find(By.ID, "output")
        assert find(By.ID, "key-box").is_displayed() and not find(By.ID, "key-set").is_displayed()
        find(By.ID, "prompt").send_keys("What is a volcano?")
        find(By.ID, "send").click()  # no key yet: the page says so, nothing is sent
        assert output.get_attribute("data-state") == "error" and "API key" in find(By.ID, "status").text

        find(By.ID, "api-key").send_keys("sk-wrong")
        find(By.ID, "key-save").click()
        find(By.ID, "send").click()
        wait_for(browser, lambda d: output.get_attribute("data-state") == "error")
        assert "401" in find(By.ID, "status").text and find(By.ID, "key-box").is_displayed()  # asked again

        find(By.ID, "api-key").send_keys(key)
        find(By.ID, "key-save").click()
        assert find(By.ID, "key-set").is_displayed() and not find(By.ID, "key-box").is_displayed()
        for _ in range(2):  # asked once: every later request carries it
            find(By.ID, "send").click()
            wait_for(browser, lambda d: output.get_attribute("data-state") == "streaming")
            wait_for(browser, lambda d: output.get_attribute("data-state") in ("done", "error"))
            assert output.get_attribute("data-state") == "done", find(By.ID, "status").text
        stored = browser.execute_script("return [sessionStorage.getItem('rlphf-api-key'), localStorage.length, "
                                        "document.cookie]")
        assert stored == [key, 0, ""]  # this tab's session only
