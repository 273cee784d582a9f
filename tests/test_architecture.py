"""
The shape of payflux/ itself: no import cycle, txredisapi's internals in one module.

docs/architecture.md draws the layers; these tests keep the code to them.  The import graph is
built from the source (every ``import`` and ``from ... import`` statement, at module level or
inside a function alike), so a cycle hidden in a function-level import fails here too.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "payflux"

# The one module allowed to touch txredisapi's internals (docs/architecture.md).
ADAPTER = "payflux.redis.txadapter"
# txredisapi attributes that are not its public API: what the adapter exists to wrap.
TXREDISAPI_INTERNALS = frozenset({
    "_factory", "_build_command", "_reader", "connectionQueue", "getConnection", "isLazy",
    "startConnecting", "maxDelay", "initialDelay", "replyQueue", "peekers", "hiredis",
})

# Which layer of payflux.redis each module is in; a module imports only from layers below its
# own: 0-1 the bottom (targets, slots, RESP, replies, steps; scripts over replies and steps),
# 1 the adapter, 2 the clients (each over the bottom and the adapter, never each other), 3 connect.
REDIS_LAYERS = {
    "payflux.redis.target": 0, "payflux.redis.slots": 0, "payflux.redis.resp": 0,
    "payflux.redis.replies": 0, "payflux.redis.steps": 0, "payflux.redis.scripts": 1,
    "payflux.redis.discovery": 1,
    "payflux.redis.txadapter": 1, "payflux.redis.cluster": 2, "payflux.redis.sentinel": 2,
    "payflux.redis.sync": 2, "payflux.redis.connect": 3,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, ast.Module]:
    found = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                found[module_name(path)] = ast.parse(path.read_text(), str(path))
    return found


def imported(tree: ast.Module, name: str, known: set[str]) -> set[str]:
    """The payflux modules ``tree`` (module ``name``) imports, anywhere in it."""
    package = name if name in known and (PACKAGE / "/".join(name.split(".")[1:]) / "__init__.py").exists() \
        else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from payflux.x import y": y may be a module (payflux.x.y) or a name in payflux.x
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("payflux"):
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: imported(tree, name, known) for name, tree in trees.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (as the list of modules around it), or None."""
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


class ImportGraphTests(unittest.TestCase):
    def test_no_import_cycle_in_payflux(self):
        graph = import_graph()
        self.assertIn("payflux.redis.target", graph["payflux.redis.connect"])
        cycle = find_cycle(graph)
        self.assertIsNone(cycle, f"import cycle: {' -> '.join(cycle or [])}")

    def test_the_cycle_finder_finds_one(self):
        """The checker itself: a cycle through a function-level import is one."""
        tree = ast.parse("def f():\n    from payflux.a import thing\n")
        graph = {"payflux.b": imported(tree, "payflux.b", {"payflux.a", "payflux.b"}), "payflux.a": {"payflux.b"}}
        self.assertEqual(find_cycle(graph), ["payflux.a", "payflux.b", "payflux.a"])

    def test_redis_layers_import_only_downwards(self):
        graph = import_graph()
        for name, layer in REDIS_LAYERS.items():
            self.assertIn(name, graph, f"{name} is listed in REDIS_LAYERS but does not exist")
            for dep in graph[name]:
                self.assertTrue(dep.startswith("payflux.redis"), f"{name} imports {dep}: outside payflux.redis")
                self.assertLess(REDIS_LAYERS[dep], layer, f"{name} (layer {layer}) imports {dep} "
                                f"(layer {REDIS_LAYERS[dep]})")
        listed = {n for n in graph if n.startswith("payflux.redis.")}
        self.assertEqual(listed, set(REDIS_LAYERS), "every payflux.redis module has its layer here")


def internals_used(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, name) for each use of a txredisapi internal in ``tree``."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in TXREDISAPI_INTERNALS:
            uses.append((node.lineno, node.attr))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "txredisapi" \
                and node.attr.startswith("_"):
            uses.append((node.lineno, f"txredisapi.{node.attr}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr", "setattr") \
                and len(node.args) > 1 and isinstance(node.args[1], ast.Constant) and node.args[1].value in TXREDISAPI_INTERNALS:
            uses.append((node.lineno, f"{node.func.id}(..., {node.args[1].value!r})"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in TXREDISAPI_INTERNALS:
            uses.append((node.lineno, f".get({node.args[0].value!r})"))
    return uses


class TxredisapiInternalsTests(unittest.TestCase):
    def test_internals_only_in_the_adapter(self):
        offenders = []
        for name, tree in sorted(modules().items()):
            if name != ADAPTER:
                offenders += [f"{name}:{line} {what}" for line, what in internals_used(tree)]
        self.assertEqual(offenders, [], "txredisapi internals outside payflux/redis/txadapter.py")

    def test_the_adapter_is_where_they_are(self):
        """The checker itself finds what the adapter wraps (so an empty list above means something)."""
        found = {what.split("'")[1] if "'" in what else what for _, what in internals_used(modules()[ADAPTER])}
        self.assertTrue({"_factory", "_build_command", "_reader", "connectionQueue"} <= found, found)
