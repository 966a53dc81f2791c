"""``GET {prefix}/v1/metrics`` (nodepass.master.metrics): scraped over real
HTTP from real masters and read back with prometheus_client's own parser, so
what is checked is what Prometheus would ingest.

* authentication: ``X-API-Key`` and ``Authorization: Bearer``, the same 401s
  as every route, and the key never in a scrape or a log line;
* per-instance figures equal to ``GET /instances`` after real TCP and UDP
  traffic through a server/client pair;
* request counters and histograms with bounded ``route`` labels (a path the
  client made up never becomes a label);
* label escaping (an alias with quotes, backslashes, newlines, Unicode);
* one registry per master.
"""

from __future__ import annotations

import json
import secrets
import socket
from typing import Optional

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.trial import unittest

from nodepass.master.api import MasterAPI
from nodepass.master.metrics import OTHER, MasterMetrics, route_label
from nodepass.master.openapi import openapi_document
from tests.helpers import UDPEcho, free_port, listen_echo, listen_udp, service_up
from tests.master_helpers import Api, LogCapture, SSEClient, Wire, start_master, wait_for
from tests.test_master_state import send_through
from tests.test_tunnel import udp_roundtrip

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: A sample: its name and its labels (sorted pairs), as a dict key.
Key = tuple[str, tuple[tuple[str, str], ...]]


def _d(coro_fn):
    def wrapper(self):
        return defer.ensureDeferred(coro_fn(self))

    wrapper.__name__ = coro_fn.__name__
    wrapper.__doc__ = coro_fn.__doc__
    return wrapper


def parse(text: str) -> dict[Key, float]:
    """Every sample of an exposition, by name and labels; the parser
    refuses what Prometheus would refuse (it raises on bad escaping)."""
    out: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in out, f"duplicate sample {key}"
            out[key] = sample.value
    return out


def value(samples: dict[Key, float], name: str, **labels: str) -> Optional[float]:
    return samples.get((name, tuple(sorted(labels.items()))))


def label_values(samples: dict[Key, float]) -> set[str]:
    return {v for _, labels in samples for _, v in labels}


async def scrape(api: Api, **kw) -> dict[Key, float]:
    code, _, resp = await api.call("GET", "/metrics", **kw)
    assert code == 200, (code, resp.body[:300])
    assert resp.headers.getRawHeaders("content-type") == [CONTENT_TYPE], resp.headers
    return parse(resp.body.decode("utf-8"))


def metrics_of(master) -> MasterMetrics:
    """The master's metrics object (held by the root resource of its Site)."""
    return master.site.resource.metrics


def instance_figures(samples: dict[Key, float], inst: dict) -> dict[str, float]:
    """The figures of one instance in a scrape, under the names of its
    ``GET /instances`` fields (ping converted back to milliseconds)."""
    labels = {"id": inst["id"], "alias": inst["alias"], "type": inst["type"]}

    def get(name: str, **more: str) -> float:
        found = value(samples, name, **labels, **more)
        assert found is not None, (name, labels, more)
        return found

    statuses = {s: get("nodepass_instance_status", status=s) for s in ("running", "stopped", "error")}
    assert sorted(statuses.values()) == [0, 0, 1], statuses
    return {
        "tcprx": get("nodepass_instance_rx_bytes_total", protocol="tcp"),
        "udprx": get("nodepass_instance_rx_bytes_total", protocol="udp"),
        "tcptx": get("nodepass_instance_tx_bytes_total", protocol="tcp"),
        "udptx": get("nodepass_instance_tx_bytes_total", protocol="udp"),
        "tcps": get("nodepass_instance_connections", protocol="tcp"),
        "udps": get("nodepass_instance_connections", protocol="udp"),
        "pool": get("nodepass_instance_pool_connections"),
        "ping": round(get("nodepass_instance_ping_seconds") * 1000, 6),
        "status": next(s for s, v in statuses.items() if v == 1),
    }


FIELDS = ("tcprx", "udprx", "tcptx", "udptx", "tcps", "udps", "pool", "ping", "status")


def listed_figures(inst: dict) -> dict[str, object]:
    return {k: inst[k] for k in FIELDS}


def echo_targets(case) -> int:
    """A TCP and a UDP echo server on one port (a target serves both)."""
    for _ in range(20):
        tcp, _ = listen_echo()
        port = tcp.getHost().port
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.bind(("127.0.0.1", port))
            free = True
        except OSError:
            free = False
        finally:
            probe.close()
        if free:
            break
        tcp.stopListening()
    case.addCleanup(tcp.stopListening)
    udp = listen_udp(UDPEcho(), port=port)
    case.addCleanup(udp.stopListening)
    return port


class AuthTests(unittest.TestCase):
    @_d
    async def test_x_api_key_and_bearer(self):
        master = await start_master(self)
        api = Api(master, self)
        key = master.api_key
        await scrape(api)  # X-API-Key
        await scrape(api, key=None, headers={"Authorization": f"Bearer {key}"})
        await scrape(api, key=None, headers={"Authorization": f"bearer  {key} "})  # scheme is case-insensitive
        # X-API-Key decides when both are sent.
        await scrape(api, headers={"Authorization": "Bearer wrong"})
        code, body, _ = await api.call("GET", "/metrics", key="0" * 32, headers={"Authorization": f"Bearer {key}"})
        self.assertEqual((code, body), (401, {"error": "Unauthorized: Invalid API key"}))
        # HEAD answers like GET, without a body.
        code, _, resp = await api.call("HEAD", "/metrics", key=None, headers={"Authorization": f"Bearer {key}"})
        self.assertEqual((code, resp.body), (200, b""))

    @_d
    async def test_refusals_are_the_api_401s(self):
        master = await start_master(self)
        api = Api(master, self)
        required = {"error": "Unauthorized: API key required"}
        invalid = {"error": "Unauthorized: Invalid API key"}
        cases = [
            ({}, required),
            ({"Authorization": "Bearer"}, required),
            ({"Authorization": "Bearer "}, required),
            ({"Authorization": f"Basic {master.api_key}"}, required),  # not our scheme: nothing presented
            ({"Authorization": f"Token {master.api_key}"}, required),
            ({"Authorization": "Bearer " + "0" * 32}, invalid),
            ({"Authorization": f"Bearer {master.api_key}x"}, invalid),
            ({"X-API-Key": "nope"}, invalid),
        ]
        for headers, error in cases:
            code, body, resp = await api.call("GET", "/metrics", key=None, headers=headers)
            self.assertEqual((code, body), (401, error), headers)
            self.assertEqual(resp.headers.getRawHeaders("access-control-allow-origin"), ["*"])
            self.assertEqual(resp.headers.getRawHeaders("content-type"), ["application/json"])
        # Bearer is for /metrics: the other routes keep X-API-Key only.
        code, body, _ = await api.call("GET", "/instances", key=None, headers={"Authorization": f"Bearer {master.api_key}"})
        self.assertEqual((code, body), (401, required))
        # OPTIONS (browsers' preflight) needs no key, as on every route.
        code, _, _ = await api.call("OPTIONS", "/metrics", key=None)
        self.assertEqual(code, 200)

    @_d
    async def test_rotated_key(self):
        master = await start_master(self)
        api = Api(master, self)
        old = master.api_key
        code, _, _ = await api.call("PATCH", "/instances/********", {"action": "restart"})
        self.assertEqual(code, 200)
        self.assertNotEqual(master.api_key, old)
        code, _, _ = await api.call("GET", "/metrics", key=None, headers={"Authorization": f"Bearer {old}"})
        self.assertEqual(code, 401)
        await scrape(api, key=None, headers={"Authorization": f"Bearer {master.api_key}"})

    @_d
    async def test_key_never_in_scrapes_or_logs(self):
        logs = LogCapture(self)
        master = await start_master(self)
        api = Api(master, self)
        key = master.api_key
        wrong = secrets.token_hex(16)
        await api.call("GET", "/metrics", key=None, headers={"Authorization": f"Bearer {wrong}"})
        await api.call("GET", "/metrics", key=wrong)
        await api.call("GET", f"/{key}", key=None, headers={"Authorization": f"Bearer {key}"})
        await api.call("GET", "/metrics", key=None, headers={"Authorization": f"Bearer {key}"})
        code, _, resp = await api.call("GET", "/metrics")
        self.assertEqual(code, 200)
        text = resp.body.decode("utf-8")
        self.assertNotIn(key, text)
        self.assertNotIn(wrong, text)
        # The start-up line names the key (SPEC §8 asks for it); nothing else may.
        lines = [line for line in logs.lines() if key in line]
        self.assertTrue(all("API Key" in line for line in lines), lines)
        self.assertNotIn(wrong, logs.text())


class InstanceMetricsTests(unittest.TestCase):
    @_d
    async def test_counters_equal_get_instances_after_traffic(self):
        """TCP and UDP through a server/client pair: once the SSE update
        carrying the bytes has arrived, a scrape shows the very figures
        ``GET /instances`` lists, instance by instance."""
        master = await start_master(self)
        api = Api(master, self)
        sse = await SSEClient(api).connect()
        target = echo_targets(self)
        tunnel, entry = free_port(), free_port()
        code, srv, _ = await api.call(
            "POST", "/instances", {"url": f"server://127.0.0.1:{tunnel}/127.0.0.1:{entry}?mode=1", "alias": "edge"}
        )
        self.assertEqual(code, 201, srv)
        code, cli, _ = await api.call(
            "POST", "/instances", {"url": f"client://127.0.0.1:{tunnel}/127.0.0.1:{target}?mode=2&min=4"}
        )
        self.assertEqual(code, 201, cli)
        await service_up(master.instances[srv["id"]], "server")
        await sse.event(
            lambda d: d["type"] == "update" and d["instance"]["id"] == cli["id"] and d["instance"]["pool"] > 0,
            timeout=10,
            what="the client's pool to fill",
        )
        payload = b"m" * 30000
        self.assertEqual(await send_through(entry, payload), payload)
        datagrams = [b"one", b"datagram two"]
        self.assertEqual(await udp_roundtrip(entry, datagrams), datagrams)
        udp_bytes = sum(map(len, datagrams))
        for rid in (srv["id"], cli["id"]):
            await sse.event(
                lambda d, rid=rid: d["type"] == "update"
                and d["instance"]["id"] == rid
                and min(d["instance"]["tcprx"], d["instance"]["tcptx"]) >= len(payload)
                and min(d["instance"]["udprx"], d["instance"]["udptx"]) >= udp_bytes,
                timeout=10,
                what=f"an update of {rid} carrying the relayed bytes",
            )

        # Reports keep arriving (ping changes with each), so compare a
        # listing with the scrapes around it once they agree: no report came
        # in between, and the listing must then be the same state.
        for _ in range(50):
            before = await scrape(api)
            code, listed, _ = await api.call("GET", "/instances")
            after = await scrape(api)
            instances = [i for i in listed if i["id"] != "********"]
            if all(instance_figures(before, i) == instance_figures(after, i) for i in instances):
                break
        else:
            self.fail("no quiet moment between reports in 50 tries")
        self.assertEqual({i["id"] for i in instances}, {srv["id"], cli["id"]})
        for inst in instances:
            self.assertEqual(instance_figures(after, inst), listed_figures(inst), inst["id"])
            self.assertGreaterEqual(inst["tcprx"], len(payload))
            self.assertGreaterEqual(inst["udptx"], udp_bytes)
        self.assertGreater(instance_figures(after, cli)["pool"], 0)
        self.assertEqual(value(after, "nodepass_instances", status="running"), 2)
        self.assertEqual(value(after, "nodepass_instances", status="stopped"), 0)
        # The ********* key record is not an instance.
        self.assertNotIn("********", label_values(after))

        # The same, exactly, with no I/O in between: the collector reads
        # what the listing serialises.
        samples = parse(metrics_of(master).exposition().decode("utf-8"))
        for inst in master.domain.listing()[1:]:
            self.assertEqual(instance_figures(samples, inst), listed_figures(inst))

        # Stopping: the status flips, byte counters stay, live figures go to 0.
        code, stopped, _ = await api.call("PATCH", "/instances/" + cli["id"], {"action": "stop"})
        self.assertEqual(code, 200)
        samples = await scrape(api)
        figures = instance_figures(samples, stopped)
        self.assertEqual(figures, listed_figures(stopped))
        self.assertEqual((figures["status"], figures["pool"], figures["ping"]), ("stopped", 0, 0))
        self.assertGreaterEqual(figures["tcprx"], len(payload))
        self.assertEqual(value(samples, "nodepass_instances", status="stopped"), 1)

        # Deleting: its series are gone.
        code, _, _ = await api.call("DELETE", "/instances/" + cli["id"])
        self.assertEqual(code, 204)
        self.assertNotIn(cli["id"], label_values(await scrape(api)))

    @_d
    async def test_alias_escaping_round_trips(self):
        """Label values are escaped by prometheus_client: what the parser
        reads back is the alias exactly.  The API refuses control
        characters in an alias, so the newline is put on the record
        directly: the exposition must not rely on that refusal."""
        master = await start_master(self)
        api = Api(master, self)
        tricky = 'say "hi" \\n \\ back\\slash } {x="y"} # é 漢字 🙂 \u202e'
        code, inst, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1", "alias": tricky})
        self.assertEqual(code, 201, inst)
        code, other, _ = await api.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1"})
        master.records[other["id"]].alias = 'line one\nline "two"\\'
        samples = await scrape(api)
        aliases = {dict(labels)["id"]: dict(labels)["alias"] for name, labels in samples if name == "nodepass_instance_pool_connections"}
        self.assertEqual(aliases, {inst["id"]: tricky, other["id"]: 'line one\nline "two"\\'})
        # One physical line per sample: the newline was escaped.
        code, _, resp = await api.call("GET", "/metrics")
        lines = [line for line in resp.body.decode("utf-8").split("\n") if other["id"] in line]
        self.assertTrue(lines and all(line.startswith("nodepass_") for line in lines), lines)
        self.assertTrue(any(r'alias="line one\nline \"two\"\\"' in line for line in lines), lines)

    @_d
    async def test_master_figures(self):
        master = await start_master(self, prefix="/api")
        api = Api(master, self)
        samples = await scrape(api)
        self.assertGreater(value(samples, "process_cpu_seconds_total"), 0)
        self.assertGreater(value(samples, "process_resident_memory_bytes"), 1 << 20)
        self.assertEqual(value(samples, "nodepass_sse_subscribers"), 0)
        self.assertEqual(value(samples, "nodepass_sse_dropped_total"), 0)
        for status in ("running", "stopped", "error"):
            self.assertEqual(value(samples, "nodepass_instances", status=status), 0)
        # A dashboard opens the event stream, then goes away.
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", master.port)
        reader = await endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
        reader.transport.write(
            b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nX-API-Key: " + master.api_key.encode() + b"\r\n\r\n"
        )
        await wait_for(lambda: master.hub.streams, what="the SSE stream to open")
        samples = await scrape(api)
        self.assertEqual(value(samples, "nodepass_sse_subscribers"), 1)
        # The stream is counted once it ends (its duration is its life).
        self.assertIsNone(value(samples, "nodepass_api_requests_total", route="/events", method="GET", status="200"))
        reader.transport.loseConnection()
        await wait_for(lambda: not master.hub.streams, what="the SSE stream to be gone")
        samples = await scrape(api)
        self.assertEqual(value(samples, "nodepass_sse_subscribers"), 0)
        self.assertEqual(value(samples, "nodepass_api_requests_total", route="/events", method="GET", status="200"), 1)
        self.assertEqual(value(samples, "nodepass_api_request_duration_seconds_count", route="/events"), 1)

    @_d
    async def test_one_registry_per_master(self):
        first = await start_master(self)
        second = await start_master(self)
        api1, api2 = Api(first, self), Api(second, self)
        code, inst, _ = await api1.call("POST", "/instances", {"url": "client://127.0.0.1:0/127.0.0.1:9?mode=1"})
        self.assertEqual(code, 201)
        await api1.call("GET", "/info")
        samples = await scrape(api2)
        self.assertNotIn(inst["id"], label_values(samples))
        self.assertIsNone(value(samples, "nodepass_api_requests_total", route="/info", method="GET", status="200"))
        self.assertIsNone(value(samples, "nodepass_api_requests_total", route="/instances", method="POST", status="201"))
        self.assertEqual(value(await scrape(api1), "nodepass_api_requests_total", route="/instances", method="POST", status="201"), 1)
        self.assertIsNot(metrics_of(first).registry, metrics_of(second).registry)


class RequestMetricsTests(unittest.TestCase):
    @_d
    async def test_counted_by_route_template_with_bounded_labels(self):
        master = await start_master(self, prefix="/api")
        api = Api(master, self)
        token = "zq" + secrets.token_hex(8)  # made-up paths carry it; no label may
        before = await scrape(api)

        def delta(after, name, **labels):
            return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

        self.assertEqual((await api.call("GET", "/instances"))[0], 200)
        self.assertEqual((await api.call("GET", "/instances/"))[0], 200)  # same route
        self.assertEqual((await api.call("GET", f"/instances/{token[:8]}"))[0], 404)
        self.assertEqual((await api.call("GET", f"/instances/{token}"))[0], 404)
        self.assertEqual((await api.call("POST", "/instances", raw=b"not json"))[0], 400)
        self.assertEqual((await api.call("GET", "/info"))[0], 200)
        self.assertEqual((await api.call("DELETE", "/info"))[0], 405)
        self.assertEqual((await api.call("GET", "/info", key=None))[0], 401)
        self.assertEqual((await api.call("OPTIONS", "/info", key=None))[0], 200)
        self.assertEqual((await api.call(token.upper(), "/info"))[0], 405)  # a made-up method
        self.assertEqual((await api.call("GET", f"/{token}/deeper"))[0], 404)
        self.assertEqual((await api.call("GET", f"/docs/static/{token}.js"))[0], 404)
        wire = Wire(master)
        status, _, _ = await threads.deferToThread(wire.call, "GET", f"/{token}", absolute=True)  # outside {prefix}/v1
        self.assertEqual(status, 404)
        status, _, _ = await threads.deferToThread(wire.call, "GET", f"/api/v1/%FF{token}", absolute=True)
        self.assertEqual(status, 400)  # not UTF-8

        after = await scrape(api)
        counted = "nodepass_api_requests_total"
        self.assertEqual(delta(after, counted, route="/instances", method="GET", status="200"), 2)
        self.assertEqual(delta(after, counted, route="/instances", method="POST", status="400"), 1)
        self.assertEqual(delta(after, counted, route="/instances/{id}", method="GET", status="404"), 2)
        self.assertEqual(delta(after, counted, route="/info", method="GET", status="200"), 1)
        self.assertEqual(delta(after, counted, route="/info", method="GET", status="401"), 1)
        self.assertEqual(delta(after, counted, route="/info", method="DELETE", status="405"), 1)
        self.assertEqual(delta(after, counted, route="/info", method="OPTIONS", status="200"), 1)
        self.assertEqual(delta(after, counted, route="/info", method=OTHER, status="405"), 1)
        self.assertEqual(delta(after, counted, route="/docs/static/{path}", method="GET", status="404"), 1)
        self.assertEqual(delta(after, counted, route=OTHER, method="GET", status="404"), 2)
        self.assertEqual(delta(after, counted, route=OTHER, method="GET", status="400"), 1)
        # The scrape before counts itself once it has answered.
        self.assertEqual(delta(after, counted, route="/metrics", method="GET", status="200"), 1)

        # Labels are bounded: the route templates, the known methods, statuses.
        for value_ in label_values(after):
            self.assertNotIn(token, value_.lower())
        routes = {dict(labels)["route"] for name, labels in after if name == counted}
        documented = set(openapi_document("/api")["paths"])
        self.assertLessEqual(routes, documented | {OTHER, "/docs/static/{path}"})

        # The histogram: one observation per request, per route.
        histogram = "nodepass_api_request_duration_seconds"
        for route in ("/instances", "/instances/{id}", "/info", OTHER):
            count = delta(after, histogram + "_count", route=route)
            requests = sum(
                v - (before.get((name, labels)) or 0)
                for (name, labels), v in after.items()
                if name == counted and dict(labels)["route"] == route
            )
            self.assertEqual(count, requests, route)
            self.assertEqual(delta(after, histogram + "_bucket", route=route, le="+Inf"), count, route)
            self.assertGreater(delta(after, histogram + "_sum", route=route), 0, route)
            buckets = sorted(
                (float(dict(labels)["le"]), v)
                for (name, labels), v in after.items()
                if name == histogram + "_bucket" and dict(labels)["route"] == route
            )
            self.assertEqual([v for _, v in buckets], sorted(v for _, v in buckets), route)  # cumulative


class RouteLabelTests(unittest.TestCase):
    def test_every_rule_has_a_documented_label(self):
        """The labels of the app's rules are the OpenAPI paths (plus the
        asset branch and ``other``): one vocabulary for both."""
        labels = {route_label(rule.rule) for rule in MasterAPI.app.url_map.iter_rules()}
        documented = set(openapi_document("/api")["paths"])
        self.assertEqual(labels - {OTHER, "/docs/static", "/docs/static/{path}"}, documented)
        self.assertIn(OTHER, labels)

    def test_labels(self):
        self.assertEqual(route_label("/instances/<rid>"), "/instances/{id}")
        self.assertEqual(route_label("/docs/static/<path:__rest__>"), "/docs/static/{path}")
        self.assertEqual(route_label("/"), OTHER)
        self.assertEqual(route_label("/<path:__rest__>"), OTHER)
        self.assertEqual(route_label("/metrics"), "/metrics")


class DocumentTests(unittest.TestCase):
    def test_metrics_documented(self):
        doc = openapi_document("/api")
        op = doc["paths"]["/metrics"]["get"]
        self.assertEqual(op["security"], [{"ApiKey": []}, {"BearerKey": []}])
        self.assertEqual(doc["components"]["securitySchemes"]["BearerKey"]["scheme"], "bearer")
        self.assertIn("text/plain; version=0.0.4", op["responses"]["200"]["content"])
        self.assertIn("401", op["responses"])
        json.dumps(doc)  # plain data
