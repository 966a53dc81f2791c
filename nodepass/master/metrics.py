"""Prometheus metrics of one master, for ``GET {prefix}/v1/metrics``.

Why it is built this way:

* **A private registry per master.**  The global ``REGISTRY`` of
  ``prometheus_client`` is one per process, but several masters can run in
  one process (the tests start many): each :class:`MasterMetrics` owns a
  :class:`~prometheus_client.CollectorRegistry`, so one master's scrape
  never shows another's instances or requests.
* **Instance figures are read at scrape time.**  :class:`MasterCollector`
  copies nothing in advance: at each scrape it reads the records exactly as
  ``GET /instances`` serialises them (:meth:`InstanceRecord.to_json
  <nodepass.master.records.InstanceRecord.to_json>`), so a scrape and a
  listing taken at the same moment agree exactly, and there is no second
  set of counters to keep in step (restarts, ``reset``, deletes).
* **Only the API's own requests are counted as they happen**
  (:meth:`MasterMetrics.track`), with a *bounded* ``route`` label: the route
  template the request matched (``/instances/{id}``), never its raw path,
  which whoever sends the request controls; anything no route serves is
  ``other``.  Methods outside the known few are ``other`` too.
* **The text is produced by prometheus_client** (escaping of label values
  included: an alias may hold quotes, backslashes and any Unicode).

This module knows the domain (:class:`~nodepass.master.domain.Master`) but
the domain knows nothing of it: metrics are a view, like the API.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING, Any, Iterator, Optional

import psutil
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from nodepass.base.kinds import Status
from nodepass.base.logs import escape_controls
from nodepass.workers.pool import WorkerPool

if TYPE_CHECKING:
    from werkzeug.routing import Map

    from nodepass.master.domain import Master

#: The media type of the Prometheus text exposition format, version 0.0.4
#: (what every Prometheus server reads).  ``generate_latest`` writes that
#: format for metric names like ours (legacy charset, nothing to escape);
#: spelled out here because newer prometheus_client releases name a later
#: version in ``CONTENT_TYPE_LATEST``.
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: The ``route`` label of a request no route of the API serves.
OTHER = "other"

#: The statuses an instance can be in; every one is exported for every
#: instance (1 for the current one, 0 for the others) so that a status
#: change is a value change, not a series appearing and vanishing.
STATUSES: tuple[Status, ...] = (Status.RUNNING, Status.STOPPED, Status.ERROR)

#: Methods counted under their own name; anything else (the method is
#: whatever token the client sent) is counted as ``other``.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

#: Names of the route variables in the ``route`` label, as the OpenAPI
#: document writes them (``/instances/{id}``), not as the Klein rules do.
_VARIABLE_NAMES = {"rid": "id", "__rest__": "path"}
_VARIABLE = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")

_INSTANCE_LABELS = ["id", "alias", "type"]


def _label(value: object) -> str:
    """``value`` as a label value that can always be encoded: text is
    validated before it is stored, but a scrape must not become a 500 if a
    lone surrogate ever slipped through (the same guard as
    :func:`~nodepass.master.records.json_utf8`)."""
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return escape_controls(text)
    return text


def route_label(rule: str) -> str:
    """The ``route`` label of a Klein rule: its variables named as the
    OpenAPI document names them, no trailing slash; the catch-all (``/``
    and its branch) is :data:`OTHER`."""
    if rule == "/" or rule.startswith("/<"):
        return OTHER
    label = _VARIABLE.sub(lambda m: "{" + _VARIABLE_NAMES.get(m[1], m[1]) + "}", rule)
    return label.rstrip("/") or OTHER


class MasterCollector:
    """Reads one master's live state at each scrape (see the module
    docstring for why nothing is cached)."""

    def __init__(self, master: Master) -> None:
        self.master = master
        self._process = psutil.Process()
        self._workers_seen: dict[int, psutil.Process] = {}

    def collect(self) -> Iterator[Metric]:
        yield from self._instances()
        yield from self._master()
        yield from self._process_figures()
        yield from self._workers()

    def _instances(self) -> Iterator[Metric]:
        rx = CounterMetricFamily(
            "nodepass_instance_rx_bytes",
            "Bytes received by the instance (the tcprx/udprx fields of GET /instances).",
            labels=_INSTANCE_LABELS + ["protocol"],
        )
        tx = CounterMetricFamily(
            "nodepass_instance_tx_bytes",
            "Bytes sent by the instance (the tcptx/udptx fields of GET /instances).",
            labels=_INSTANCE_LABELS + ["protocol"],
        )
        connections = GaugeMetricFamily(
            "nodepass_instance_connections",
            "Active relayed TCP connections and UDP sessions (the tcps/udps fields).",
            labels=_INSTANCE_LABELS + ["protocol"],
        )
        pool = GaugeMetricFamily(
            "nodepass_instance_pool_connections",
            "Idle connections in the instance's pool (the pool field).",
            labels=_INSTANCE_LABELS,
        )
        ping = GaugeMetricFamily(
            "nodepass_instance_ping_seconds",
            "Latest tunnel round-trip time (the ping field, in seconds; 0 when none).",
            labels=_INSTANCE_LABELS,
        )
        status = GaugeMetricFamily(
            "nodepass_instance_status",
            "1 for the instance's current status, 0 for the others.",
            labels=_INSTANCE_LABELS + ["status"],
        )
        # The domain's records are only changed by the reactor thread, which
        # is the one running this scrape: the loop sees one consistent state.
        for rec in self.master.records.values():
            item = rec.to_json()  # the very fields GET /instances serves
            labels = [_label(item["id"]), _label(item["alias"]), _label(item["type"])]
            rx.add_metric(labels + ["tcp"], item["tcprx"])
            rx.add_metric(labels + ["udp"], item["udprx"])
            tx.add_metric(labels + ["tcp"], item["tcptx"])
            tx.add_metric(labels + ["udp"], item["udptx"])
            connections.add_metric(labels + ["tcp"], item["tcps"])
            connections.add_metric(labels + ["udp"], item["udps"])
            pool.add_metric(labels, item["pool"])
            ping.add_metric(labels, item["ping"] / 1000)
            for state in STATUSES:
                status.add_metric(labels + [state.value], 1 if item["status"] == state.value else 0)
        yield from (rx, tx, connections, pool, ping, status)

    def _master(self) -> Iterator[Metric]:
        by_status = GaugeMetricFamily(
            "nodepass_instances", "Instances of this master by status.", labels=["status"]
        )
        counts = {state.value: 0 for state in STATUSES}
        for rec in self.master.records.values():
            counts[rec.status.value] = counts.get(rec.status.value, 0) + 1
        for name, count in counts.items():
            by_status.add_metric([name], count)
        yield by_status
        hub = self.master.hub
        yield GaugeMetricFamily(
            "nodepass_sse_subscribers", "Open GET /events streams.", value=len(hub.streams)
        )
        yield CounterMetricFamily(
            "nodepass_sse_dropped",
            "Event-stream subscribers disconnected for not reading.",
            value=hub.dropped,
        )

    def _process_figures(self) -> Iterator[Metric]:
        """The standard ``process_*`` names, so existing dashboards work,
        read through psutil (portable, unlike prometheus_client's /proc
        reader).  Skipped, not failed, if the OS refuses."""
        try:
            with self._process.oneshot():
                cpu = self._process.cpu_times()
                rss = self._process.memory_info().rss
        except (psutil.Error, OSError):
            return
        yield CounterMetricFamily(
            "process_cpu_seconds",
            "User and system CPU time of the master's process, seconds.",
            value=cpu.user + cpu.system,
        )
        yield GaugeMetricFamily(
            "process_resident_memory_bytes", "Resident memory of the master's process, bytes.", value=rss
        )


    def _workers(self) -> Iterator[Metric]:
        """The worker processes (``workers=N``): how many run, how often one
        was replaced, and each one's instances, CPU and memory -- the
        ``process_*`` figures cover the master's own process only."""
        host = self.master.supervisor.host
        if not isinstance(host, WorkerPool):
            return
        yield GaugeMetricFamily(
            "nodepass_worker_processes", "Worker processes running the master's instances.", value=len(host.pids())
        )
        yield CounterMetricFamily(
            "nodepass_worker_restarts", "Worker processes that ended unexpectedly and were replaced.", value=host.restarts
        )
        instances = GaugeMetricFamily("nodepass_worker_instances", "Instances running in each worker.", labels=["worker"])
        cpu = CounterMetricFamily("nodepass_worker_cpu_seconds", "User and system CPU time of each worker process.", labels=["worker"])
        rss = GaugeMetricFamily("nodepass_worker_resident_memory_bytes", "Resident memory of each worker process.", labels=["worker"])
        for worker in host.workers:
            label = [str(worker.slot)]
            instances.add_metric(label, len(worker.runs))
            if not worker.alive or worker.pid is None:
                continue
            try:
                proc = self._workers_seen.get(worker.pid)
                if proc is None:
                    proc = self._workers_seen[worker.pid] = psutil.Process(worker.pid)
                with proc.oneshot():
                    times = proc.cpu_times()
                    resident = proc.memory_info().rss
            except (psutil.Error, OSError):
                continue
            cpu.add_metric(label, times.user + times.system)
            rss.add_metric(label, resident)
        alive = {w.pid for w in host.workers if w.alive}
        for pid in [pid for pid in self._workers_seen if pid not in alive]:
            del self._workers_seen[pid]
        yield from (instances, cpu, rss)


class MasterMetrics:
    """Everything ``/metrics`` exports for one master: its registry, the
    scrape-time collector and the API request metrics.

    ``url_map`` is the API app's routing map (relative to ``{prefix}/v1``):
    a request's ``route`` label is the rule it matches there, found the way
    Klein finds it, so the labels follow the routes without a second list
    of them to keep in step.
    """

    def __init__(self, master: Master, url_map: Map) -> None:
        self.url_map = url_map
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(master))
        self.requests = Counter(
            "nodepass_api_requests",
            "API requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "nodepass_api_request_duration_seconds",
            "Time from a request's arrival to the end of its answer, by route template.",
            ["route"],
            registry=self.registry,
        )
        self._labels: dict[str, str] = {}  # rule -> label (bounded by the rules)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format (:data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)

    def route_of(self, path: Optional[bytes]) -> str:
        """The ``route`` label of ``path`` (below ``{prefix}/v1``; None for
        a path outside it): the template of the rule it matches, else
        :data:`OTHER`."""
        if path is None:
            return OTHER
        try:
            text = (path or b"/").decode("utf-8")
            rule, _args = self.url_map.bind("localhost", path_info=text).match(return_rule=True)
        except Exception:  # noqa: BLE001 - not UTF-8, NotFound, a redirect: no route
            return OTHER
        label = self._labels.get(rule.rule)
        if label is None:
            label = self._labels[rule.rule] = route_label(rule.rule)
        return label

    def track(self, request: Any, path: Optional[bytes]) -> None:
        """Count ``request`` once its answer is complete (or its connection
        lost: an event stream normally ends that way), with the status it
        was given and the time it took.  ``path`` is as for
        :meth:`route_of`.  The duration of an ``/events`` request is the
        life of the stream."""
        route = self.route_of(path)
        method = request.method.decode("ascii", "replace")
        if method not in KNOWN_METHODS:
            method = OTHER
        started = time.perf_counter()

        def done(_: object) -> None:
            self.requests.labels(route, method, str(request.code)).inc()
            self.latency.labels(route).observe(time.perf_counter() - started)

        request.notifyFinish().addBoth(done)
