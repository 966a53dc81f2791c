"""The package's layers, checked from its own imports.

``nodepass/`` is read top-down as URL -> config -> service tree -> modes ->
wire protocol -> pool transports -> relays: each subpackage is a layer, and
a module may import only from its own package or from a lower layer.  This
test reads every ``import`` of the package (function-level ones included)
with :mod:`ast` and fails on an upward or sideways import between layers and
on any import circle between modules, naming the files."""

from __future__ import annotations

import ast
import os

from twisted.trial import unittest

from tests.procs import REPO

#: Layer of each top-level part of the package; higher imports lower.
LAYERS = {
    "nodepass.cli": 10,  # the ``nodepass`` command
    "nodepass.tap": 9,  # twistd options and the service tree
    "nodepass.ctl": 9,  # the master's client library and ``nodepassctl``
    "nodepass.master": 8,  # REST API, SSE, durable state
    "nodepass.workers": 7,  # the master's worker processes and the program they run
    "nodepass.service": 6,  # one tunnel instance as a Twisted service
    "nodepass.modes": 5,  # single-end, dual-end server and client
    "nodepass.pools": 4,  # pool transports: TCP, QUIC
    "nodepass.relay": 3,  # moving bytes: relay core, splice, TLS fast path, UDP
    "nodepass.net": 3,  # TLS credentials, dialing and DNS
    "nodepass.wire": 2,  # line codec, signals, control channel
    "nodepass.config": 2,  # URLs, tunables, durations
    "nodepass.base": 1,  # logs, counters
    "nodepass.compat": 1,  # the library internals we rely on; imports only third-party libraries
    "nodepass": 0,  # the package's face: its version
}


def _module_name(path: str) -> str:
    rel = os.path.relpath(path, REPO)[: -len(".py")].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _modules() -> dict[str, str]:
    found = {}
    for root, _dirs, files in os.walk(os.path.join(REPO, "nodepass")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                found[_module_name(path)] = path
    return found


def _imports(path: str, modules: dict[str, str]) -> set[str]:
    """The package's modules that ``path`` imports (``from a import b``
    counts as ``a.b`` when that is a module)."""
    out = set()
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not node.module.startswith("nodepass"):
                continue
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("nodepass"))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (write the absolute module path)")
    return out


def _layer(module: str) -> tuple[str, int]:
    parts = module.split(".")
    for n in (2, 1):
        key = ".".join(parts[:n])
        if key in LAYERS:
            return key, LAYERS[key]
    raise KeyError(module)


class LayerTests(unittest.TestCase):
    def setUp(self):
        self.modules = _modules()
        self.graph = {m: _imports(p, self.modules) & set(self.modules) for m, p in self.modules.items()}

    def test_every_module_has_a_layer(self):
        missing = [m for m in self.modules if _layer_or_none(m) is None]
        self.assertEqual(missing, [], "add these to LAYERS in tests/test_layers.py (and README's module map)")

    def test_imports_point_down(self):
        wrong = []
        for src, targets in self.graph.items():
            src_part, src_rank = _layer(src)
            for dst in targets:
                dst_part, dst_rank = _layer(dst)
                if dst_part != src_part and dst_rank >= src_rank:
                    wrong.append(f"{src} -> {dst} ({src_part} is layer {src_rank}, {dst_part} layer {dst_rank})")
        self.assertEqual(sorted(wrong), [])

    def test_no_import_circle(self):
        circles = []
        state: dict[str, int] = {}  # 1 on the stack, 2 done
        stack: list[str] = []

        def visit(m: str) -> None:
            state[m] = 1
            stack.append(m)
            for n in sorted(self.graph[m]):
                if state.get(n) == 1:
                    circles.append(" -> ".join(stack[stack.index(n):] + [n]))
                elif n not in state:
                    visit(n)
            stack.pop()
            state[m] = 2

        for m in sorted(self.graph):
            if m not in state:
                visit(m)
        self.assertEqual(circles, [])

    def test_the_checker_sees_a_circle(self):
        """The checks themselves can fail: an upward edge added to the real
        graph is reported."""
        self.graph["nodepass.base.logs"].add("nodepass.master.service")
        with self.assertRaises(self.failureException):
            self.test_imports_point_down()
        with self.assertRaises(self.failureException):
            self.test_no_import_circle()


def _layer_or_none(module: str):
    try:
        return _layer(module)
    except KeyError:
        return None
