"""Property-based fuzzing of the master API with hypothesis.

A real MasterService listens in the test's reactor; hypothesis runs in a
worker thread (``deferToThread``) and sends each generated request with the
blocking ``http.client``, so the reactor keeps serving while the property
waits.  Requests are random methods on the documented paths and on junk
paths, with and without the key, carrying random bytes, random JSON, and
JSON shaped like the real bodies but with wrong types, over-long strings,
unknown fields and mangled URLs.  The property: never a 5xx, never a dropped
connection, every error is ``{"error": "..."}`` JSON with CORS headers, and
on the documented routes every status is one our OpenAPI document lists.
A second property fires 2-6 requests (actions, URL replacement, delete) at
one instance at the same time.  Afterwards the master still works and its
state file agrees with the API.

Both properties share one master and are sized with :func:`tests.examples`,
so the default (``ci``) run stays within a few seconds; ``HYPOTHESIS_PROFILE
=deep`` runs twenty times as many random examples.  Hostile *values*
(surrogates, control characters, deep nesting) and the "a refusal changes
nothing" property live in ``tests.test_master_hostile``.

Generated instance URLs only ever use OS-chosen (port 0) or refused ports,
and tcping targets only loopback or unresolvable text, so the fuzzer never
touches a port another test may be using nor waits on DNS.
"""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import threads
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

from nodepass.config.urls import Tunables
from nodepass.master.openapi import openapi_document
from tests import examples, helpers
from tests.master_helpers import Wire, start_master

TUNABLES = Tunables(report_interval=0.5, service_cooldown=0.5, shutdown_timeout=1.0, tcp_dial_timeout=0.5)

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD")
ACTIONS = ("start", "stop", "restart", "reset")
JUNK = st.text(max_size=12)


def _json_values():
    scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


def _urls(dead_port: int):
    """Instance URLs, valid and not: every valid one binds only port 0 or
    targets a refused port."""
    scheme = st.sampled_from(["server", "client", "client", "server", "master", "http", "SERVER", ""]) | JUNK
    key = st.sampled_from(["", "k@", "s3cr%40t@", "@", ":x@"])
    host = st.sampled_from(["127.0.0.1", "127.0.0.1", "[::1]", "::1", "", "0.0.0.0", "[", "999.1.1.1"])
    tunnel_port = st.sampled_from(["0", "0", "0", "", "65536", "-1", "x", "99999999999"])
    target = st.tuples(
        st.sampled_from(["127.0.0.1", "[::1]", "", "localhost."]),
        st.sampled_from([str(dead_port), "0", "", "65536", "abc"]),
    ).map(lambda t: f"{t[0]}:{t[1]}")
    targets = st.lists(target, min_size=0, max_size=3).map(",".join)
    param = st.tuples(
        st.sampled_from(
            ["log", "tls", "crt", "key", "dns", "min", "max", "mode", "quic", "dial", "read", "rate", "slot",
             "proxy", "notcp", "noudp", "zzz", ""]
        ),
        st.sampled_from(["0", "1", "2", "3", "-1", "debug", "none", "5m", "1h30m", "bogus", "", "1e9", "auto",
                         "127.0.0.1", "/nonexistent/file"]),
    ).map(lambda kv: f"{kv[0]}={kv[1]}")
    query = st.lists(param, max_size=5).map(lambda ps: ("?" + "&".join(ps)) if ps else "")
    structured = st.builds(
        lambda s, k, h, p, t, q: f"{s}://{k}{h}:{p}/{t}{q}", scheme, key, host, tunnel_port, targets, query
    )
    return structured | st.text(max_size=40) | st.just("")


def _meta():
    text = st.text(max_size=5) | st.text(min_size=250, max_size=260) | st.integers() | st.none()
    peer = st.dictionaries(st.sampled_from(["sid", "type", "alias", "bogus"]), text, max_size=4)
    tags = st.dictionaries(st.text(max_size=6) | st.text(min_size=255, max_size=258), text, max_size=3)
    return st.fixed_dictionaries({}, optional={"peer": peer | _json_values(), "tags": tags | _json_values()}) | _json_values()


def _valid_creates(dead_port: int):
    """POST bodies that should succeed, so the fuzzer also works on live
    instances (every one binds port 0 or a refused target port only)."""
    role = st.sampled_from(["server", "client"])
    params = st.lists(
        st.sampled_from(
            ["log=debug", "log=none", "mode=1", "mode=2", "dns=1s", "read=1m", "rate=1", "slot=3", "proxy=1",
             "notcp=1", "noudp=1", "min=2", "max=4", "dial=127.0.0.1", "tls=1"]
        ),
        max_size=3,
        unique=True,
    ).map(lambda ps: ("?" + "&".join(ps)) if ps else "")
    url = st.builds(lambda r, q: f"{r}://127.0.0.1:0/127.0.0.1:{dead_port}{q}", role, params)
    return st.fixed_dictionaries(
        {"url": url},
        optional={"alias": st.text(max_size=20), "restart": st.booleans(), "meta": st.just({"tags": {"a": "b"}})},
    ).map(lambda d: json.dumps(d).encode())


def _bodies(dead_port: int):
    alias = st.text(max_size=10) | st.text(min_size=255, max_size=258) | _json_values()
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "url": _urls(dead_port) | _json_values(),
            "alias": alias,
            "action": st.sampled_from(ACTIONS) | JUNK | _json_values(),
            "restart": st.booleans() | _json_values(),
            "meta": _meta(),
            "bogus": _json_values(),
        },
    ).map(lambda d: json.dumps(d).encode())
    return st.one_of(
        st.none(),
        shaped,
        shaped,
        shaped,
        _json_values().map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=64),
        st.just(b"{" * 5000),
        st.just(b'{"url": "' + b"x" * 70_000 + b'"}'),
    )


def _paths(dead_port: int):
    ident = st.one_of(
        st.integers(0, 50).map(lambda i: ("existing", i)),
        st.sampled_from(["********", "%2A%2A%2A%2A%2A%2A%2A%2A", "abcdef01", "ABCDEF01", "", "..", "%00", "a/b"]).map(
            lambda s: ("raw", s)
        ),
        st.text(alphabet="0123456789abcdef*%/.-_~xyz", max_size=12).map(lambda s: ("raw", s)),
    )
    tcping_target = st.sampled_from(
        [f"127.0.0.1:{dead_port}", f"[::1]:{dead_port}", "", "127.0.0.1", ":", "[:80", "127.0.0.1:0", "127.0.0.1:70000"]
    ) | st.text(alphabet=":[]%-_ #&=", max_size=8)
    fixed = st.sampled_from(
        ["/instances", "/instances/", "/info", "/openapi.json", "/docs", "/docs/static/swagger-ui.css",
         "/docs/static/", "/events", "/", "/v2/instances"]
    ).map(lambda p: ("fixed", p))
    return st.one_of(
        fixed,
        fixed,
        ident.map(lambda i: ("instance", i)),
        ident.map(lambda i: ("instance", i)),
        tcping_target.map(lambda t: ("tcping", t)),
        st.text(alphabet="/abcdefghijklmnopqrstuvwxyz%0123456789.?&=", max_size=30).map(lambda p: ("junk", p)),
    )


DOCUMENT = openapi_document("/api")
_PLAIN_ID = re.compile(r"^[0-9A-Za-z*]{1,12}$")


def documented_statuses(method: str, path: str, key_ok: bool):
    """The statuses our OpenAPI document allows for this request, or None
    when the path is not plainly one of its routes (junk, encoded
    characters, trailing slashes: those only get the generic checks)."""
    route = path.split("?", 1)[0]
    if not route.startswith("/api/v1/"):
        return None
    route = route[len("/api/v1") :]
    if route.startswith("/instances/"):
        if not _PLAIN_ID.match(route[len("/instances/") :]):
            return None
        route = "/instances/{id}"
    item = DOCUMENT["paths"].get(route)
    if item is None:
        return None
    if method == "OPTIONS":
        return {200}
    op = item.get("get" if method == "HEAD" else method.lower())
    public = route in ("/openapi.json", "/docs")
    if not public and not key_ok:
        return {401}
    if op is None:
        return {405}
    return {int(code) for code in op["responses"]}


class MasterFuzzTests(unittest.TestCase):
    timeout = 120

    def test_no_5xx_no_crash(self):
        return ensureDeferred(self._fuzz())

    async def _fuzz(self):
        master = await start_master(self, tunables=TUNABLES)
        wire = Wire(master)
        dead = helpers.dead_port()
        created: list[str] = []
        lock = threading.Lock()
        seen_statuses: dict[int, int] = {}
        keys = {"good": "good", "bad": "0" * 32, "none": None}

        def request(method: str, path: str, body, key_mode: str, content_type: str):
            headers = {"Content-Type": content_type} if content_type else {}
            return wire.call(method, path, body, key=keys[key_mode], headers=headers, absolute=True)

        def build_path(spec) -> str:
            kind, value = spec
            if kind == "fixed":
                return "/api/v1" + value
            if kind == "tcping":
                return "/api/v1/tcping?target=" + quote(value, safe="")
            if kind == "junk":
                return "/" + value.lstrip("/")
            how, ident = value
            if how == "existing":
                with lock:
                    ident = created[ident % len(created)] if created else "00000000"
            return "/api/v1/instances/" + ident

        steps_strategy = st.lists(
            st.tuples(
                st.sampled_from(METHODS),
                _paths(dead),
                _bodies(dead),
                st.sampled_from(["good"] * 8 + ["bad", "none"]),
                st.sampled_from(["application/json", "", "text/plain"]),
            )
            | st.tuples(
                st.just("POST"), st.just(("fixed", "/instances")), _valid_creates(dead), st.just("good"),
                st.just("application/json"),
            ),
            min_size=1,
            max_size=3,
        )

        def check(method, path, body, key_mode, ctype):
            if method in ("GET", "HEAD") and path.split("?")[0].rstrip("/") == "/api/v1/events":
                method = "POST"  # a GET there streams forever; the SSE tests cover it
            status, headers, data = request(method, path, body, key_mode, ctype)
            with lock:
                seen_statuses[status] = seen_statuses.get(status, 0) + 1
            where = f"{method} {path} body={body[:200] if body else body!r}"
            assert status < 500, f"{status} for {where}: {data[:300]!r}"
            assert headers.get("access-control-allow-origin") == "*" or "/docs/static/" in path, where
            if status == 201:
                with lock:
                    created.append(json.loads(data)["id"])
            if status >= 400 and method != "HEAD" and path.startswith("/api/v1") and "/docs/static/" not in path:
                decoded = json.loads(data)
                assert isinstance(decoded, dict) and isinstance(decoded.get("error"), str), where
                assert set(decoded) == {"error"}, where
            expected = documented_statuses(method, path, key_mode == "good")
            assert expected is None or status in expected, f"{status} not in {sorted(expected)} for {where}"
            return status, data

        @settings(max_examples=examples(250))
        @given(steps=steps_strategy)
        def prop(steps):
            for method, path_spec, body, key_mode, ctype in steps:
                check(method, build_path(path_spec), body, key_mode, ctype)

        put_url = st.builds(
            lambda u: json.dumps({"url": u}).encode(),
            st.sampled_from(["server", "client"]).map(lambda r: f"{r}://127.0.0.1:0/127.0.0.1:{dead}")
            | st.sampled_from(["log=debug", "mode=1", "slot=9"]).map(lambda q: f"client://127.0.0.1:0/127.0.0.1:{dead}?{q}"),
        )
        racing_step = st.tuples(
            st.sampled_from(["PATCH", "PUT", "DELETE", "GET"]),
            st.sampled_from(ACTIONS).map(lambda a: json.dumps({"action": a}).encode())
            | put_url
            | st.just(b'{"alias": "raced", "restart": false}'),
        )

        @settings(max_examples=examples(25))
        @given(pick=st.integers(0, 1000), batch=st.lists(racing_step, min_size=2, max_size=6))
        def racing(pick, batch):
            """Several requests on one instance at the same time: no 5xx, and
            afterwards the instance is either gone or in a sane state."""
            with lock:
                ident = created[pick % len(created)] if created else "00000000"
            path = "/api/v1/instances/" + ident
            with ThreadPoolExecutor(len(batch)) as pool:
                list(pool.map(lambda step: check(step[0], path, step[1], "good", "application/json"), batch))
            status, data = check("GET", path, None, "good", "")
            if status == 200:
                assert json.loads(data)["status"] in ("running", "stopped", "error"), data

        await threads.deferToThread(prop)
        await threads.deferToThread(racing)

        # The property really ran against a working API: successes and the
        # 4xx families were all seen.
        self.assertTrue({200, 201, 400, 401, 404, 405} <= set(seen_statuses), seen_statuses)
        self.assertGreater(len(created), 0)

        # The master is alive and its state file agrees with the API.
        status, _, data = await threads.deferToThread(request, "GET", "/api/v1/instances", None, "good", "")
        self.assertEqual(status, 200)
        listed = {inst["id"]: inst for inst in json.loads(data)}
        with open(master.store.path, "rb") as f:
            on_disk = json.load(f)
        disk_ids = _state_ids(on_disk)
        self.assertEqual(disk_ids, set(listed))
        for inst in listed.values():
            self.assertLessEqual(len(inst["alias"]), 256)


def _state_ids(state: dict) -> set:
    """Instance IDs in the state file, whatever its exact layout (a list of
    records, or a mapping by ID, plus the key record)."""
    ids = set()
    items = state.get("instances", state)
    if isinstance(items, dict):
        ids.update(items)
    else:
        ids.update(item["id"] for item in items)
    ids.add("********")
    return ids
