"""Swagger UI's "Try it out" in a real browser (headless Chromium over WebDriver) against the
real server: authorize with the key, then execute several operations with the request bodies
Swagger fills in from the OpenAPI document, and check that each request went to the
operation's own path (operations once shared operationIds, and Try it out posted
/v1/completions to /train/jobs) and succeeded.

    python tests/ui/swagger.py BASE_URL API_KEY SCREENSHOT_DIR
"""

import os
import sys

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

BASE, KEY, SHOTS = sys.argv[1], sys.argv[2], sys.argv[3]
TIMEOUT = 60
os.makedirs(SHOTS, exist_ok=True)
checks = 0

# (method, path): operations without path parameters, whose filled-in example must succeed.
OPERATIONS = [
    ("get", "/health"),
    ("get", "/models"),
    ("get", "/info"),
    ("post", "/generate"),
    ("post", "/lens"),
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("post", "/tokenize"),
]


def check(cond, what):
    global checks
    if not cond:
        driver.save_screenshot(os.path.join(SHOTS, "swagger-failure.png"))
        raise AssertionError(what)
    checks += 1
    print(f"  ok: {what}")


def wait(cond, what):
    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(lambda d: cond())
    except Exception as e:  # noqa: BLE001 - report which wait failed
        driver.save_screenshot(os.path.join(SHOTS, "swagger-failure.png"))
        raise AssertionError(f"timed out waiting for: {what}") from e


def click(el):
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", el)
    driver.execute_script("arguments[0].click();", el)


opts = webdriver.ChromeOptions()
opts.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
          "--window-size=1280,900", "--disable-extensions", "--no-first-run",
          "--disable-background-networking", "--disable-component-update"]:
    opts.add_argument(a)
# The distribution's own chromedriver: Selenium Manager would try to download one.
driver = webdriver.Chrome(service=Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")),
                          options=opts)
try:
    driver.get(BASE + "/docs")
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".opblock"), "Swagger UI's operations")
    # Authorize: the bearer key for every request Try it out sends.
    click(driver.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize"))
    field = wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".modal-ux input"), "the key field")[0]
    field.send_keys(KEY)
    click(driver.find_element(By.CSS_SELECTOR, ".modal-ux .auth-btn-wrapper .authorize"))
    click(wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".modal-ux .btn-done"), "Close")[0])

    for method, path in OPERATIONS:
        def block():
            for b in driver.find_elements(By.CSS_SELECTOR, f".opblock.opblock-{method}"):
                p = b.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")
                if p and p[0].get_attribute("data-path") == path:
                    return b
            return None
        op = wait(block, f"{method.upper()} {path} in the page")
        click(op.find_element(By.CSS_SELECTOR, ".opblock-summary-control"))
        click(wait(lambda: block().find_elements(By.CSS_SELECTOR, ".try-out__btn"), "Try it out")[0])
        click(wait(lambda: block().find_elements(By.CSS_SELECTOR, ".execute"), "Execute")[0])
        url = wait(lambda: [e.text for e in block().find_elements(By.CSS_SELECTOR, ".request-url pre") if e.text],
                   f"the request URL of {path}")[0]
        status = wait(lambda: [e.text.strip() for e in block().find_elements(
            By.CSS_SELECTOR, ".live-responses-table .response .response-col_status") if e.text.strip()],
            f"the response of {path}")[0]
        sent = url.split("?")[0]
        check(sent == BASE + path and status.startswith("2"),
              f"Try it out on {method.upper()} {path}: sent to {sent[len(BASE):]}, answered {status}")
        click(block().find_element(By.CSS_SELECTOR, ".opblock-summary-control"))
    driver.save_screenshot(os.path.join(SHOTS, "9-swagger.png"))
finally:
    driver.quit()
print(f"swagger: {checks} checks passed")
