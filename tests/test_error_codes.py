"""
The registry of error codes (:data:`payflux.ingest.errors.ERROR_CODES`, the OpenAPI ``ErrorCode``
enum) is exactly the set of codes PayFlux can answer with.

A generated client parses an error body's ``error`` into an enumeration and fails on a value it
does not know, so a code sent but not registered breaks every such client; a code registered but
never sent is a lie in the document.  The codes are found statically, from the source of
payflux/ (``ast``, so comments and docstrings don't count):

- the code argument of every call of :data:`CODE_ARGUMENT`'s callables: ``ApiError(status, code,
  ...)``, ``unavailable(code, ...)``, ``WebhookError(status, code, ...)``, ``rejected(status, code,
  ...)``, ``_payflux_bad_framing(code, ...)`` (http.py's 400s);
- the ``"error"`` value of every dict literal in payflux/ingest and payflux/webhooks (the Klein
  apps' 404/405/500 bodies; not the OpenAPI modules, whose dicts are the document);
- the ``code`` class attribute of every :class:`~payflux.redis.replies.RedisUnavailable`
  subclass (the append path answers 503 with it).

A code given as a string literal is collected.  Any other expression is a *variable site*; each
must be listed in :data:`VARIABLE_SITES`, which says where its codes come from, so a new one
fails here until someone has looked at what it can carry.  Not scanned, on purpose: payflux/client
(the producer library: its ``{"error": "connection"}`` results are built client-side, never sent
by a node) and the status page's ``"error"`` field (payflux/observability/status.py: an exception
class name inside /status.json's panels, not an error answer).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

from payflux.ingest.errors import ERROR_CODES

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "payflux"
NOT_SCANNED = ("payflux/client/",)
#: Where dict literals with an "error" key are answer bodies (the OpenAPI modules: the document).
BODY_DIRS = ("payflux/ingest/", "payflux/webhooks/")
NOT_BODIES = ("payflux/ingest/openapi",)

#: Callables whose argument at this position (or keyword ``code``) is an error code.
CODE_ARGUMENT = {"ApiError": 1, "unavailable": 0, "WebhookError": 1, "rejected": 1, "_payflux_bad_framing": 0}


@attrs.frozen
class Forwards:
    """The site passes on what its callers give ``callable`` (whose call sites are scanned)."""

    callable: str


@attrs.frozen
class Literals:
    """The site's variable holds one of these, each a string literal in the same function."""

    codes: tuple[str, ...]


@attrs.frozen
class ExceptionCode:
    """``getattr(e, "code", default)`` of a caught ``base``: the default or a subclass's ``code``."""

    base: str
    default: str


#: (file, function, the code expression) -> where its codes come from.  Reviewed by hand.
VARIABLE_SITES = {
    ("payflux/ingest/errors.py", "ApiError.body", "self.code"): Forwards("ApiError"),
    ("payflux/ingest/errors.py", "unavailable", "code"): Forwards("unavailable"),
    ("payflux/ingest/http.py", "IngestChannel._payflux_bad_framing", "code"): Forwards("_payflux_bad_framing"),
    # result.error: a WebhookError of a handler (rejected() or stripe.verify_signature)
    ("payflux/ingest/webhooks.py", "WebhookReceiver._receive", "error.code"): Forwards("WebhookError"),
    ("payflux/ingest/app.py", "IngestApp._appended", "getattr(e, 'code', 'redis_unavailable')"):
        ExceptionCode("RedisUnavailable", "redis_unavailable"),
    ("payflux/webhooks/common.py", "WebhookError.body", "self.code"): Forwards("WebhookError"),
    ("payflux/webhooks/common.py", "rejected", "code"): Forwards("rejected"),
    ("payflux/webhooks/adyen.py", "AdyenWebhook.handle", "code"): Literals(("missing_signature", "signature_mismatch")),
}


def _sources() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(ROOT).as_posix()
        if not name.startswith(NOT_SCANNED):
            found[name] = ast.parse(path.read_text(encoding="utf-8"), name)
    return found


def _callable_name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _code_argument(call: ast.Call, index: int) -> ast.expr | None:
    for keyword in call.keywords:
        if keyword.arg == "code":
            return keyword.value
    if len(call.args) > index and not any(isinstance(a, ast.Starred) for a in call.args[:index + 1]):
        return call.args[index]
    return None


class _Scan(ast.NodeVisitor):
    """Literal codes (code -> places) and variable sites (key -> function node) of one module."""

    def __init__(self, name: str, literal: dict[str, list[str]], variable: dict[tuple, ast.AST]):
        self.name = name
        self.literal = literal
        self.variable = variable
        self.scope: list[ast.AST] = []

    def _qualname(self) -> str:
        return ".".join(n.name for n in self.scope) or "<module>"

    def _visit_scope(self, node) -> None:
        self.scope.append(node)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_scope

    def _code(self, expr: ast.expr | None, line: int) -> None:
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            self.literal.setdefault(expr.value, []).append(f"{self.name}:{line}")
        else:
            key = (self.name, self._qualname(), ast.unparse(expr) if expr is not None else "<none>")
            self.variable[key] = self.scope[-1] if self.scope else None

    def visit_Call(self, node: ast.Call) -> None:
        name = _callable_name(node.func)
        if name in CODE_ARGUMENT:
            self._code(_code_argument(node, CODE_ARGUMENT[name]), node.lineno)
        self.generic_visit(node)

    def visit_Dict(self, node: ast.Dict) -> None:
        if self.name.startswith(BODY_DIRS) and not self.name.startswith(NOT_BODIES):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "error":
                    self._code(value, node.lineno)
        self.generic_visit(node)


def _exception_codes(sources: dict[str, ast.Module], base: str) -> dict[str, list[str]]:
    """The ``code = "..."`` of every class deriving (transitively) from ``base``."""
    classes = {}
    for name, tree in sources.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                classes[node.name] = (name, node)
    derived = {base}
    grew = True
    while grew:
        grew = False
        for cls, (_, node) in classes.items():
            if cls not in derived and any(_callable_name(b) in derived for b in node.bases):
                derived.add(cls)
                grew = True
    codes: dict[str, list[str]] = {}
    for cls in derived - {base}:
        name, node = classes[cls]
        for statement in node.body:
            if isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "code"
                                                         for t in statement.targets):
                if not (isinstance(statement.value, ast.Constant) and isinstance(statement.value.value, str)):
                    raise AssertionError(f"{name}: {cls}.code is not a string literal; review it")
                codes.setdefault(statement.value.value, []).append(f"{name}:{statement.lineno} ({cls}.code)")
    return codes


@functools.cache
def scan() -> tuple[dict[str, list[str]], dict[tuple, ast.AST], dict[tuple, set[str]]]:
    """Literal codes with their places, the variable sites found, and the codes of each reviewed site."""
    sources = _sources()
    literal: dict[str, list[str]] = {}
    variable: dict[tuple, ast.AST] = {}
    for name, tree in sources.items():
        _Scan(name, literal, variable).visit(tree)
    resolved: dict[tuple, set[str]] = {}
    for key, origin in VARIABLE_SITES.items():
        if isinstance(origin, Forwards):
            resolved[key] = set()  # its callers' codes are collected at their own call sites
        elif isinstance(origin, Literals):
            function = variable.get(key)
            constants = {n.value for n in ast.walk(function) if isinstance(n, ast.Constant)} if function else set()
            resolved[key] = {c for c in origin.codes if c in constants}
        else:
            resolved[key] = {origin.default, *_exception_codes(sources, origin.base)}
    return literal, variable, resolved


class ErrorCodeRegistryTests(SynchronousTestCase):
    def setUp(self):
        self.literal, self.variable, self.resolved = scan()

    def test_every_variable_site_is_reviewed(self):
        new = sorted(set(self.variable) - set(VARIABLE_SITES))
        self.assertEqual(new, [], "an error code passed through a variable: find what it can carry, register those "
                                  "codes in ERROR_CODES and add the site to VARIABLE_SITES")
        gone = sorted(set(VARIABLE_SITES) - set(self.variable))
        self.assertEqual(gone, [], "VARIABLE_SITES lists a site that is no longer in payflux/: remove it")

    def test_reviewed_sites_still_say_what_they_carry(self):
        for key, origin in VARIABLE_SITES.items():
            if isinstance(origin, Forwards):
                self.assertIn(origin.callable, CODE_ARGUMENT, key)  # whose call sites are scanned
            elif isinstance(origin, Literals):
                self.assertEqual(self.resolved[key], set(origin.codes), f"{key}: a code is no longer in the function")
        redis_codes = self.resolved[("payflux/ingest/app.py", "IngestApp._appended",
                                     "getattr(e, 'code', 'redis_unavailable')")]
        self.assertEqual(redis_codes, {"redis_unavailable", "replicas_not_acked"})

    def test_every_code_sent_is_registered(self):
        sent = set(self.literal).union(*self.resolved.values())
        missing = {code: self.literal.get(code, ["(a variable site)"]) for code in sorted(sent - set(ERROR_CODES))}
        self.assertEqual(missing, {}, "codes PayFlux sends that payflux/ingest/errors.py ERROR_CODES lacks")

    def test_every_registered_code_is_sent(self):
        sent = set(self.literal).union(*self.resolved.values())
        self.assertEqual(sorted(set(ERROR_CODES) - sent), [], "ERROR_CODES lists codes nothing sends")

    def test_the_registry_says_the_status_of_each_code(self):
        for code, meaning in ERROR_CODES.items():
            self.assertRegex(code, r"^[a-z][a-z0-9_]*$")
            self.assertRegex(meaning, r"^[1-5][0-9]{2}: ", code)

    def test_the_scan_finds_codes_in_each_kind_of_site(self):
        """The scanner itself: one known code from each kind of site."""
        places = {code: " ".join(where) for code, where in self.literal.items()}
        self.assertIn("payflux/ingest/http.py", places["uri_too_long"])  # ApiError(414, ...)
        self.assertIn("payflux/ingest/app.py", places["overloaded"])  # unavailable(...)
        self.assertIn("payflux/webhooks/stripe.py", places["no_v1_signature"])  # WebhookError(...)
        self.assertIn("payflux/webhooks/adyen.py", places["malformed_notification"])  # rejected(...)
        self.assertIn("payflux/ingest/http.py", places["bad_framing"])  # _payflux_bad_framing(...)
        self.assertIn("payflux/ingest/side.py", places["method_not_allowed"])  # {"error": ...}
        self.assertIn("payflux/ingest/errors.py", places["unauthorized"])  # helpers in errors.py
