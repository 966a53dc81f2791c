"""The web console (``nodepass/master/console/``, served at ``{prefix}/``).

:class:`ConsoleRoutesTests` checks what the master serves for it, over
HTTP.  :class:`ConsoleBrowserTests` drives the console in headless Chromium
(selenium, Debian's ``chromium`` and ``chromium-driver``) against a real
master started in this process: sign-in, the create form, live counters and
chart, settings, actions, logs, escaping of attacker-controlled text, key
rotation.

The reactor runs the master, so selenium (which blocks) runs in a worker
thread through ``deferToThread``; every wait is an explicit WebDriverWait
naming what it waits for, never a sleep.

With ``NODEPASS_SCREENSHOTS=1`` the browser test also writes the
screenshots of ``docs/console.md`` (``docs/console-*.png``).

The browser tests never install anything: without Chromium, chromedriver
or selenium they fail, naming ``.ci/run``, which installs all three.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from typing import Any, Callable, Optional

from twisted.internet import threads
from twisted.trial import unittest

from nodepass.master.console import CSP, console_files
from nodepass.master.identity import API_KEY_ID
from tests import helpers
from tests.master_helpers import Wire, start_master

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
XSS_ALIAS = "<img src=x onerror=window.__xss=1>"
WAIT = 15.0  # seconds for any one thing to show up in the page


def browser_problem() -> Optional[str]:
    """Why the browser tests cannot run here, or None."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium (the 'test' extra of pyproject.toml)")
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            missing.append(f"{path} (Debian package {package})")
    if not missing:
        return None
    return "browser tests need " + "; ".join(missing) + ". Run .ci/run, which installs them (apt and pip)."


class ConsoleRoutesTests(unittest.TestCase):
    """What the master serves for the console, no browser needed."""

    async def _master(self, prefix: str = "") -> Wire:
        master = await start_master(self, prefix=prefix)
        return Wire(master)

    async def test_redirects_page_and_assets(self) -> None:
        wire = await self._master()

        def run() -> None:
            for path in ("/", "/api"):
                status, headers, _ = wire.call("GET", path, key=None, absolute=True)
                self.assertEqual((status, headers.get("location")), (302, "/api/"), path)
                self.assertEqual(headers.get("access-control-allow-origin"), "*", path)
            status, headers, page = wire.call("GET", "/api/", key=None, absolute=True)
            self.assertEqual(status, 200)
            self.assertEqual(headers["content-type"], "text/html; charset=utf-8")
            self.assertEqual(headers["content-security-policy"], CSP.decode())
            self.assertEqual(headers["x-content-type-options"], "nosniff")
            # Every file the page and its modules name is served, with the
            # type a browser insists on for modules and style sheets.
            names = set(re.findall(r'(?:src|href)="console/([^"]+)"', page.decode()))
            for name, (_, body) in console_files().items():
                if name.endswith(".js"):
                    names.update(re.findall(r'from "\./([^"]+)"', body.decode()))
            self.assertIn("app.js", names)
            self.assertLessEqual(names, set(console_files()) - {"index.html"})
            types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
            for name in sorted(names):
                status, headers, body = wire.call("GET", "/api/console/" + name, key=None, absolute=True)
                self.assertEqual(status, 200, name)
                self.assertEqual(headers["content-type"], types[os.path.splitext(name)[1]], name)
                self.assertEqual(body, console_files()[name][1], name)
            status, _, _ = wire.call("HEAD", "/api/console/app.js", key=None, absolute=True)
            self.assertEqual(status, 200)

        await threads.deferToThread(run)

    async def test_nothing_else_is_served(self) -> None:
        wire = await self._master()

        def run() -> None:
            for path in (
                "/api/console/",
                "/api/console/index.html",
                "/api/console/nothere.js",
                "/api/console/..%2f..%2fconsole.py",
                "/api/console/%2e%2e/api.py",
                "/console/app.js",
                "/api/x/",
            ):
                status, headers, body = wire.call("GET", path, key=None, absolute=True)
                self.assertEqual((status, json.loads(body)), (404, {"error": "Not found"}), path)
                self.assertEqual(headers.get("access-control-allow-origin"), "*", path)
            status, headers, body = wire.call("POST", "/api/", b"{}", key=None, absolute=True)
            self.assertEqual((status, json.loads(body)), (405, {"error": "Method not allowed"}))
            self.assertEqual(headers["allow"], "GET, HEAD, OPTIONS")
            status, headers, _ = wire.call("OPTIONS", "/api/", key=None, absolute=True)
            self.assertEqual((status, headers.get("access-control-allow-origin")), (200, "*"))

        await threads.deferToThread(run)

    async def test_api_root_says_where_things_are(self) -> None:
        """``{prefix}/v1`` is still no route (a 404 ``{"error": ...}`` like any
        other), but its message names the console, docs and OpenAPI."""
        wire = await self._master()

        def run() -> None:
            for path in ("/api/v1", "/api/v1/"):
                status, headers, body = wire.call("GET", path, absolute=True)
                decoded = json.loads(body)
                self.assertEqual((status, set(decoded)), (404, {"error"}), path)
                for where in ("/api/", "/api/v1/docs", "/api/v1/openapi.json"):
                    self.assertIn(where, decoded["error"], path)
                self.assertEqual(headers.get("access-control-allow-origin"), "*")
            status, _, body = wire.call("GET", "/api/v1/nothing", absolute=True)
            self.assertEqual((status, body), (404, b'{"error":"Not found"}'))

        await threads.deferToThread(run)

    async def test_custom_prefix(self) -> None:
        wire = await self._master("/deep/np")

        def run() -> None:
            for path in ("/", "/deep/np"):
                status, headers, _ = wire.call("GET", path, key=None, absolute=True)
                self.assertEqual((status, headers.get("location")), (302, "/deep/np/"), path)
            self.assertEqual(wire.call("GET", "/deep/np/", key=None, absolute=True)[0], 200)
            self.assertEqual(wire.call("GET", "/deep/np/console/app.js", key=None, absolute=True)[0], 200)
            self.assertEqual(wire.call("GET", "/api/", key=None, absolute=True)[0], 404)
            status, _, body = wire.call("GET", "/deep/np/v1", absolute=True)
            self.assertIn("/deep/np/", json.loads(body)["error"])

        await threads.deferToThread(run)

    def test_no_html_from_data(self) -> None:
        """The console builds its DOM from text: no innerHTML and friends
        anywhere in its code (aliases, tags and logs are hostile)."""
        risky = re.compile(r"\.(innerHTML|outerHTML)\s*[+]?=|insertAdjacentHTML|document\.write|\beval\(|new Function\(")
        for name, (_, body) in console_files().items():
            if name.endswith(".js"):
                self.assertIsNone(risky.search(body.decode()), name)


# ---------------------------------------------------------------- the browser


class Browser:
    """One headless Chromium, used from a worker thread only."""

    def __init__(self) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in (
            "--headless=new",
            "--no-sandbox",  # root in CI containers
            "--disable-dev-shm-usage",
            "--disable-gpu",
            "--window-size=1280,900",
            "--force-device-scale-factor=1",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-features=Translate,OptimizationHints,MediaRouter",
        ):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        self.driver.set_page_load_timeout(WAIT)
        self.shots = os.environ.get("NODEPASS_SCREENSHOTS") == "1"

    def page_errors(self) -> list[str]:
        """What the page logged as errors since the last call: script
        errors and Content-Security-Policy refusals (failed requests, such
        as the wrong key's 401, are the network's and expected)."""
        return [e["message"] for e in self.driver.get_log("browser") if e["level"] == "SEVERE" and e.get("source") != "network"]

    def quit(self) -> None:
        self.driver.quit()

    def wait(self, condition: Callable[[Any], Any], what: str, timeout: float = WAIT) -> Any:
        """Poll ``condition(driver)`` until truthy; fail naming ``what``."""
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        waiter = WebDriverWait(self.driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,))
        return waiter.until(condition, f"timed out after {timeout}s waiting for {what}")

    def find(self, css: str, what: Optional[str] = None) -> Any:
        """The visible element ``css`` (waited for)."""
        from selenium.webdriver.common.by import By

        def visible(d: Any) -> Any:
            for el in d.find_elements(By.CSS_SELECTOR, css):
                if el.is_displayed():
                    return el
            return None

        return self.wait(visible, what or css)

    def text(self, css: str) -> str:
        return str(self.find(css).text)

    def wait_text(self, css: str, predicate: Callable[[str], bool], what: str) -> str:
        from selenium.webdriver.common.by import By

        def check(d: Any) -> Optional[str]:
            for el in d.find_elements(By.CSS_SELECTOR, css):
                text = el.text
                if predicate(text):
                    return str(text)
            return None

        return str(self.wait(check, what))

    def click(self, css: str, what: Optional[str] = None) -> None:
        el = self.find(css, what)
        self.wait(lambda d: el.is_enabled(), f"{what or css} to be enabled")
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", el)
        el.click()

    def type(self, css: str, text: str, clear: bool = True) -> None:
        el = self.find(css)
        if clear:
            el.clear()
        el.send_keys(text)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def go(self, hash_: str) -> None:
        self.js("location.hash = arguments[0]", hash_)

    def shot(self, name: str, width: int = 1280, height: int = 900, full: bool = True) -> None:
        """``docs/console-NAME.png`` when screenshots are asked for: the
        whole page (``full``) or the first ``height`` pixels, at ``width``."""
        if not self.shots:
            return
        self.driver.set_window_size(width, height)
        self.js("document.activeElement && document.activeElement.blur && document.activeElement.blur();"
                "document.getElementById('toasts').replaceChildren(); window.scrollTo(0, 0)")
        if full:
            needed = self.js("return document.documentElement.scrollHeight")
            chrome = self.js("return window.outerHeight - window.innerHeight")
            if needed > height - chrome:
                self.driver.set_window_size(width, needed + chrome)
        self.driver.save_screenshot(os.path.join(DOCS, f"console-{name}.png"))
        self.driver.set_window_size(1280, 900)


def pass_bytes(port: int, size: int) -> None:
    """Send ``size`` bytes through the tunnel to the echo target and read
    them back (blocking; in the worker thread)."""
    payload = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        s.sendall(payload)
        got = b""
        while len(got) < size:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    assert got == payload, f"echo through the tunnel returned {len(got)} of {size} bytes"


class ConsoleBrowserTests(unittest.TestCase):
    """The console in headless Chromium against a real master."""

    timeout = 120

    async def _browser(self) -> Browser:
        problem = browser_problem()
        if problem:
            self.fail(problem)
        browser = await threads.deferToThread(Browser)
        self.addCleanup(threads.deferToThread, browser.quit)
        return browser

    async def test_console_end_to_end(self) -> None:
        browser = await self._browser()
        master = await start_master(self)
        echo, _ = helpers.listen_echo()
        self.addCleanup(echo.stopListening)
        echo_port = echo.getHost().port
        entry = helpers.free_port()
        root = f"http://127.0.0.1:{master.port}"
        started = time.monotonic()
        await threads.deferToThread(self._scenario, browser, master, root, echo_port, entry)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 60, "the browser scenario took too long")

    def _scenario(self, b: Browser, master: Any, root: str, echo_port: int, entry: int) -> None:
        from selenium.webdriver.support.ui import Select

        wire = Wire(master)
        # -- sign in: a wrong key first, then the right one
        b.driver.get(root + "/")
        b.wait(lambda d: d.current_url == root + "/api/", "the redirect from / to /api/")
        b.type("#api-key", "0" * 32)
        b.click("#sign-in")
        message = b.wait_text("#signin-error", lambda t: "401" in t, "the wrong-key message")
        self.assertIn("Wrong API key", message)
        self.assertIn("Invalid API key", message)
        b.shot("signin")
        old_key = master.api_key
        b.type("#api-key", old_key)
        b.click("#sign-in")
        b.wait_text("#live-text", lambda t: t == "Live", "the event stream to connect")
        self.assertEqual(b.js("return sessionStorage.length"), 1)
        self.assertNotIn(old_key, b.driver.current_url)

        # -- create: the API's 400 text for a bad pasted URL, then the form
        b.click("nav a[data-view=create]")
        b.click("#create-form input[name=source][value=paste]")
        b.type("#paste-url", "client://nowhere")
        b.click("#create-submit")
        error = b.wait_text("#create-error", lambda t: "400" in t, "the API's refusal of a bad URL")
        self.assertIn("Invalid URL", error)
        b.click("#create-form input[name=source][value=form]")
        b.click("#create-form input[name=role][value=client]")
        b.type("#tunnel-host", "127.0.0.1")
        b.type("#tunnel-port", str(entry))
        b.type("#targets", f"127.0.0.1:{echo_port}")
        Select(b.find("#param-mode")).select_by_value("1")
        b.type("#create-alias", "echo-client")
        b.type("#create-tags", "env=test\nowner=ops")
        url = f"client://127.0.0.1:{entry}/127.0.0.1:{echo_port}?mode=1"
        b.wait_text("#url-preview", lambda t: t == url, f"the URL preview to read {url}")
        b.click("#build-fields summary")
        b.find("#param-slot")
        b.shot("create")
        b.click("#create-submit")
        b.wait_text("#detail-title", lambda t: t == "echo-client", "the new instance's page")
        b.wait_text("#detail-status", lambda t: t == "running", "the instance to run")
        iid = b.driver.current_url.rsplit("/", 1)[1]
        status, _, body = wire.call("GET", f"/instances/{iid}")
        record = json.loads(body)
        self.assertEqual((status, record["url"], record["meta"]["tags"]), (200, url.replace("?", "?log=info&"), {"env": "test", "owner": "ops"}))

        # -- traffic: counters and the chart move
        pass_bytes(entry, 200_000)
        b.wait(
            lambda d: int(d.find_element("css selector", "#figures [data-field=tcprx]").get_attribute("data-bytes") or 0)
            + int(d.find_element("css selector", "#figures [data-field=tcptx]").get_attribute("data-bytes") or 0)
            >= 400_000,
            "the traffic counters to count the echoed bytes",
        )
        b.wait(
            lambda d: float(d.find_element("css selector", "#traffic-chart svg").get_attribute("data-peak") or 0) > 0,
            "the traffic chart to show a rate",
        )
        pass_bytes(entry, 100_000)  # a second burst
        if b.shots:  # traffic over a few seconds, for the documentation's chart
            for size in (300_000, 150_000, 600_000, 450_000, 200_000, 800_000, 350_000, 500_000):
                pass_bytes(entry, size)
                time.sleep(0.6)

        # -- rename, stop, start
        b.type("#alias-input", "web-echo")
        b.click("#alias-form button[type=submit]")
        b.wait_text("#detail-title", lambda t: t == "web-echo", "the new alias")
        b.click("button[data-action=stop]")
        b.wait_text("#detail-status", lambda t: t == "stopped", "the instance to stop")
        b.click("button[data-action=start]")
        b.wait_text("#detail-status", lambda t: t == "running", "the instance to start again")

        # -- logs: lines of this instance, filter, pause
        b.wait_text("#logs", lambda t: "started" in t.lower(), "a start line in the instance's log")
        b.type("#log-filter", "started")
        b.wait(
            lambda d: all("started" in line.text.lower() for line in d.find_elements("css selector", "#logs .line"))
            and len(d.find_elements("css selector", "#logs .line")) >= 1,
            "the log filter to keep only matching lines",
        )
        b.click("#log-pause")
        self.assertEqual(b.find("#log-pause").get_attribute("aria-pressed"), "true")
        b.click("#log-pause")
        b.find("#log-filter").clear()
        b.type("#log-filter", " ")
        b.wait(
            lambda d: float(d.find_element("css selector", "#traffic-chart svg").get_attribute("data-points") or 0) >= 4,
            "several points in the traffic chart",
        )
        b.shot("detail")

        # -- the live table
        b.click("nav a[data-view=instances]")
        row = f"#instances tr[data-id='{iid}']"
        b.wait_text(f"{row} .col-alias", lambda t: t == "web-echo", "the instance's row")
        b.wait_text(f"{row} .col-status", lambda t: t == "running", "the row's status")
        self.assertIn("env=test", b.text(f"{row} .col-tags"))
        b.shot("instances")
        b.shot("phone", width=390, height=844, full=False)

        # -- hostile text is shown as text
        b.go(f"#/instance/{iid}")
        b.type("#alias-input", XSS_ALIAS)
        b.click("#alias-form button[type=submit]")
        b.wait_text("#detail-title", lambda t: t == XSS_ALIAS, "the hostile alias, shown as text")
        status, _, _ = wire.call(
            "PATCH", f"/instances/{iid}", json.dumps({"meta": {"tags": {"<b>k</b>": "<script>window.__xss=2</script>"}}}).encode()
        )
        self.assertEqual(status, 200)
        b.wait_text(".view-head .chips", lambda t: "<script>" in t, "the hostile tag, shown as text")
        b.go("#/instances")
        b.wait_text(f"{row} .col-alias", lambda t: t == XSS_ALIAS, "the hostile alias in the table")
        self.assertIn("<b>k</b>=<script>window.__xss=2</script>", b.text(f"{row} .col-tags"))
        self.assertIsNone(b.js("return window.__xss"))
        self.assertEqual(b.js("return document.querySelectorAll('img, script:not([src]), b').length"), 0)

        # -- delete, with confirmation
        b.go(f"#/instance/{iid}")
        b.click("button[data-action=delete]")
        b.click("dialog[open] button[data-role=cancel]")
        self.assertEqual(wire.call("GET", f"/instances/{iid}")[0], 200)
        b.click("button[data-action=delete]")
        b.click("dialog[open] button[data-role=confirm]")
        b.wait(lambda d: d.current_url.endswith("#/instances"), "the list after the delete")
        b.wait(lambda d: not d.find_elements("css selector", row), "the deleted instance's row to go")
        self.assertEqual(wire.call("GET", f"/instances/{iid}")[0], 404)

        # -- the master panel: info, tcping
        b.click("nav a[data-view=master]")
        b.wait_text("#info [data-field=ver]", lambda t: t.startswith("v1."), "the master's version")
        b.type("#tcping-target", f"127.0.0.1:{echo_port}")
        b.click("#tcping-probe")
        b.wait_text("#tcping-result", lambda t: "connected in" in t, "the tcping result")
        if b.shots:  # a few polls of /info, for the documentation's chart
            b.wait(
                lambda d: int(d.find_element("css selector", "#info-chart svg").get_attribute("data-points") or 0) >= 6,
                "three polls of /info in the chart",
            )
        b.shot("master")

        # -- key rotation: the console shows the new key once, then asks for it
        b.click("#rotate-key")
        b.click("dialog[open] button[data-role=confirm]")
        shown = b.wait_text("#new-key", lambda t: len(t) == 32, "the new key")
        self.assertNotEqual(master.api_key, old_key)
        self.assertEqual(shown, master.api_key)
        b.find("#api-key")
        self.assertEqual(b.js("return sessionStorage.length"), 0)
        self.assertEqual(wire.call("GET", "/instances", key=old_key)[0], 401)
        b.type("#api-key", shown)
        b.click("#sign-in")
        b.wait_text("#live-text", lambda t: t == "Live", "the stream, with the new key")
        self.assertEqual(b.js("return document.querySelectorAll('#instances tbody tr').length"), 0)
        status, _, body = wire.call("GET", f"/instances/{API_KEY_ID}")
        self.assertEqual((status, json.loads(body)["url"]), (200, shown))
        self.assertEqual(b.page_errors(), [])
