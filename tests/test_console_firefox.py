"""The web console in Firefox, over WebDriver BiDi (no geckodriver).

Debian has no geckodriver, and the npm and PyPI packages of it download
the binary from GitHub.  Firefox needs none: started with
``--remote-debugging-port`` it speaks WebDriver BiDi itself, over a
WebSocket (``ws://127.0.0.1:PORT/session``).  :class:`Bidi` is the little
client this test needs (command ids, the matching answer, errors raised
with their message, events kept), on the ``websockets`` package's
synchronous client.

:class:`FirefoxConsoleTests` drives Debian's ``firefox-esr`` (headless, a
fresh profile) against a real master started in this process: the page
loads without script errors, a wrong key then the right one, an instance
created through the API with a hostile alias (shown as text, never run),
the live table following a change made through the API (the ``/events``
stream read with ``fetch``), a row's Stop button, and the master panel's
``/info`` fields.  The DOM is read and driven with ``script.callFunction``.

The reactor runs the master, so everything that blocks (Firefox's start,
the WebSocket, the plain HTTP calls) runs in a worker thread through
``deferToThread``; every wait polls a condition with a deadline and fails
naming what it waited for, never a fixed sleep.

The test never installs anything: without ``/usr/bin/firefox-esr`` it
fails, naming ``.ci/run``, which installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from twisted.internet import threads
from twisted.trial import unittest
from websockets.sync.client import connect

from tests import helpers
from tests.master_helpers import Wire, start_master
from tests.test_console import XSS_ALIAS

FIREFOX = "/usr/bin/firefox-esr"
WAIT = 15.0  # seconds for any one thing to happen in the page
START_WAIT = 30.0  # seconds for Firefox to say where BiDi listens
POLL = 0.05  # seconds between two looks at the page
LISTENING = re.compile(rb"WebDriver BiDi listening on (ws://[^\s]+)")

# A few preferences for a quiet, offline browser (Firefox's remote agent
# adds its own recommended set for automation on top).
USER_JS = """\
user_pref("network.proxy.type", 0);
user_pref("browser.shell.checkDefaultBrowser", false);
user_pref("datareporting.policy.dataSubmissionEnabled", false);
user_pref("toolkit.telemetry.reportingpolicy.firstRun", false);
user_pref("app.update.disabledForTesting", true);
"""

# Installed before any page script runs (script.addPreloadScript): it keeps
# what the page's own code could throw or have refused, including by the
# Content-Security-Policy, in window.__npErrors.
ERROR_HOOK = """() => {
  const errors = [];
  Object.defineProperty(window, "__npErrors", {value: errors});
  window.addEventListener("error", (e) => errors.push(`error: ${e.message} (${e.filename}:${e.lineno})`), true);
  window.addEventListener("unhandledrejection", (e) => errors.push(`unhandled rejection: ${e.reason}`));
  window.addEventListener("securitypolicyviolation", (e) => errors.push(`CSP refused ${e.blockedURI} (${e.violatedDirective})`), true);
}"""


def firefox_problem() -> Optional[str]:
    """Why this test cannot run here, or None."""
    if os.access(FIREFOX, os.X_OK):
        return None
    return f"the Firefox console test needs {FIREFOX} (Debian package firefox-esr). Run .ci/run, which installs it with apt."


class BidiError(AssertionError):
    """An ``error`` answer to a BiDi command, or an exception in the page."""


class Bidi:
    """One WebDriver BiDi connection, used from a worker thread only."""

    def __init__(self, url: str) -> None:
        where = urlsplit(url)
        # Our own socket: the client then never looks for a proxy in the
        # environment (this is a loopback connection).
        sock = socket.create_connection((where.hostname, where.port), timeout=WAIT)
        sock.settimeout(None)
        # connect() is a context manager in recent websockets; entering it
        # gives the connection, closed by close() below.
        self.ws = connect(url, sock=sock, open_timeout=WAIT, max_size=1 << 24, compression=None).__enter__()
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def command(self, method: str, params: Optional[dict[str, Any]] = None, timeout: float = WAIT) -> dict[str, Any]:
        """Send one command and return its ``result``; an ``error`` answer
        raises :class:`BidiError` with Firefox's message.  Events that come
        meanwhile are kept in ``events``."""
        self.next_id += 1
        ident = self.next_id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no answer from Firefox to the BiDi command {method} within {timeout}s")
            try:
                message = json.loads(self.ws.recv(timeout=remaining))
            except TimeoutError:
                continue
            if message.get("type") == "event":
                self.events.append(message)
                continue
            if message.get("id") != ident:
                continue  # the late answer to a command that timed out
            if message.get("type") == "error":
                raise BidiError(f"BiDi {method} failed: {message.get('error')}: {message.get('message')}")
            return dict(message["result"])

    def drain(self) -> None:
        """Take in the events that have arrived since the last command."""
        while True:
            try:
                message = json.loads(self.ws.recv(timeout=0))
            except TimeoutError:
                return
            if message.get("type") == "event":
                self.events.append(message)

    def close(self) -> None:
        self.ws.close()


class Firefox:
    """A headless ``firefox-esr`` with a fresh profile, and one BiDi
    session on its first tab."""

    def __init__(self, workdir: str) -> None:
        self.workdir = os.path.abspath(workdir)
        self.profile = os.path.join(self.workdir, "profile")
        self.log_path = os.path.join(self.workdir, "firefox.log")
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.bidi: Optional[Bidi] = None
        self.context = ""
        self.version = "?"

    # -- start and stop -------------------------------------------------------

    def log_tail(self, size: int = 1500) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""

    def start(self) -> None:
        os.makedirs(self.profile)
        with open(os.path.join(self.profile, "user.js"), "w") as f:
            f.write(USER_JS)
        env = dict(os.environ, MOZ_CRASHREPORTER_DISABLE="1", MOZ_HEADLESS="1")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [FIREFOX, "--headless", "--no-remote", "-profile", self.profile, "--remote-debugging-port=0"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,  # its content processes share its group, stopped with it
            )
        url = self._listening()
        self.bidi = Bidi(url + "/session")
        caps = self.bidi.command("session.new", {"capabilities": {}})
        self.version = str(caps.get("capabilities", {}).get("browserVersion", "?"))
        tree = self.bidi.command("browsingContext.getTree", {"maxDepth": 0})
        self.context = str(tree["contexts"][0]["context"])
        self.bidi.command("session.subscribe", {"events": ["log.entryAdded"], "contexts": [self.context]})
        self.bidi.command("script.addPreloadScript", {"functionDeclaration": ERROR_HOOK})

    def _listening(self) -> str:
        """The ``ws://`` address from Firefox's ``WebDriver BiDi listening
        on ...`` line (on its stderr, which goes to the log file)."""
        assert self.proc is not None
        deadline = time.monotonic() + START_WAIT
        while True:
            try:
                with open(self.log_path, "rb") as f:
                    found = LISTENING.search(f.read())
            except OSError:
                found = None
            if found:
                return found.group(1).decode("ascii")
            code = self.proc.poll()
            if code is not None:
                raise AssertionError(f"{FIREFOX} exited ({code}) before WebDriver BiDi listened; its output:\n{self.log_tail()}")
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"{FIREFOX} did not say 'WebDriver BiDi listening on ...' within {START_WAIT}s; its output:\n{self.log_tail()}"
                )
            time.sleep(POLL)

    def close(self) -> None:
        """End the session, stop Firefox (and its content processes), drop
        the profile.  Never raises for a browser already gone."""
        try:
            if self.bidi is not None:
                try:
                    self.bidi.command("session.end", timeout=5)
                except Exception:
                    pass
                try:
                    self.bidi.close()
                except Exception:
                    pass
        finally:
            proc = self.proc
            if proc is not None:
                for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                    try:
                        os.killpg(proc.pid, sig)
                    except ProcessLookupError:
                        pass
                    try:
                        proc.wait(grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            shutil.rmtree(self.profile, ignore_errors=True)

    # -- the page -------------------------------------------------------------

    def navigate(self, url: str) -> None:
        assert self.bidi is not None
        self.bidi.command("browsingContext.navigate", {"context": self.context, "url": url, "wait": "complete"}, timeout=WAIT)

    def call(self, function: str, *args: Any) -> Any:
        """Run the JavaScript ``function`` (source of a function, maybe
        async) in the page with ``args``; its result comes back through
        JSON (undefined as None).  An exception raises BidiError."""
        assert self.bidi is not None
        wrapped = (
            "async function (argsJson) {"
            f" const value = await ({function})(...JSON.parse(argsJson));"
            " return JSON.stringify(value === undefined ? null : value); }"
        )
        answer = self.bidi.command(
            "script.callFunction",
            {
                "functionDeclaration": wrapped,
                "arguments": [{"type": "string", "value": json.dumps(list(args))}],
                "target": {"context": self.context},
                "awaitPromise": True,
                "resultOwnership": "none",
            },
        )
        if answer.get("type") == "exception":
            details = answer.get("exceptionDetails", {})
            raise BidiError(f"script failed in the page: {details.get('text')}\n{function}")
        return json.loads(answer["result"]["value"])

    def until(
        self, function: str, *args: Any, what: str, check: Callable[[Any], bool] = bool, timeout: float = WAIT
    ) -> Any:
        """Poll ``call(function, *args)`` until ``check`` accepts its value,
        and return it; fail after ``timeout`` naming ``what``, with the
        last value seen."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.call(function, *args)
            if check(value):
                return value
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout}s in Firefox {self.version} waiting for {what} (last seen: {value!r})")
            time.sleep(POLL)

    def text(self, css: str, check: Callable[[str], bool], what: str) -> str:
        """The text of the first visible ``css`` element, once ``check``
        accepts it."""
        return str(self.until(TEXT, css, what=what, check=lambda t: t is not None and check(t)))

    def fill(self, css: str, value: str) -> None:
        """Set an input's value as typing would (an ``input`` event)."""
        self.until(FILL, css, value, what=f"{css} to be there to type in")

    def click(self, css: str, what: str) -> None:
        """Click the visible, enabled ``css`` element (waited for)."""
        self.until(CLICK, css, what=f"{what} ({css}) to be clickable")

    def page_errors(self) -> list[str]:
        """Errors so far: the page's log entries of level error (uncaught
        exceptions, console.error) and what the hook kept."""
        assert self.bidi is not None
        self.bidi.drain()
        errors = [
            f"{e['params'].get('type')}: {e['params'].get('text')}"
            for e in self.bidi.events
            if e.get("method") == "log.entryAdded" and e["params"].get("level") == "error"
        ]
        return errors + list(self.call("() => window.__npErrors || ['the error hook is missing']"))


VISIBLE = "(el) => !!el && el.getClientRects().length > 0"
TEXT = f"""(css) => {{
  const visible = {VISIBLE};
  const el = [...document.querySelectorAll(css)].find(visible);
  return el ? el.textContent : null;
}}"""
FILL = f"""(css, value) => {{
  const visible = {VISIBLE};
  const el = [...document.querySelectorAll(css)].find(visible);
  if (!el || el.disabled) return false;
  el.focus();
  el.value = value;
  el.dispatchEvent(new Event("input", {{bubbles: true}}));
  el.dispatchEvent(new Event("change", {{bubbles: true}}));
  return true;
}}"""
CLICK = f"""(css) => {{
  const visible = {VISIBLE};
  const el = [...document.querySelectorAll(css)].find(visible);
  if (!el || el.disabled) return false;
  el.scrollIntoView({{block: "center"}});
  el.click();
  return true;
}}"""


class FirefoxConsoleTests(unittest.TestCase):
    """The console in headless Firefox ESR, over WebDriver BiDi, against a
    real master."""

    timeout = 90

    async def _firefox(self) -> Firefox:
        problem = firefox_problem()
        if problem:
            self.fail(problem)
        firefox = Firefox(self.mktemp())
        self.addCleanup(threads.deferToThread, firefox.close)
        await threads.deferToThread(firefox.start)
        return firefox

    async def test_console_in_firefox(self) -> None:
        started = time.monotonic()
        firefox = await self._firefox()
        master = await start_master(self)
        await threads.deferToThread(self._scenario, firefox, master)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 60, "the Firefox scenario took too long")

    def _scenario(self, ff: Firefox, master: Any) -> None:
        wire = Wire(master)
        root = f"http://127.0.0.1:{master.port}"

        # -- the page loads (the redirect from /, the modules run)
        ff.navigate(root + "/")
        ff.until("() => location.href", what="the redirect from / to /api/", check=lambda href: href == root + "/api/")
        ff.text("#signin-title", lambda t: "Sign in" in t, "the sign-in form (the console's modules ran)")
        self.assertEqual(ff.page_errors(), [], "errors while the console loaded")

        # -- a wrong key, then the right one
        ff.fill("#api-key", "0" * 32)
        ff.click("#sign-in", "the Sign in button")
        message = ff.text("#signin-error", lambda t: "401" in t, "the wrong-key message")
        self.assertIn("Wrong API key", message)
        self.assertIn("Invalid API key", message)
        ff.fill("#api-key", master.api_key)
        ff.click("#sign-in", "the Sign in button")
        ff.text("#instances-title", lambda t: t == "Instances", "the instances page")
        ff.text("#live-text", lambda t: t == "Live", "the event stream to connect")
        self.assertEqual(ff.call("() => [sessionStorage.length, location.href]"), [1, root + "/api/"])

        # -- an instance created through the API, with a hostile alias
        entry, target = helpers.free_port(), helpers.free_port()
        url = f"client://127.0.0.1:{entry}/127.0.0.1:{target}?mode=1"
        status, _, body = wire.call("POST", "/instances", json.dumps({"url": url, "alias": XSS_ALIAS}).encode())
        self.assertEqual(status, 201, body[:300])
        iid = json.loads(body)["id"]
        row = f"#instances tr[data-id='{iid}']"
        ff.text(f"{row} .col-alias", lambda t: t == XSS_ALIAS, "the new instance's row, its alias shown as text")
        ff.text(f"{row} .col-status", lambda t: t == "running", "the row's status")
        self.assertEqual(ff.call("() => typeof window.__xss"), "undefined")
        self.assertEqual(ff.call("() => document.querySelectorAll('#main img, #main script').length"), 0)

        # -- the live table: a change made through the API shows up
        status, _, body = wire.call("PATCH", f"/instances/{iid}", json.dumps({"alias": "renamed-by-api"}).encode())
        self.assertEqual(status, 200, body[:300])
        ff.text(f"{row} .col-alias", lambda t: t == "renamed-by-api", "the alias changed through the API (the /events stream)")

        # -- a row's Stop button
        ff.click(f"{row} button[data-action=toggle]", "the row's Stop button")
        ff.text(f"{row} .col-status", lambda t: t == "stopped", "the row's status after Stop")
        status, _, body = wire.call("GET", f"/instances/{iid}")
        self.assertEqual((status, json.loads(body)["status"]), (200, "stopped"))
        ff.text(f"{row} button[data-action=toggle]", lambda t: t == "Start", "the row's button to offer Start")

        # -- the master panel: /info
        status, _, body = wire.call("GET", "/info")
        self.assertEqual(status, 200, body[:300])
        info = json.loads(body)
        ff.click("nav a[data-view=master]", "the Master link")
        ff.text("#info [data-field=ver]", lambda t: t.startswith(info["ver"]), "the master's version")
        ff.text("#info [data-field=mid]", lambda t: t == info["mid"], "the master ID")
        ff.text("#info [data-field=name]", lambda t: t == info["name"], "the master's host name")
        ff.text("#info [data-field=tls]", lambda t: t == "0 (plain HTTP)", "the API's TLS setting")
        ff.until(
            "() => document.querySelectorAll('#info-chart svg').length", what="the CPU and memory chart", check=lambda n: n == 1
        )

        # -- an instance's page loaded straight from its address (a reload):
        # every action is offered once the instance is known
        ff.navigate(f"{root}/api/#/instance/{iid}")
        ff.call("() => { window.__old = true; location.reload(); }")
        ff.until(
            "() => [window.__old === undefined, document.readyState]", what="the reloaded page",
            check=lambda v: v == [True, "complete"],
        )
        ff.until(
            "() => ['start', 'restart', 'reset', 'delete'].map("
            "a => document.querySelector(`button[data-action=${a}]`)?.disabled)",
            what="Start, Restart, Reset counters and Delete enabled after a reload on the instance's page",
            check=lambda states: states == [False, False, False, False],
        )

        self.assertEqual(ff.page_errors(), [], f"errors in the page (Firefox {ff.version})")
