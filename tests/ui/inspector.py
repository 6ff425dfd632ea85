"""The inspector page (/ui) in a real browser (headless Chromium over WebDriver) against the real
server on the real default model, which requires an API key.

    python tests/ui/inspector.py BASE_URL API_KEY SCREENSHOT_DIR

Checks: the page asks for the key, then works; typing "The capital of France is" shows a bar for
" Paris" at ~77 %; clicking it appends it to the prompt and a new distribution shows; the
heat-map and the logit-lens grid render (30 layers for the default model) with the rank chart;
the page is usable at phone width without horizontal scrolling; axe-core finds no serious or
critical accessibility violation in any of its states; it requested nothing outside the server
and logged no console errors. Screenshots go to SCREENSHOT_DIR.
"""

import os
import re
import sys
import time

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.support.ui import WebDriverWait

BASE, KEY, SHOTS = sys.argv[1], sys.argv[2], sys.argv[3]
# axe-core's bundle (npm, fetched and checksum-verified by scripts/ui.sh).
AXE = open(os.environ["AXE_JS"]).read()
TIMEOUT = 60
os.makedirs(SHOTS, exist_ok=True)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        shot("failure")
        raise AssertionError(what)
    checks += 1
    print(f"  ok: {what}")


def shot(name):
    driver.save_screenshot(os.path.join(SHOTS, f"{name}.png"))


def wait(cond, what):
    try:
        return WebDriverWait(driver, TIMEOUT, poll_frequency=0.1).until(lambda d: cond())
    except Exception as e:  # noqa: BLE001 - report which wait failed
        shot("failure")
        status = driver.find_element(By.ID, "status").text
        raise AssertionError(f"timed out waiting for: {what} (page status: {status!r})") from e


def accessible(state):
    """axe-core on the page as it is now: no serious or critical violation (WCAG 2 A/AA rules
    and axe's best practices: labels, contrast, roles, keyboard focus)."""
    driver.execute_script(AXE)
    found = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {resultTypes: ['violations']}).then(r => done(r.violations.map(v =>"
        " ({id: v.id, impact: v.impact, nodes: v.nodes.slice(0, 3).map(n => n.html.slice(0, 120))}))));")
    bad = [v for v in found if v["impact"] in ("serious", "critical")]
    check(not bad, f"axe-core: no serious or critical violation ({state}; {len(found)} minor)"
          + (f": {bad}" if bad else ""))


def idle():
    """True once every keystroke's request has been answered and shown."""
    return driver.execute_script("return document.body.dataset.busy") == "0"


def settled(what):
    wait(idle, what)


def bars(container="bars"):
    """(token, percentage) of each bar, read from the accessible labels."""
    out = []
    for b in driver.find_elements(By.CSS_SELECTOR, f"#{container} .bar"):
        m = re.match(r'^(".*"): ([0-9.]+)%', b.get_attribute("aria-label"))
        if m:
            import json
            out.append((json.loads(m.group(1)), float(m.group(2))))
    return out


options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for arg in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1280,1000", "--disable-extensions", "--no-first-run",
            "--disable-background-networking", "--disable-component-update"]:
    options.add_argument(arg)
options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
# The distribution's own chromedriver: Selenium Manager would try to download one.
service = Service(os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
driver = webdriver.Chrome(options=options, service=service)
try:
    print(f"inspector: {BASE}/ui in {driver.capabilities.get('browserVersion')}")
    # A browser opening / is sent to the page.
    driver.get(BASE + "/")
    wait(lambda: driver.current_url.rstrip("/").endswith("/ui") or "/ui#" in driver.current_url,
         "the redirect from / to /ui")
    check(True, "GET / in a browser lands on /ui")

    # The server needs a key: the page asks for it before sending anything.
    keybox = driver.find_element(By.ID, "keybox")
    wait(lambda: keybox.is_displayed(), "the API key field")
    check("API key" in driver.find_element(By.ID, "status").text, "the page asks for the API key")
    shot("1-asks-for-key")
    accessible("asking for the key")
    driver.find_element(By.ID, "apikey").send_keys(KEY + Keys.ENTER)
    wait(lambda: not keybox.is_displayed(), "the key to be accepted")
    wait(lambda: "SmolLM2" in driver.find_element(By.ID, "model").text, "model info")
    check(True, "with the key, the page shows the model: " + driver.find_element(By.ID, "model").text)

    # The inputs' bounds are the API's (one table in src/api/bounds.rs, written into the schema).
    import json
    import urllib.request
    doc = json.load(urllib.request.urlopen(urllib.request.Request(
        BASE + "/openapi.json", headers={"Authorization": "Bearer " + KEY})))
    schema = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    for input_id, field in [("topk", "top_k"), ("ntokens", "max_tokens"), ("temperature", "temperature")]:
        got = float(driver.find_element(By.ID, input_id).get_attribute("max"))
        check(got == float(schema[field]["maximum"]), f"#{input_id} max {got} is {field}'s maximum")

    # Typing shows the distribution (debounced).
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("The capital of France is")
    settled("the distribution")
    wait(lambda: bars() and bars()[0][0] == " Paris", "a bar for ' Paris' first")
    token, p = bars()[0]
    check(75.0 <= p <= 79.0, f"' Paris' at {p}% (≈ 77 %)")
    check(len(bars()) == 10, "ten candidates (top-k 10)")
    check("entropy" in driver.find_element(By.ID, "entropy").text, "the entropy is shown")
    # Heat-map: one span per prompt token, coloured by rank bucket; perplexity shown.
    heat = driver.find_elements(By.CSS_SELECTOR, "#heat span[tabindex]")
    check(len(heat) >= 5, f"heat-map of {len(heat)} prompt tokens")
    check(all(re.search(r"\bb(first|1|10|100|x)\b", s.get_attribute("class")) for s in heat),
          "every heat-map token has a rank bucket")
    check("perplexity" in driver.find_element(By.ID, "ppl").text, "the prompt's perplexity is shown")
    driver.execute_script("document.querySelectorAll('#heat span[tabindex]')[2].focus()")
    wait(lambda: "rank" in driver.find_element(By.ID, "heatdetail").text, "the heat-map detail")
    check(True, "focusing a prompt token shows its alternatives")
    shot("2-distribution")
    accessible("the distribution")

    # The keyboard: Tab walks the controls from the top, each with a name and a visible focus.
    driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0);")
    walked = []
    for _ in range(16):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        walked.append(driver.execute_script(
            "const e = document.activeElement, cs = getComputedStyle(e);"
            "const name = e.getAttribute('aria-label') || (e.labels && e.labels.length ? e.labels[0].textContent : '')"
            " || e.textContent || e.title || '';"
            "return [e.tagName.toLowerCase() + (e.id ? '#' + e.id : ''), name.trim().slice(0, 30), cs.outlineStyle];"))
    # (Focus leaves the page for the browser's own UI once in a cycle: the body, skipped.)
    walked = [w for w in walked if w[0] != "body"]
    unnamed = [w for w in walked if not w[1]]
    unringed = [w for w in walked if w[2] == "none"]
    check(len({w[0] + w[1] for w in walked}) >= 12 and not unnamed and not unringed,
          f"Tab reaches {len(walked)} controls, each named, each with a focus ring"
          + (f" (unnamed: {unnamed}, no ring: {unringed})" if unnamed or unringed else ""))
    bar = driver.find_elements(By.CSS_SELECTOR, "#bars .bar")[1]
    check(bar.tag_name == "button", "a candidate is a button (Enter or Space appends it)")

    # What the bars show is said: sampling at T = 1, then greedy at T = 0 (bars: T = 1).
    note = driver.find_element(By.ID, "distnote")
    check("sampling at T = 1" in note.text, f"the distribution is named: {note.text!r}")
    set_slider = "const t = document.getElementById('temperature'); t.value = arguments[0]; t.dispatchEvent(new Event('input'));"
    old_t = driver.find_element(By.ID, "temperature").get_attribute("value")
    driver.execute_script(set_slider, "0")
    settled("the greedy distribution")
    wait(lambda: "greedy" in note.text, "the greedy note")
    check("T = 1" in note.text, f"at T = 0 the page says greedy and which distribution it shows: {note.text!r}")
    driver.execute_script(set_slider, old_t)
    settled("the distribution again")
    wait(lambda: "sampling" in note.text, "the sampling note again")

    # A request that fails leaves the earlier results dimmed and says what failed and what to do.
    driver.execute_cdp_cmd("Network.enable", {})
    offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
    prompt.send_keys(" not")
    wait(lambda: "Cannot reach the server" in driver.find_element(By.ID, "status").text, "the network error")
    check("stale" in driver.find_element(By.TAG_NAME, "body").get_attribute("class"),
          "a failed request dims the earlier results and says the server cannot be reached")
    shot("2b-offline")
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", dict(offline, offline=False))
    prompt.send_keys(Keys.BACKSPACE * 4)
    settled("the distribution after the network is back")
    wait(lambda: "stale" not in (driver.find_element(By.TAG_NAME, "body").get_attribute("class") or ""),
         "the results to be current again")
    check(True, "once a request succeeds again the results are current (not dimmed)")

    # Click a candidate to append it.
    before = [t for t, _ in bars()]
    driver.find_elements(By.CSS_SELECTOR, "#bars .bar")[0].click()
    wait(lambda: prompt.get_attribute("value") == "The capital of France is Paris", "the prompt to end with ' Paris'")
    settled("the new distribution")
    wait(lambda: bars() and [t for t, _ in bars()] != before, "a new distribution")
    check(True, "clicking ' Paris' appended it and a new distribution shows: " + repr(bars()[:3]))
    crumbs = driver.find_elements(By.CSS_SELECTOR, "#crumbs button")
    check(len(crumbs) == 2, "the path has two steps (start, ' Paris')")
    crumbs[0].click()
    wait(lambda: prompt.get_attribute("value") == "The capital of France is", "stepping back along the path")
    check(True, "stepping back restores the earlier prompt")
    settled("the earlier distribution")
    wait(lambda: bars() and bars()[0][0] == " Paris", "the earlier distribution")
    shot("3-after-step-back")

    # Targets.
    driver.find_element(By.ID, "targets").send_keys(" Lyon")
    wait(lambda: "Lyon" in driver.find_element(By.ID, "targetsout").text, "the target's score")
    check(True, "a named target is scored")

    # Logit lens: 30 layers, and the rank chart for the target.
    settled("the target's score")
    driver.find_element(By.ID, "tab-lens").click()
    settled("the lens")
    wait(lambda: len(driver.find_elements(By.CSS_SELECTOR, "#lenstable tbody tr")) == 30, "30 lens rows")
    check(True, "the lens grid has 30 layers")
    check("softmax(logits) at T = 1" in driver.find_element(By.ID, "status").text,
          "the lens says which distribution it shows")
    wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#lenschart polyline"), "the rank chart")
    check(driver.find_element(By.ID, "lenstoken").text.strip() != "", "the chart follows a token")
    top_row = driver.find_elements(By.CSS_SELECTOR, "#lenstable tbody tr")[0]
    check("Paris" in top_row.text, "the last layer's row has ' Paris'")
    clicked = top_row.find_elements(By.CSS_SELECTOR, "td[tabindex]")[1].text
    top_row.find_elements(By.CSS_SELECTOR, "td[tabindex]")[1].click()
    wait(lambda: driver.find_element(By.ID, "lenstoken").text == clicked, "the chart for a clicked token")
    settled("the lens for the clicked token")
    check(True, "clicking a lens cell charts that token's rank")
    shot("4-lens")
    accessible("the logit lens")

    # Generate and step through.
    driver.find_element(By.ID, "tab-gen").click()
    driver.find_element(By.ID, "generate").click()
    wait(lambda: "step 1 of" in driver.find_element(By.ID, "stepinfo").text, "generated steps")
    driver.find_element(By.ID, "nextstep").click()
    wait(lambda: "step 2 of" in driver.find_element(By.ID, "stepinfo").text, "stepping through")
    check(len(bars("stepbars")) == 10, "each step shows its distribution")
    shot("5-generate")
    accessible("generation")

    # The view is in the URL.
    check("prompt=The+capital" in driver.current_url or "prompt=The%20capital" in driver.current_url,
          "the prompt is in the URL")

    # Tokens as they are: a token that is part of a UTF-8 character shows its bytes, never "�".
    driver.find_element(By.ID, "tab-next").click()
    prompt.clear()
    prompt.send_keys("I love 東京 and 🦀")
    settled("the byte tokens")
    wait(lambda: "⟨" in driver.find_element(By.ID, "heat").text, "byte tokens shown as bytes")
    heat_text = driver.find_element(By.ID, "heat").text
    check("�" not in heat_text and "␣⟨E6⟩" in heat_text, f"partial characters shown as bytes: {heat_text!r}")
    shot("5b-bytes")

    # A long generation wraps at phone width: no horizontal scrolling.
    driver.set_window_size(390, 844)
    driver.find_element(By.ID, "tab-gen").click()
    ntok = driver.find_element(By.ID, "ntokens")
    ntok.clear()
    ntok.send_keys(ntok.get_attribute("max"))
    driver.find_element(By.ID, "generate").click()
    wait(lambda: "step 1 of" in driver.find_element(By.ID, "stepinfo").text, "a long generation")
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    check(overflow <= 0, f"a long generation wraps at 390 px (overflow {overflow}px)")
    driver.set_window_size(1280, 900)

    # Phone width: no horizontal scrolling.
    driver.find_element(By.ID, "tab-next").click()
    driver.set_window_size(390, 844)
    time.sleep(0.5)
    overflow = driver.execute_script(
        "return document.documentElement.scrollWidth - document.documentElement.clientWidth")
    check(overflow <= 0, f"no horizontal scrolling at phone width (overflow {overflow}px)")
    shot("6-phone")
    accessible("390 px wide")

    # The model picker: every model with its status; choosing one that is not loaded explains
    # itself, and its Load button says beforehand which model the server may unload.
    driver.set_window_size(1280, 900)
    driver.find_element(By.ID, "tab-next").click()
    prompt.clear()
    prompt.send_keys("The capital of France is")
    settled("the default model's distribution")
    pick = Select(driver.find_element(By.ID, "modelpick"))
    names = [o.text for o in pick.options]
    check(len(names) == 4 and any("SmolLM2" in n and "loaded" in n for n in names),
          f"the picker lists every model with its status: {names}")
    base = next((i for i, n in enumerate(names) if n.startswith("base ")), -1)
    check(0 <= base < 3 and names[base + 1].startswith("\u21b3 all-modules")
          and "LoRA adapter on base" in names[base + 1],
          f"the adapter is listed under its base: {names}")
    smol = next(o.get_attribute("value") for o in pick.options if "SmolLM2" in o.text)
    gemma = next(o.get_attribute("value") for o in pick.options if "gemma" in o.text)
    status = driver.find_element(By.ID, "status")
    btn = driver.find_element(By.ID, "loadbtn")
    pick.select_by_value(gemma)
    wait(lambda: btn.is_displayed(), "the Load button")
    check("SmolLM2" in btn.text, f"the Load button says what it may unload: {btn.text!r}")
    shot("7-picker")
    accessible("the model picker")
    btn.click()
    wait(lambda: "loaded in" in status.text, "Gemma to load")
    settled("Gemma's distribution")
    wait(lambda: bars() and "gemma" in driver.find_element(By.ID, "model").text.lower(), "Gemma's answer")
    check("model=" in driver.current_url, "the chosen model is in the URL")
    pick = Select(driver.find_element(By.ID, "modelpick"))
    pick.select_by_value(smol)
    wait(lambda: btn.is_displayed() or "loaded" in driver.find_element(By.ID, "model").text, "SmolLM2's state")
    if btn.is_displayed():
        btn.click()
        wait(lambda: "loaded in" in status.text, "SmolLM2 to load again")
    settled("SmolLM2's distribution again")
    wait(lambda: bars() and bars()[0][0] == " Paris", "SmolLM2's answer again")
    check(True, "switching back to the default model answers as before")

    # Compare: the prompt under A and B, each token coloured by KL(A‖B). The model with itself
    # has KL 0 everywhere and full top-1 agreement; hovering shows both top-k lists.
    driver.find_element(By.ID, "tab-cmp").click()
    Select(driver.find_element(By.ID, "cmppick")).select_by_value(smol)
    settled("the comparison")
    wait(lambda: "agreement" in driver.find_element(By.ID, "cmpsummary").text, "the compare summary")
    summary = driver.find_element(By.ID, "cmpsummary").text
    check("top-1 agreement 100.0%" in summary and "KL(A‖B) mean 0.0000" in summary,
          f"a model compared with itself: KL 0, full agreement: {summary!r}")
    spans = driver.find_elements(By.CSS_SELECTOR, "#cmpheat span[tabindex]")
    check(len(spans) >= 4 and all("k0" in x.get_attribute("class") for x in spans),
          f"{len(spans)} compared tokens, each coloured by its KL")
    driver.execute_script("document.querySelectorAll('#cmpheat span[tabindex]')[1].focus()")
    wait(lambda: "actual" in driver.find_element(By.ID, "cmpdetail").text, "the compare detail")
    detail = driver.find_element(By.ID, "cmpdetail").text
    check(detail.count("actual") >= 1 and "A: " in detail and "B: " in detail,
          "focusing a token shows both models' top-k, the actual token marked")
    shot("8-compare")
    accessible("compare")
    driver.find_element(By.ID, "tab-next").click()

    # Nothing outside the server; no console errors.
    names = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    outside = [n for n in names if not n.startswith(BASE)]
    check(not outside, f"{len(names)} resources, all from the server (outside: {outside})")
    logs = driver.get_log("browser")
    # (The request made while offline, on purpose, is the one error allowed.)
    errors = [entry for entry in logs if entry["level"] in ("SEVERE", "ERROR")
              and "ERR_INTERNET_DISCONNECTED" not in entry["message"]]
    check(not errors, f"no console errors ({errors})")
finally:
    driver.quit()
print(f"inspector: {checks} checks passed; screenshots in {SHOTS}")
