"""What a NodePass dashboard (NodePanel, NodePassDash) sees of the master,
pinned to the Go NodePass 1.12 master's shape.

Dashboards are written against the Go master and react to details of its
answers and events: a ``shutdown`` event naming an instance, a server turned
red while it waits for its first client, figures left over from a stopped
run, the ``********`` record's fields, the wire form of ``time``, the query
order of ``url``, the version in ``/info``.  Each test here holds one of
those details against a real master (HTTP on 127.0.0.1, the real SSE
stream), so that a future change cannot drift from Go's shape silently: a
deliberate change must edit the test, and docs/api.md with it.
"""

from __future__ import annotations

import os
import re
import time

from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest

import nodepass
from nodepass.config.urls import Tunables
from nodepass.master.events import rfc3339_nano
from nodepass.master.identity import API_KEY_ID

from tests.helpers import close, connect, free_port, listen_echo, sleep
from tests.master_helpers import FAST, Api, SSEClient, start_master

#: Report interval short enough that "more than 3 intervals" is quick.
QUICK = Tunables(**{**{k: getattr(FAST, k) for k in (
    "service_cooldown", "shutdown_timeout", "reload_interval", "handshake_timeout",
    "tcp_dial_timeout", "udp_dial_timeout", "pool_get_timeout",
)}, "report_interval": 0.1})

#: Go's ``shutdown`` frame: built from Type and Time only.
SHUTDOWN_FRAME = re.compile(
    rb'^event: instance\ndata: \{"type":"shutdown","time":"[^"]+","instance":null,"logs":""\}$'
)
#: Go's time.Time JSON: RFC 3339, nanoseconds with trailing zeros trimmed
#: (no fraction at all when it is zero), Z or the local offset.
RFC3339_NANO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{0,8}[1-9])?(Z|[+-]\d\d:\d\d)$")
LIVE = ("ping", "pool", "tcps", "udps")
BYTES = ("tcprx", "tcptx", "udprx", "udptx")


def _is(kind: str, rid: str, **fields):
    def match(d):
        inst = d["instance"] or {}
        return d["type"] == kind and inst.get("id") == rid and all(inst.get(k) == v for k, v in fields.items())

    return match


async def both(sse: SSEClient, first, second, timeout: float = 5.0):
    """The next events matching ``first`` and ``second``, in whatever order
    they come."""
    found = {}
    while len(found) < 2:
        ev = await sse.event(lambda d: (0 not in found and first(d)) or (1 not in found and second(d)), timeout=timeout)
        found[0 if 0 not in found and first(ev) else 1] = ev
    return found[0], found[1]


class ShutdownEventTests(unittest.TestCase):
    """``shutdown`` is exactly ``{"type":"shutdown","time":...,"instance":null,
    "logs":""}``: a dashboard ignores events about ``********``, so with the
    key record in it a key rotation went unnoticed and the dashboard kept
    reconnecting with the old key."""

    async def _last_frame(self, sse: SSEClient) -> bytes:
        await sse.closed()
        self.assertTrue(sse.raw.endswith(b"\n\n"))
        return sse.blocks[-1]

    def test_on_master_stop(self):
        async def go():
            master = await start_master(self)
            sse = await SSEClient(Api(master, self)).connect()
            await sse.event(_is("initial", API_KEY_ID))
            await master.stopService()
            self.assertRegex(await self._last_frame(sse), SHUTDOWN_FRAME)

        return ensureDeferred(go())

    def test_on_key_rotation(self):
        async def go():
            master = await start_master(self)
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            await sse.event(_is("initial", API_KEY_ID))
            code, rotated, _ = await api.call("PATCH", "/instances/" + API_KEY_ID, {"action": "restart"})
            self.assertEqual(code, 200)
            self.assertRegex(await self._last_frame(sse), SHUTDOWN_FRAME)
            self.assertEqual(rotated["url"], master.api_key)
            code, _, _ = await api.call("GET", "/events", key=sse.key)
            self.assertEqual(code, 401)

        return ensureDeferred(go())


class StatusTests(unittest.TestCase):
    """``error`` as Go's master sets it: after 3 report intervals of silence
    only once the instance has reported, and on a ``Server error:`` /
    ``Client error:`` line."""

    def test_lone_server_stays_running(self):
        """A server with no client never reports; Go keeps it running."""

        async def go():
            master = await start_master(self, tunables=QUICK)
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            code, srv, _ = await api.call("POST", "/instances", {"url": f"server://127.0.0.1:{free_port()}/127.0.0.1:{free_port()}?mode=1"})
            self.assertEqual((code, srv["status"]), (201, "running"))
            await sleep(5 * QUICK.report_interval)  # nothing is to happen: a bounded wait
            code, got, _ = await api.call("GET", "/instances/" + srv["id"])
            self.assertEqual(got["status"], "running")
            self.assertFalse([b for b in sse.blocks if b'"status":"error"' in b], "an error event was sent")

        return ensureDeferred(go())

    def test_reported_then_silent_goes_error_every_interval(self):
        async def go():
            master = await start_master(self, tunables=QUICK)
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            echo, _ = listen_echo()
            self.addCleanup(echo.stopListening)
            url = f"client://127.0.0.1:0/127.0.0.1:{echo.getHost().port}?mode=1"
            code, inst, _ = await api.call("POST", "/instances", {"url": url})
            rid = inst["id"]
            # a single-end client reports every interval; mode 1 comes from its CHECK_POINT
            await sse.event(_is("update", rid, mode=1, status="running"), what="a first CHECK_POINT")
            master.instances[rid].checkpoint_listeners.clear()  # the master hears no more reports
            silent = await sse.event(_is("update", rid, status="error"), what="the error update")
            again = await sse.event(_is("update", rid), what="the update of the next interval")
            self.assertEqual(again["instance"]["status"], "error")
            self.assertEqual(again["instance"]["mode"], silent["instance"]["mode"])
            code, got, _ = await api.call("GET", "/instances/" + rid)
            self.assertEqual(got["status"], "error")

        return ensureDeferred(go())

    def test_stop_and_error_zero_live_figures_keep_bytes(self):
        """Stopping the server of a pair: the server is ``stopped`` and its
        client logs ``Client error:`` and is ``error``; both have ping, pool,
        tcps and udps zeroed in the events that announce it, byte counters
        kept."""

        async def go():
            master = await start_master(self)
            api = Api(master, self)
            sse = await SSEClient(api).connect()
            echo, _ = listen_echo()
            self.addCleanup(echo.stopListening)
            tunnel, entry = free_port(), free_port()
            _, srv, _ = await api.call("POST", "/instances", {"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=1"})
            _, cli, _ = await api.call(
                "POST", "/instances", {"url": f"client://127.0.0.1:{tunnel}/127.0.0.1:{echo.getHost().port}?mode=2&min=2"}
            )
            # a connection held open through the tunnel: tcps counts it
            user = await connect(entry)
            self.addCleanup(lambda: ensureDeferred(close(user)))
            user.transport.write(b"x" * 1000)
            await user.wait_bytes(1000)
            busy = {}
            for rec in (srv, cli):
                ev = await sse.event(
                    lambda d, rid=rec["id"]: _is("update", rid, status="running")(d)
                    and d["instance"]["pool"] > 0 and d["instance"]["tcps"] >= 1,
                    timeout=10, what=f"figures of {rec['type']} while busy",
                )
                busy[rec["id"]] = ev["instance"]

            code, stopped, _ = await api.call("PATCH", "/instances/" + srv["id"], {"action": "stop"})
            self.assertEqual((code, stopped["status"]), (200, "stopped"))
            update, errored = await both(
                sse,
                _is("update", srv["id"], status="stopped"),
                lambda d: _is("log", cli["id"])(d) and "Client error:" in d["logs"],
            )
            # As Go: the error line's own log event carries the new status.
            for inst, before in ((stopped, busy[srv["id"]]), (update["instance"], busy[srv["id"]]),
                                 (errored["instance"], busy[cli["id"]])):
                self.assertEqual({k: inst[k] for k in LIVE}, dict.fromkeys(LIVE, 0), inst)
                for k in BYTES:
                    self.assertGreaterEqual(inst[k], before[k], k)
                self.assertEqual(inst["mode"], before["mode"])
            self.assertEqual(errored["instance"]["status"], "error")
            code, got, _ = await api.call("GET", "/instances/" + cli["id"])
            self.assertEqual({k: got[k] for k in LIVE}, dict.fromkeys(LIVE, 0))

        return ensureDeferred(go())


class RecordTests(unittest.TestCase):
    def test_key_record(self):
        """``********`` as Go creates it: status ``""``, restart false, type
        ``""``; listed first (then creation order: Go's order is random)."""

        async def go():
            master = await start_master(self)
            api = Api(master, self)
            _, first, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1"})
            _, second, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:10?mode=1"})
            code, items, _ = await api.call("GET", "/instances")
            self.assertEqual([i["id"] for i in items], [API_KEY_ID, first["id"], second["id"]])
            sse = await SSEClient(api).connect()
            initial = await sse.event(_is("initial", API_KEY_ID))
            code, rotated, _ = await api.call("PATCH", "/instances/" + API_KEY_ID, {"action": "restart"})
            for key in (items[0], initial["instance"], rotated):
                self.assertEqual((key["status"], key["restart"], key["type"]), ("", False, ""), key)

        return ensureDeferred(go())

    def test_url_query_sorted_and_escaped_as_go(self):
        """Go rebuilds the query with url.Values.Encode: keys sorted, values
        query-escaped (``/`` %2F, ``:`` %3A, space ``+``); the same URL in
        another order is the same URL for PUT."""

        async def go():
            master = await start_master(self)
            api = Api(master, self)
            code, inst, _ = await api.call(
                "POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1&x=a/b+c:d&log=warn"}
            )
            self.assertEqual(code, 201, inst)
            self.assertEqual(inst["url"], "client://127.0.0.1:0/127.0.0.1:9?log=warn&mode=1&x=a%2Fb+c%3Ad")
            code, plain, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1"})
            self.assertEqual(plain["url"], "client://127.0.0.1:0/127.0.0.1:9?log=info&mode=1")
            code, body, _ = await api.call("PUT", "/instances/" + plain["id"], {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1&log=info"})
            self.assertEqual((code, body), (409, {"error": "Instance URL conflict"}))

        return ensureDeferred(go())

    def test_info_ver(self):
        """``ver`` is the Go release whose API we implement, in Go's form;
        our own version is beside it."""

        async def go():
            master = await start_master(self)
            code, info, _ = await Api(master, self).call("GET", "/info")
            self.assertEqual((info["ver"], info["nodepass_py"]), ("v1.12.0", nodepass.__version__))

        return ensureDeferred(go())


class TimeFormatTests(unittest.TestCase):
    def test_event_time_is_rfc3339nano_in_local_zone(self):
        async def go():
            master = await start_master(self)
            sse = await SSEClient(Api(master, self)).connect()
            ev = await sse.event(_is("initial", API_KEY_ID))
            self.assertRegex(ev["time"], RFC3339_NANO)
            offset = time.localtime().tm_gmtoff // 60
            zone = "Z" if offset == 0 else f"{'+' if offset > 0 else '-'}{abs(offset) // 60:02d}:{abs(offset) % 60:02d}"
            self.assertTrue(ev["time"].endswith(zone), (ev["time"], zone))

        return ensureDeferred(go())

    def test_formatter_against_go(self):
        """The strings Go's time.Time JSON gives for the same instants."""
        saved = os.environ.get("TZ")

        def restore():
            if saved is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = saved
            time.tzset()

        self.addCleanup(restore)
        instant = 1764057600 * 10**9  # 2025-11-25T08:00:00Z
        os.environ["TZ"] = "UTC"
        time.tzset()
        self.assertEqual(rfc3339_nano(instant + 123456789), "2025-11-25T08:00:00.123456789Z")
        self.assertEqual(rfc3339_nano(instant + 120000000), "2025-11-25T08:00:00.12Z")
        self.assertEqual(rfc3339_nano(instant), "2025-11-25T08:00:00Z")
        os.environ["TZ"] = "Asia/Shanghai"
        time.tzset()
        self.assertEqual(rfc3339_nano(instant + 500000000), "2025-11-25T16:00:00.5+08:00")
        os.environ["TZ"] = "America/St_Johns"
        time.tzset()
        self.assertEqual(rfc3339_nano(instant + 1), "2025-11-25T04:30:00.000000001-03:30")
