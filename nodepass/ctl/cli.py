"""``nodepassctl``: drive a NodePass master from the shell.

The master URL and API key come from ``--master``/``--key`` or the
environment (``NODEPASS_MASTER``/``NODEPASS_KEY``, or the aliases
``NP_MASTER_URL``/``NP_API_KEY``).  Output is a readable table by default and
the master's raw JSON with ``--json``.  Any failure prints one line on stderr
and exits non-zero (1 for an API or connection error, 2 for bad usage).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Optional, Sequence

from twisted.internet import defer, task

from nodepass.ctl.client import MasterAPIError, MasterClient

DEFAULT_MASTER = "http://127.0.0.1:9090/api"
ENV_MASTER = ("NODEPASS_MASTER", "NP_MASTER_URL")
ENV_KEY = ("NODEPASS_KEY", "NP_API_KEY")


class UsageError(Exception):
    """Bad command-line input found after parsing (exit status 2)."""


def _env(names: Sequence[str], environ) -> Optional[str]:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p = sub.add_parser("tags", help="replace an instance's tags with KEY=VALUE pairs")
    p.add_argument("id")
    p.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
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
    return parser


# -- formatting ----------------------------------------------------------


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return str(n)
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)  # pragma: no cover


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        line = "  ".join(c.ljust(widths[i]) for i, c in enumerate(row))
        lines.append(line.rstrip())
    return "\n".join(lines)


INSTANCE_COLUMNS = ("ID", "TYPE", "STATUS", "ALIAS", "MODE", "PING", "POOL", "TCPS", "UDPS", "RX", "TX", "URL")


def _instance_row(inst: dict) -> list:
    rx = (inst.get("tcprx") or 0) + (inst.get("udprx") or 0)
    tx = (inst.get("tcptx") or 0) + (inst.get("udptx") or 0)
    if inst.get("id") == "********":
        return [inst.get("id"), "(key)", "", inst.get("alias", ""), "", "", "", "", "", "", "", "(API key hidden)"]
    return [
        inst.get("id", ""), inst.get("type", ""), inst.get("status", ""), inst.get("alias", ""),
        inst.get("mode", ""), f"{inst.get('ping', 0)}ms", inst.get("pool", ""),
        inst.get("tcps", ""), inst.get("udps", ""), human_bytes(rx), human_bytes(tx), inst.get("url", ""),
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


def format_instance(inst: dict) -> str:
    shown = dict(inst)
    if shown.get("id") == "********":
        shown["url"] = "(API key hidden; use --json to see it)"
    for name in ("tcprx", "tcptx", "udprx", "udptx"):
        if isinstance(shown.get(name), int):
            shown[name] = f"{shown[name]} ({human_bytes(shown[name])})"
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


# -- running -------------------------------------------------------------


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def run(reactor, args: argparse.Namespace, environ=None) -> int:
    environ = os.environ if environ is None else environ
    master = args.master or _env(ENV_MASTER, environ) or DEFAULT_MASTER
    key = args.key or _env(ENV_KEY, environ)
    if not key:
        raise UsageError("no API key: pass --key or set NODEPASS_KEY")
    try:
        client = MasterClient(
            master, key, verify=not args.insecure, ca_file=args.ca_file, timeout=args.timeout, reactor=reactor
        )
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    try:
        return await _dispatch(client, args)
    finally:
        await client.close()


async def _dispatch(client: MasterClient, args: argparse.Namespace) -> int:
    cmd = args.command
    as_json = args.json

    def emit(result: Any, text: str) -> None:
        _out(json.dumps(result, indent=2, ensure_ascii=False) if as_json else text)

    if cmd == "list":
        instances = await client.list_instances()
        emit(instances, format_instances(instances))
    elif cmd == "show":
        result = await client.get_instance(args.id)
        emit(result, format_instance(result))
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
        result = await client.set_tags(args.id, parse_tags(args.pairs))
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
        emit(result, format_mapping(result))
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
                _out(json.dumps(event, ensure_ascii=False) if as_json else format_event(event))
                seen += 1
                if args.count and seen >= args.count:
                    break
    else:  # argparse refuses unknown commands before we get here
        raise UsageError(f"unknown command {cmd!r}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    outcome = {"code": 0}

    async def body(reactor) -> None:
        try:
            outcome["code"] = await run(reactor, args)
        except UsageError as e:
            sys.stderr.write(f"nodepassctl: {e}\n")
            outcome["code"] = 2
        except MasterAPIError as e:
            if outcome.get("interrupted"):
                return  # Ctrl-C / SIGTERM while following events: a normal end
            sys.stderr.write(f"nodepassctl: {e}\n")
            outcome["code"] = 1
        except BrokenPipeError:
            outcome["code"] = 0
        except Exception as e:  # noqa: BLE001 - one line, never a traceback
            sys.stderr.write(f"nodepassctl: {e.__class__.__name__}: {e}\n")
            outcome["code"] = 1

    def start(reactor):
        # react() stops the reactor on SIGINT/SIGTERM; the open connection
        # then breaks, which is how "events" is meant to end.
        reactor.addSystemEventTrigger("before", "shutdown", outcome.__setitem__, "interrupted", True)
        return defer.ensureDeferred(body(reactor))

    try:
        task.react(start)
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    sys.exit(outcome["code"])


if __name__ == "__main__":
    main()
