"""``nodepassctl``: drive a NodePass master from the shell.

The master URL and API key come from ``--master``/``--key`` or the
environment (``NODEPASS_MASTER``/``NODEPASS_KEY``, or the aliases
``NP_MASTER_URL``/``NP_API_KEY``).  Output is a readable table by default and
the master's raw JSON with ``--json``.  Any failure prints one line on stderr
and exits non-zero (1 for an API or connection error, 2 for bad usage): a
script reading stderr gets the reason, a person never gets a traceback, and
neither ever gets the API key.

:func:`execute` is the whole command minus the reactor (argument parsing,
the command, the error line and the exit status), so tests run it
in-process; :func:`main` wraps it in ``task.react``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence, TextIO

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from nodepass.base.logs import escape_controls
from nodepass.ctl.client import KEY_INSTANCE, MasterAPIError, MasterClient

DEFAULT_MASTER = "http://127.0.0.1:9090/api"
ENV_MASTER = ("NODEPASS_MASTER", "NP_MASTER_URL")
ENV_KEY = ("NODEPASS_KEY", "NP_API_KEY")

#: How long ``show`` waits, by default, for the next error line of an
#: instance in ``error`` (the master keeps no error text: see
#: :func:`last_error_line`).
ERROR_WAIT = 5.0
#: ``top``: seconds between tables unless ``--interval`` says otherwise.
TOP_INTERVAL = 2.0
#: ``top``: two counter samples closer than this give no rate (too noisy).
MIN_RATE_WINDOW = 0.5

#: ``/info`` fields that count bytes.
INFO_SIZES = ("mem_total", "mem_used", "swap_total", "swap_used", "netrx", "nettx", "diskr", "diskw")

#: An ERROR line as instances write it into SSE ``log`` events.
_ERROR_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?  ERROR  ")

#: ANSI: cursor home, then clear the screen (``top`` on a terminal).
CLEAR_SCREEN = "\x1b[H\x1b[2J"


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


class CommandFailed(Exception):
    """The master answered, but the command could not do what was asked
    (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse, except that a usage error raises :class:`UsageError`:
    argparse's own report is two lines (usage, then the error) and exits
    from inside the parser, while every error of ``nodepassctl`` is one line
    and leaves through :func:`execute`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _env(names: Sequence[str], environ: Mapping[str, str]) -> Optional[str]:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nodepassctl",
        description="Control a NodePass master through its REST API.",
        epilog=(
            "Environment: NODEPASS_MASTER (or NP_MASTER_URL) is the API root, e.g. "
            f"{DEFAULT_MASTER}; NODEPASS_KEY (or NP_API_KEY) is the API key."
        ),
    )
    parser.add_argument("--master", "-m", help=f"API root URL (default: env, then {DEFAULT_MASTER})")
    parser.add_argument("--key", "-k", help="API key (default: env NODEPASS_KEY / NP_API_KEY)")
    parser.add_argument("--insecure", action="store_true", help="do not verify the master's TLS certificate (tls=1)")
    parser.add_argument("--ca-file", help="verify the master's certificate against this PEM file")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for an answer (default 30)")
    parser.add_argument("--json", action="store_true", help="print the master's JSON instead of tables")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("list", help="list instances")
    p = sub.add_parser("show", help="show one instance")
    p.add_argument("id")
    p.add_argument(
        "--error-wait",
        type=float,
        default=ERROR_WAIT,
        metavar="S",
        help=f"for an instance in error, wait up to S seconds for its next error line (default {ERROR_WAIT:g}; 0: don't)",
    )
    p = sub.add_parser("create", help="create and start an instance")
    p.add_argument("url", help="server://... or client://...")
    p.add_argument("--alias")
    for name, text in (
        ("start", "start an instance"),
        ("stop", "stop an instance"),
        ("restart", "restart an instance"),
        ("reset", "zero an instance's traffic counters"),
        ("delete", "stop and remove an instance"),
    ):
        sub.add_parser(name, help=text).add_argument("id")
    p = sub.add_parser("alias", help="set an instance's alias")
    p.add_argument("id")
    p.add_argument("name")
    p = sub.add_parser("tags", help="replace an instance's tags with KEY=VALUE pairs (or --clear them)")
    p.add_argument("id")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--clear", action="store_true", help="remove every tag (fails if the master cannot)")
    p = sub.add_parser("policy", help="set whether the master starts an instance at its own start")
    p.add_argument("id")
    p.add_argument("restart", choices=("on", "off"))
    p = sub.add_parser("url", help="replace an instance's URL and restart it")
    p.add_argument("id")
    p.add_argument("url")
    sub.add_parser("info", help="show master information")
    p = sub.add_parser("master-alias", help="set the master's alias")
    p.add_argument("name")
    sub.add_parser("rotate-key", help="make the master generate a new API key and print it")
    p = sub.add_parser("tcping", help="TCP connect time from the master to HOST:PORT")
    p.add_argument("target")
    p = sub.add_parser("events", help="print live events until interrupted")
    p.add_argument("--count", type=int, default=0, help="stop after N events (0: never)")
    p = sub.add_parser("top", help="live table of instances with traffic rates, until interrupted")
    p.add_argument(
        "--interval", type=float, default=TOP_INTERVAL, metavar="S", help=f"seconds between tables (default {TOP_INTERVAL:g})"
    )
    p.add_argument("--once", action="store_true", help="print one table (after --interval seconds) and exit")
    p.add_argument("--count", type=int, default=0, metavar="N", help="exit after N tables (0: never)")
    return parser


# -- formatting ----------------------------------------------------------


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or isinstance(n, bool):
        return str(n)
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def _with_human(n: Any) -> Any:
    """``12345 (12.1 KiB)``: the exact figure for scripts that scrape the
    table anyway, the readable one for people."""
    if isinstance(n, int) and not isinstance(n, bool):
        return f"{n} ({human_bytes(n)})"
    return n


def yes_no(value: Any) -> str:
    return "yes" if value is True else "no" if value is False else "-"


def format_tags(tags: Any) -> str:
    """``env=prod,team=net`` in the master's order (``""`` for none)."""
    if not isinstance(tags, dict):
        return ""
    return ",".join(f"{k}={v}" for k, v in tags.items())


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        line = "  ".join(c.ljust(widths[i]) for i, c in enumerate(row))
        lines.append(line.rstrip())
    return "\n".join(lines)


INSTANCE_COLUMNS = (
    "ID", "TYPE", "STATUS", "ALIAS", "MODE", "PING", "POOL", "TCPS", "UDPS", "RX", "TX", "RESTART", "TAGS", "URL",
)


def _instance_row(inst: dict) -> list:
    rx = (inst.get("tcprx") or 0) + (inst.get("udprx") or 0)
    tx = (inst.get("tcptx") or 0) + (inst.get("udptx") or 0)
    if inst.get("id") == KEY_INSTANCE:
        return [inst.get("id"), "(key)", "", inst.get("alias", ""), "", "", "", "", "", "", "", "", "", "(API key hidden)"]
    return [
        inst.get("id", ""), inst.get("type", ""), inst.get("status", ""), inst.get("alias", ""),
        inst.get("mode", ""), f"{inst.get('ping', 0)}ms", inst.get("pool", ""),
        inst.get("tcps", ""), inst.get("udps", ""), human_bytes(rx), human_bytes(tx),
        yes_no(inst.get("restart")), format_tags((inst.get("meta") or {}).get("tags")), inst.get("url", ""),
    ]


def format_instances(instances: list) -> str:
    return table(INSTANCE_COLUMNS, [_instance_row(i) for i in instances])


def format_mapping(data: dict) -> str:
    width = max((len(k) for k in data), default=0)
    lines = []
    for key, value in data.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, ensure_ascii=False)
        elif value is None:
            value = "-"
        lines.append(f"{key.ljust(width)}  {value}")
    return "\n".join(lines)


def format_instance(inst: dict, error_line: Optional[str] = None) -> str:
    """One instance, one field a line.  ``error_line`` (for an instance in
    ``error``) is shown right after ``status``: it is the why of that
    status, which the record itself does not carry."""
    shown: dict[str, Any] = {}
    for key, value in inst.items():
        shown[key] = value
        if key == "status" and error_line is not None:
            shown["error"] = error_line
    if shown.get("id") == KEY_INSTANCE:
        shown["url"] = "(API key hidden; use --json to see it)"
    if "restart" in shown:
        shown["restart"] = yes_no(shown["restart"])
    for name in ("tcprx", "tcptx", "udprx", "udptx"):
        if name in shown:
            shown[name] = _with_human(shown[name])
    return format_mapping(shown)


def format_info(info: dict) -> str:
    """``/info`` with the byte counts also in binary units."""
    shown = dict(info)
    for name in INFO_SIZES:
        if name in shown:
            shown[name] = _with_human(shown[name])
    return format_mapping(shown)


def format_event(event: dict) -> str:
    inst = event.get("instance") or {}  # None in shutdown events
    parts = [str(event.get("time", "")), str(event.get("type", "")).ljust(8), str(inst.get("id", "-"))]
    if not inst:
        pass
    elif event.get("type") == "log":
        parts.append(str(event.get("logs", "")).rstrip("\n"))
    else:
        parts.append(str(inst.get("status", "")))
        if inst.get("alias"):
            parts.append(repr(inst["alias"]))
    return "  ".join(parts)


def format_tcping(result: dict) -> str:
    if result.get("connected"):
        return f"{result.get('target')}: connected in {result.get('latency')} ms"
    return f"{result.get('target')}: not connected ({result.get('error')})"


def parse_tags(pairs: Sequence[str]) -> dict:
    tags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"tag {pair!r} must be KEY=VALUE")
        tags[key] = value
    return tags


def error_line(error: BaseException, secrets: Sequence[str] = ()) -> tuple[int, str]:
    """The exit status and the one stderr line for ``error``.

    The line is made safe to print whatever it quotes (a URL, a server's
    answer): control characters become visible escapes, so it stays one
    line and cannot drive the terminal, and any of ``secrets`` (the API
    key) is replaced by ``********``."""
    if isinstance(error, UsageError):
        code, text = 2, str(error)
    elif isinstance(error, MasterAPIError):
        code, text = 1, str(error)
        if error.kind == "no_api":
            text += "; set NODEPASS_MASTER (or --master) to the master URL with its prefix"
    elif isinstance(error, CommandFailed):
        code, text = 1, str(error)
    else:
        code, text = 1, f"{error.__class__.__name__}: {error}"
    for secret in secrets:
        if secret:
            text = text.replace(secret, "********")
    return code, "nodepassctl: " + escape_controls(text)


# -- the error line of an instance in error ------------------------------


async def last_error_line(client: MasterClient, instance_id: str, wait: float, reactor: Any) -> Optional[str]:
    """The next ERROR line of ``instance_id``, read from the event stream
    within ``wait`` seconds; None when none comes (or the instance is back
    to running first).

    The master keeps no error text: its record of an instance has a status
    and no reason, and the ``Client error: ...``/``Server error: ...`` line
    that set ``error`` went out once, as an SSE ``log`` event, to whoever
    was listening.  An instance in ``error`` retries after
    ``NP_SERVICE_COOLDOWN`` (3 s by default) and, if the cause persists,
    writes the line again, so listening for a few seconds usually catches
    it.  An instance whose ``log=`` hides errors, or one in ``error`` for
    a missing health report, writes none."""
    if wait <= 0:
        return None
    deadline = reactor.seconds() + wait
    async with client.events() as stream:
        while True:
            remaining = deadline - reactor.seconds()
            if remaining <= 0:
                return None
            try:
                event = await stream.next(remaining)
            except StopAsyncIteration:
                return None
            except MasterAPIError as e:
                if e.kind == "timeout":
                    return None
                raise
            inst = event.get("instance") or {}
            if inst.get("id") != instance_id:
                continue
            if event.get("type") == "delete":
                return None
            if event.get("type") == "update" and inst.get("status") == "running":
                return None
            logs = event.get("logs")
            if event.get("type") == "log" and isinstance(logs, str) and _ERROR_LINE.match(logs):
                return logs.rstrip("\n")


# -- top -----------------------------------------------------------------

TOP_COLUMNS = ("ID", "ALIAS", "TYPE", "STATUS", "PING", "POOL", "TCPS", "UDPS", "RX/s", "TX/s", "RX", "TX")


class TopView:
    """What ``top`` shows: the instances as the event stream last described
    them, and a receive and a send rate for each.

    The master sends an ``update`` with the counters at each health report
    (every ``NP_REPORT_INTERVAL``, 5 s by default), so a rate is the bytes
    between two such samples over the time between their arrival; samples
    closer than ``MIN_RATE_WINDOW`` are merged into the next, as an update
    for another reason (an alias change) can follow a report closely.
    ``log`` events carry the instance too (its status changes to ``error``
    travel that way) but their counters are the last report's, so they
    update the row, never the rate."""

    def __init__(self) -> None:
        self.instances: dict[str, dict] = {}
        self._samples: dict[str, tuple[float, int, int]] = {}
        self.rates: dict[str, tuple[float, float]] = {}

    @staticmethod
    def _totals(inst: dict) -> tuple[int, int]:
        def num(name: str) -> int:
            value = inst.get(name)
            return value if isinstance(value, int) else 0

        return num("tcprx") + num("udprx"), num("tcptx") + num("udptx")

    def apply(self, event: dict, now: float) -> None:
        inst = event.get("instance")
        kind = event.get("type")
        if not isinstance(inst, dict) or not isinstance(inst.get("id"), str) or inst["id"] == KEY_INSTANCE:
            return
        iid = inst["id"]
        if kind == "delete":
            self.instances.pop(iid, None)
            self._samples.pop(iid, None)
            self.rates.pop(iid, None)
            return
        self.instances[iid] = inst
        if kind == "log":
            return
        rx, tx = self._totals(inst)
        previous = self._samples.get(iid)
        if previous is None or rx < previous[1] or tx < previous[2]:  # first sight, or counters reset
            self._samples[iid] = (now, rx, tx)
            self.rates.pop(iid, None)
            return
        elapsed = now - previous[0]
        if elapsed >= MIN_RATE_WINDOW:
            self.rates[iid] = ((rx - previous[1]) / elapsed, (tx - previous[2]) / elapsed)
            self._samples[iid] = (now, rx, tx)

    def rows(self) -> list[list[str]]:
        rows = []
        for iid, inst in self.instances.items():
            rx, tx = self._totals(inst)
            rate = self.rates.get(iid)
            if inst.get("status") != "running":
                rate_rx = rate_tx = "-"
            elif rate is None:
                rate_rx = rate_tx = "..."
            else:
                rate_rx, rate_tx = human_bytes(round(rate[0])) + "/s", human_bytes(round(rate[1])) + "/s"
            rows.append(
                [
                    iid, str(inst.get("alias", "")), str(inst.get("type", "")), str(inst.get("status", "")),
                    f"{inst.get('ping', 0)}ms", str(inst.get("pool", "")), str(inst.get("tcps", "")),
                    str(inst.get("udps", "")), rate_rx, rate_tx, human_bytes(rx), human_bytes(tx),
                ]
            )
        return rows

    def render(self, root: str, when: Optional[float] = None) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(when))
        head = f"{stamp}  {root}  {len(self.instances)} instance{'' if len(self.instances) == 1 else 's'}"
        return head + "\n" + table(TOP_COLUMNS, self.rows())


class _Wake:
    """One waiter woken by a timer or by the end of the event stream,
    whichever comes first."""

    def __init__(self) -> None:
        self.ended = False
        self._waiter: Optional[Deferred] = None

    def end(self) -> None:
        self.ended = True
        self._fire()

    def _fire(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    async def sleep(self, reactor: Any, seconds: float) -> None:
        if self.ended:
            return
        waiter = self._waiter = Deferred()
        call = reactor.callLater(seconds, self._fire)
        try:
            await waiter
        finally:
            if call.active():
                call.cancel()


async def top(client: MasterClient, args: argparse.Namespace, out: TextIO, reactor: Any) -> None:
    """Follow ``/events`` and print :class:`TopView` every ``--interval``
    seconds: redrawn in place on a terminal, one table after another
    otherwise (a pipe or a file keeps every table).  Ends after
    ``--count`` tables (``--once``: one), at Ctrl-C (:func:`main`), or with
    an error when the master closes the stream."""
    if args.interval <= 0:
        raise UsageError("--interval must be more than 0")
    if args.count < 0:
        raise UsageError("--count must be 0 or more")
    count = 1 if args.once else args.count
    tty = bool(getattr(out, "isatty", lambda: False)())
    view = TopView()
    wake = _Wake()
    broken: list[MasterAPIError] = []
    stream = client.events()
    await stream.open()

    async def consume() -> None:
        try:
            async for event in stream:
                view.apply(event, reactor.seconds())
        except MasterAPIError as e:
            broken.append(e)
        finally:
            wake.end()

    consuming = defer.ensureDeferred(consume())
    shown = 0
    try:
        while True:
            await wake.sleep(reactor, args.interval)
            if broken:
                raise broken[0]
            text = view.render(client.root)
            if tty:
                _write(out, CLEAR_SCREEN + text)
            else:
                _write(out, ("\n" if shown else "") + text)
            shown += 1
            if count and shown >= count:
                return
            if wake.ended:
                raise MasterAPIError(0, "the master closed the event stream (it stopped, or its API key was rotated)")
    finally:
        await stream.close()
        await consuming


# -- running -------------------------------------------------------------


def _write(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def _key(args: argparse.Namespace, environ: Mapping[str, str]) -> Optional[str]:
    return args.key or _env(ENV_KEY, environ)


async def run(
    reactor: Any, args: argparse.Namespace, environ: Optional[Mapping[str, str]] = None, out: Optional[TextIO] = None
) -> int:
    """Run the parsed command; raises :class:`UsageError`,
    :class:`CommandFailed` or :class:`MasterAPIError` (see
    :func:`execute` for the error line and exit status)."""
    environ = os.environ if environ is None else environ
    out = sys.stdout if out is None else out
    master = args.master or _env(ENV_MASTER, environ) or DEFAULT_MASTER
    key = _key(args, environ)
    if not key:
        raise UsageError("no API key: pass --key or set NODEPASS_KEY")
    if args.timeout <= 0:
        raise UsageError("--timeout must be more than 0")
    try:
        client = MasterClient(
            master, key, verify=not args.insecure, ca_file=args.ca_file, timeout=args.timeout, reactor=reactor
        )
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    try:
        return await _dispatch(client, args, out, reactor)
    finally:
        await client.close()


async def _dispatch(client: MasterClient, args: argparse.Namespace, out: TextIO, reactor: Any) -> int:
    cmd = args.command
    as_json = args.json

    def emit(result: Any, text: str) -> None:
        _write(out, json.dumps(result, indent=2, ensure_ascii=False) if as_json else text)

    if cmd == "list":
        instances = await client.list_instances()
        emit(instances, format_instances(instances))
    elif cmd == "show":
        if args.error_wait < 0:
            raise UsageError("--error-wait must be 0 or more")
        result = await client.get_instance(args.id)
        if as_json or result.get("status") != "error":
            emit(result, format_instance(result))
        else:
            emit(result, format_instance(result, await _error_text(client, args.id, args.error_wait, reactor)))
    elif cmd == "create":
        result = await client.create_instance(args.url, alias=args.alias)
        emit(result, format_instance(result))
    elif cmd in ("start", "stop", "restart", "reset"):
        result = await client.action(args.id, cmd)
        emit(result, f"{result.get('id')}: {cmd} done, status {result.get('status')}")
    elif cmd == "delete":
        await client.delete_instance(args.id)
        emit({"deleted": args.id}, f"{args.id}: deleted")
    elif cmd == "alias":
        result = await client.set_alias(args.id, args.name)
        emit(result, f"{result.get('id')}: alias {result.get('alias')!r}")
    elif cmd == "tags":
        result = await _tags(client, args)
        tags = result.get("meta", {}).get("tags", {})
        emit(result, format_mapping(tags) if tags else f"{result.get('id')}: no tags")
    elif cmd == "policy":
        result = await client.set_restart_policy(args.id, args.restart == "on")
        emit(result, f"{result.get('id')}: restart {'on' if result.get('restart') else 'off'}")
    elif cmd == "url":
        result = await client.put_url(args.id, args.url)
        emit(result, format_instance(result))
    elif cmd == "info":
        result = await client.info()
        emit(result, format_info(result))
    elif cmd == "master-alias":
        result = await client.set_master_alias(args.name)
        emit(result, f"master alias {result.get('alias')!r}")
    elif cmd == "rotate-key":
        new_key = await client.rotate_key()
        emit({"key": new_key}, new_key)
    elif cmd == "tcping":
        result = await client.tcping(args.target)
        emit(result, format_tcping(result))
        return 0 if result.get("connected") else 1
    elif cmd == "events":
        if args.count < 0:
            raise UsageError("--count must be 0 or more")
        seen = 0
        async with client.events() as stream:
            async for event in stream:
                _write(out, json.dumps(event, ensure_ascii=False) if as_json else format_event(event))
                seen += 1
                if args.count and seen >= args.count:
                    break
    elif cmd == "top":
        await top(client, args, out, reactor)
    else:  # argparse refuses unknown commands before we get here
        raise UsageError(f"unknown command {cmd!r}")
    return 0


async def _error_text(client: MasterClient, instance_id: str, wait: float, reactor: Any) -> str:
    """What ``show`` prints as the ``error`` of an instance in ``error``."""
    try:
        line = await last_error_line(client, instance_id, wait, reactor)
    except MasterAPIError as e:
        return f"(unknown: the event stream failed: {e})"
    if line is not None:
        return line
    if wait == 0:
        return "(not looked up: the master keeps no error text; see 'nodepassctl events')"
    return f"(no error line within {wait:g}s: the master keeps no error text; see 'nodepassctl events')"


async def _tags(client: MasterClient, args: argparse.Namespace) -> dict:
    """``tags ID KEY=VALUE...`` replaces the tag set; ``tags ID --clear``
    empties it.  Exactly one of the two: a bare ``tags ID`` used to send an
    empty map, which the master reads as "no change" -- a silent no-op that
    looked like a clear."""
    if args.clear and args.pairs:
        raise UsageError("--clear takes no KEY=VALUE pairs")
    if not args.clear:
        if not args.pairs:
            raise UsageError("give KEY=VALUE pairs, or --clear to remove every tag")
        return await client.set_tags(args.id, parse_tags(args.pairs))
    result = await client.clear_tags(args.id)
    if result.get("meta", {}).get("tags"):
        raise CommandFailed(
            f"{args.id}: tags not cleared: this master keeps tags on an explicit null "
            "(Go's master cannot remove the last tag)"
        )
    return result


async def execute(
    reactor: Any,
    argv: Sequence[str],
    environ: Optional[Mapping[str, str]] = None,
    out: Optional[TextIO] = None,
    err: Optional[TextIO] = None,
    interrupted: Callable[[], bool] = lambda: False,
) -> int:
    """The whole command: parse ``argv``, run it, write the one error line
    on ``err`` if it fails; answers the exit status.  ``interrupted`` says
    the process is stopping (Ctrl-C): a connection broken by that is the
    normal end of ``events`` and ``top``, not an error."""
    environ = os.environ if environ is None else environ
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    args: Optional[argparse.Namespace] = None
    try:
        args = build_parser().parse_args(argv)
        return await run(reactor, args, environ, out)
    except BrokenPipeError:
        return 0  # `nodepassctl events | head`: the reader has all it wanted
    except Exception as e:  # noqa: BLE001 - one line, never a traceback
        if isinstance(e, MasterAPIError) and interrupted():
            return 0
        secrets = [s for s in (args.key if args is not None else None, _env(ENV_KEY, environ)) if s]
        code, line = error_line(e, secrets)
        err.write(line + "\n")
        err.flush()
        return code


def main(argv: Optional[Sequence[str]] = None) -> None:
    outcome = {"code": 0, "interrupted": False}

    def start(reactor: Any) -> Deferred:
        # react() stops the reactor on SIGINT/SIGTERM; the open connection
        # then breaks, which is how "events" and "top" are meant to end.
        reactor.addSystemEventTrigger("before", "shutdown", outcome.__setitem__, "interrupted", True)

        async def body() -> None:
            outcome["code"] = await execute(
                reactor, sys.argv[1:] if argv is None else argv, interrupted=lambda: bool(outcome["interrupted"])
            )

        return defer.ensureDeferred(body())

    try:
        task.react(start)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(outcome["code"])


if __name__ == "__main__":
    main()
