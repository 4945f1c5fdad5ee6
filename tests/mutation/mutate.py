"""Mutation testing for comet, against the real-server suite.

Generates mutants from the AST of comet's modules, applies each one in a
private copy of the repository (never in the working tree) and runs the test
files that cover that module with ``pytest -x``. A mutant the tests fail on is
*killed*; one they pass on *survived*; one that runs past its time limit is a
*timeout* (counted as killed, reported apart). See README.md next to this file.

    .venv/bin/python tests/mutation/mutate.py --sample 8 --seed 1
    .venv/bin/python tests/mutation/mutate.py --list hub framing
    .venv/bin/python tests/mutation/mutate.py --show hub:223:17:call-drop
    .venv/bin/python tests/mutation/mutate.py --only hub:223:17:call-drop
"""
from __future__ import annotations

import argparse
import ast
import bisect
import ctypes
import dataclasses
import datetime
import difflib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import js_mutants  # noqa: E402  (beside this script, which is not a package import)

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PACKAGE = "comet"

# --------------------------------------------------------------------------
# What to mutate and which tests cover it. Edit these when modules move.
# --------------------------------------------------------------------------

#: Modules under comet/ never mutated by default: test helpers, process
#: management for the tests themselves, the demo app.
EXCLUDED_MODULES = {"testing.py", "live_servers.py", "processes.py", "demo.py"}

#: Module (path under comet/) -> the test files that exercise it. Paths are
#: relative to the repository root; the module itself is added too when it
#: has doctests. Files run fastest first (by the baseline's timings).
#: The one-model tests that are quick (the load test beside them is not).
ONE_MODEL = ["tests/test_one_model.py::test_a_generators_later_steps_see_their_own_request",
             "tests/test_one_model.py::test_a_generator_slow_to_start_holds_no_server_thread",
             "tests/test_one_model.py::test_engine_stop_closes_every_generator_busy_or_slow_to_start"]

TESTS_FOR: dict[str, list[str]] = {
    "hub.py": ["tests/test_mutation_kills.py", "tests/test_hub.py", "tests/test_hub_contract.py", "tests/test_channels.py",
               "tests/test_forget.py", "tests/test_latest.py", "tests/test_snapshot.py", "tests/test_redis.py",
               "tests/test_cherrypy.py", "tests/test_parked.py", "tests/test_pins.py", "docs/examples/test_chat.py"],
    "framing.py": ["tests/test_framing.py", "tests/test_mutation_kills.py", "tests/test_hub.py", "tests/test_cherrypy.py",
                   "tests/test_parked.py", "tests/test_fastpath.py"],
    "stream.py": ["tests/test_mutation_kills.py", "tests/test_cherrypy.py", "tests/test_wsgi.py", "tests/test_stats.py",
                  "tests/test_parked.py"],
    "pipeline.py": ["tests/test_mutation_kills.py", "tests/test_hardening.py", "tests/test_parked.py", "tests/test_wsgi.py",
                    "tests/test_cherrypy.py", "tests/test_fastpath.py", "tests/test_pins.py", "tests/test_heartbeat.py",
                    *ONE_MODEL],
    "pool.py": ["tests/test_mutation_kills.py", "tests/test_stats.py", "tests/test_parked.py", "tests/test_wsgi.py",
                "tests/test_cherrypy.py"],
    "writer.py": ["tests/test_mutation_kills.py", "tests/test_parked.py", "tests/test_user_behaviour.py", "tests/test_cherrypy.py",
                  "tests/test_fastpath.py", *ONE_MODEL],
    "steps.py": ["tests/test_mutation_kills.py", "tests/test_parked.py", "tests/test_user_behaviour.py", *ONE_MODEL],
    "internals/accept.py": ["tests/test_mutation_kills.py", "tests/test_hardening.py", "tests/test_parked.py",
                            "tests/test_fastpath.py", "tests/test_cherrypy.py"],
    "internals/connection.py": ["tests/test_mutation_kills.py", "tests/test_parked.py", "tests/test_wsgi.py",
                                "tests/test_cherrypy.py", "tests/test_liveness_keepalive.py", "tests/test_backlog.py"],
    "internals/cprequest.py": ["tests/test_cherrypy.py", "tests/test_gzip.py", *ONE_MODEL,
                               "tests/test_direct.py"],
    "internals/direct_request.py": ["tests/test_direct.py", "tests/test_cherrypy.py"],
    "fastpath.py": ["tests/test_fastpath.py", "tests/test_hardening.py", "tests/test_cors.py", "tests/test_pins.py",
                    "tests/test_heartbeat.py"],
    "wsgi.py": ["tests/test_wsgi.py", "tests/test_parked.py", "tests/test_fastpath.py", "tests/test_cherrypy.py",
                "tests/test_stats.py"],
    "cherrypy_tool.py": ["tests/test_cherrypy.py", "tests/test_parked.py", "tests/test_fastpath.py",
                         "tests/test_direct.py", "tests/test_pins.py", "tests/test_cors.py", "tests/test_examples.py"],
    "options.py": ["tests/test_mutation_kills.py", "tests/test_cherrypy.py", "tests/test_fastpath.py", "tests/test_wsgi.py",
                   "tests/test_cors.py", "tests/test_heartbeat.py"],
    "stats.py": ["tests/test_stats.py", "tests/test_metrics.py", "tests/test_pins.py", "tests/test_examples.py"],
    "presence.py": ["tests/test_presence.py", "tests/test_presence_http.py", "tests/test_hub_contract.py",
                    "tests/test_presence_freeze.py", "tests/test_examples.py"],
    "publish.py": ["tests/test_publish.py", "tests/test_mutation_kills.py", "tests/test_examples.py"],
    "tokens.py": ["tests/test_tokens.py", "tests/test_examples_pm.py", "tests/test_examples_attacks.py"],
    "counters.py": ["tests/test_stats.py", "tests/test_hub.py"],
    "errors.py": ["tests/test_hub.py", "tests/test_cherrypy.py", "tests/test_fastpath.py"],
    "backends/__init__.py": ["tests/test_redis.py"],
    "backends/redis.py": ["tests/test_mutation_kills.py", "tests/test_redis.py", "tests/test_hub_contract.py",
                          "tests/test_forget_redis.py", "tests/test_fastpath.py", "tests/test_sentinel.py",
                          "tests/test_deploy.py"],
    "backends/redis_presence.py": ["tests/test_presence.py", "tests/test_presence_http.py", "tests/test_hub_contract.py",
                                   "tests/test_presence_freeze.py", "tests/test_forget_redis.py"],
    "backends/redis_cluster.py": ["tests/test_cluster.py", "tests/test_hub_contract.py"],
    # Split out of hub.py (round 4): the hub's own tests judge them.
    "cursors.py": ["tests/test_channels.py", "tests/test_hub.py", "tests/test_hub_contract.py", "tests/test_forget.py",
                   "tests/test_fastpath.py", "tests/test_redis.py"],
    "channel.py": ["tests/test_mutation_kills.py", "tests/test_hub.py", "tests/test_hub_contract.py", "tests/test_latest.py",
                   "tests/test_forget.py", "tests/test_snapshot.py"],
    "cooperative.py": ["tests/test_mutation_kills.py", "tests/test_parked.py", "tests/test_hub.py", *ONE_MODEL],
    "mux.py": ["tests/test_channels.py", "tests/test_hub_contract.py"],
    "store.py": ["tests/test_mutation_kills.py", "tests/test_hub.py", "tests/test_hub_contract.py", "tests/test_forget.py",
                 "tests/test_latest.py", "tests/test_channels.py"],
    "subscription.py": ["tests/test_mutation_kills.py", "tests/test_hub.py", "tests/test_hub_contract.py",
                        "tests/test_channels.py", "tests/test_snapshot.py", "tests/test_parked.py"],
    "hub_presence.py": ["tests/test_presence.py", "tests/test_presence_http.py", "tests/test_hub_contract.py"],
    "hub_channels.py": ["tests/test_hub.py", "tests/test_hub_contract.py", "tests/test_latest.py", "tests/test_channels.py"],
    # Split out of writer.py (round 4).
    "parked.py": ["tests/test_mutation_kills.py", "tests/test_parked.py", "tests/test_cherrypy.py", "tests/test_fastpath.py",
                  "tests/test_heartbeat.py"],
    "mailbox.py": ["tests/test_mutation_kills.py", "tests/test_parked.py", "tests/test_cherrypy.py"],
    "timers.py": ["tests/test_mutation_kills.py", "tests/test_heartbeat.py", "tests/test_parked.py", "tests/test_hardening.py"],
    "fanout.py": ["tests/test_mutation_kills.py", "tests/test_parked.py", "tests/test_user_behaviour.py",
                  "tests/test_latest.py"],
    "stepper.py": ["tests/test_mutation_kills.py", "tests/test_parked.py", "tests/test_user_behaviour.py", *ONE_MODEL],
    "runtime.py": ["tests/test_mutation_kills.py", "tests/test_stats.py", "tests/test_parked.py", "tests/test_cherrypy.py"],
    # Split out of backends/redis.py (round 4).
    "backends/redis_link.py": ["tests/test_redis.py", "tests/test_sentinel.py", "tests/test_cluster.py",
                               "tests/test_hub_contract.py"],
    "backends/redis_publish.py": ["tests/test_redis.py", "tests/test_mutation_kills.py", "tests/test_cluster.py",
                                  "tests/test_hub_contract.py"],
    "backends/redis_scripts.py": ["tests/test_publish.py", "tests/test_redis.py", "tests/test_forget_redis.py",
                                  "tests/test_presence.py"],
    "backends/redis_store.py": ["tests/test_redis.py", "tests/test_hub_contract.py", "tests/test_forget_redis.py",
                                "tests/test_cluster.py", "tests/test_sentinel.py"],
    "backends/redis_reader.py": ["tests/test_redis.py", "tests/test_hub_contract.py", "tests/test_sentinel.py"],
    # The rest of comet/, with the tests that exercise them.
    "direct.py": ["tests/test_direct.py", "tests/test_cherrypy.py"],
    "liveness.py": ["tests/test_liveness_keepalive.py", "tests/test_heartbeat.py", "tests/test_vanished_clients.py"],
    "faults.py": ["tests/test_faults.py"],
    "gunicorn_conf.py": ["tests/test_wsgi_servers.py"],
    # comet.js is judged by the browser tests that load it (Chromium, and
    # Firefox where a test uses it), the broadest and quickest first.
    "static/comet.js": ["tests/browser/test_comet_js.py", "tests/browser/test_client_pins.py",
                        "tests/browser/test_shared_tabs.py", "tests/browser/test_first_cursor_browser.py",
                        "tests/browser/test_snapshot_browser.py", "tests/browser/test_fastpath_browser.py",
                        "tests/browser/test_cors_browser.py", "tests/browser/test_docs_js.py",
                        "tests/browser/test_real_networks.py", "tests/browser/test_stream_probe.py",
                        "tests/browser/test_error_answers.py", "tests/browser/test_http2_tabs.py",
                        "tests/browser/test_shoutbox_pm_browser.py", "tests/browser/test_examples_browser.py",
                        "tests/browser/test_examples_players.py"],
}

#: A module missing from TESTS_FOR gets every non-browser test file
#: (tests/test_*.py, docs/examples/test_*.py) except these: slow and about
#: something else (benchmark scripts, the Sphinx build, mypy, the
#: one-model load test in its own process).
FALLBACK_EXCLUDE = {"tests/test_benchmarks.py", "tests/test_docs.py", "tests/test_types.py",
                    "tests/test_one_model.py"}

#: --browser appends this to every mutant's test files.
BROWSER_TESTS = ["tests/browser"]

# --------------------------------------------------------------------------
# Mutants
# --------------------------------------------------------------------------

LOG_METHODS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "fatal", "log"}
LOGGER_NAMES = re.compile(r"(^|\.)(_?log|_?logger|LOG|LOGGER|logging)$|getLogger\(")
SKIP_FUNCTIONS = {"__repr__", "__str__"}

CMP_NAMES = {ast.Lt: "lt", ast.LtE: "le", ast.Gt: "gt", ast.GtE: "ge", ast.Eq: "eq", ast.NotEq: "ne",
             ast.In: "in", ast.NotIn: "notin", ast.Is: "is", ast.IsNot: "isnot"}
CMP_FLIP = {"lt": ("le", "<="), "le": ("lt", "<"), "gt": ("ge", ">="), "ge": ("gt", ">"),
            "eq": ("ne", "!="), "ne": ("eq", "=="), "in": ("notin", "not in"), "notin": ("in", "in"),
            "is": ("isnot", "is not"), "isnot": ("is", "is")}
CMP_TOKEN = {"lt": r"(?<![<>=!])<(?!=)", "le": r"<=", "gt": r"(?<![<>=!-])>(?!=)", "ge": r">=",
             "eq": r"==", "ne": r"!=", "in": r"\bin\b", "notin": r"\bnot\s+in\b",
             "is": r"\bis\b", "isnot": r"\bis\s+not\b"}

#: operator name -> family, for the summary
FAMILIES = {"cmp": "comparison flip", "bool": "and/or swap", "not": "`not` removed", "num": "number +/-1 or 0",
            "const": "True/False swap", "call": "call statement removed", "return": "return X -> None",
            "loop": "continue/break removed", "if": "if condition -> True/False"}


@dataclasses.dataclass(frozen=True)
class Mutant:
    id: str
    module: str            # repository-relative path, e.g. comet/hub.py
    line: int              # 1-based
    col: int               # 1-based, in characters
    op: str                # e.g. lt-le, call-drop, if-true
    family: str            # a key of FAMILIES
    edits: tuple[tuple[int, int, str], ...]   # (start, end, text) character offsets into the source
    original: str          # the source line, stripped
    mutated: str           # the same line after the mutation, stripped

    def apply(self, source: str) -> str:
        for start, end, text in sorted(self.edits, reverse=True):
            source = source[:start] + text + source[end:]
        return source


def module_key(module: str) -> str:
    """comet/backends/redis.py -> backends/redis, comet/static/comet.js ->
    comet.js (the first part of an id)."""
    if module.endswith(".js"):
        return Path(module).name
    return str(Path(module).relative_to(PACKAGE).with_suffix("")).replace(os.sep, "/")


def module_from_key(key: str) -> str:
    if key.endswith(".js"):
        return f"{PACKAGE}/static/{key}"
    return f"{PACKAGE}/{key}.py"


class _Finder:
    """Walks one module's AST and records every mutant of the operators above."""

    def __init__(self, module: str, source: str) -> None:
        self.module = module
        self.source = source
        self.lines = source.splitlines(keepends=True)
        self.starts = [0]
        for line in self.lines:
            self.starts.append(self.starts[-1] + len(line))
        self.tree = ast.parse(source)
        self.mutants: list[Mutant] = []
        self.ids: set[str] = set()

    # positions ------------------------------------------------------------
    def offset(self, lineno: int, col_bytes: int) -> int:
        line = self.lines[lineno - 1]
        return self.starts[lineno - 1] + len(line.encode("utf-8")[:col_bytes].decode("utf-8", "replace"))

    def span(self, node: ast.AST) -> tuple[int, int]:
        return self.offset(node.lineno, node.col_offset), self.offset(node.end_lineno, node.end_col_offset)

    def position(self, offset: int) -> tuple[int, int]:
        index = bisect.bisect_right(self.starts, offset) - 1
        return index + 1, offset - self.starts[index] + 1

    # skipping -------------------------------------------------------------
    @staticmethod
    def is_logging_call(node: ast.AST) -> bool:
        return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOG_METHODS and bool(LOGGER_NAMES.search(ast.unparse(node.func.value))))

    def skipped(self, node: ast.AST) -> bool:
        if isinstance(node, (ast.JoinedStr, ast.Raise)):       # messages
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in SKIP_FUNCTIONS:
            return True
        if self.is_logging_call(node):
            return True
        if isinstance(node, ast.If):
            test = ast.unparse(node.test)
            if test in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or re.fullmatch(r"__name__ == ['\"]__main__['\"]", test):
                return True
        return False

    @staticmethod
    def annotations(node: ast.AST) -> list[ast.AST]:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return [node.returns] if node.returns else []
        if isinstance(node, ast.arg):
            return [node.annotation] if node.annotation else []
        if isinstance(node, ast.AnnAssign):
            return [node.annotation]
        return []

    def walk(self, node: ast.AST, skip: bool = False) -> None:
        skip = skip or self.skipped(node)
        if not skip:
            self.mutate(node)
        no = {id(a) for a in self.annotations(node)}
        for child in ast.iter_child_nodes(node):
            self.walk(child, skip or id(child) in no)

    # recording ------------------------------------------------------------
    def add(self, at: int, op: str, family: str, edits: list[tuple[int, int, str]]) -> None:
        mutated = Mutant("", self.module, 0, 0, op, family, tuple(edits), "", "").apply(self.source)
        if mutated == self.source:
            return
        try:
            ast.parse(mutated)
        except SyntaxError:
            return
        line, col = self.position(at)
        ident = f"{module_key(self.module)}:{line}:{col}:{op}"
        n = 2
        while ident in self.ids:
            ident = f"{module_key(self.module)}:{line}:{col}:{op}#{n}"
            n += 1
        self.ids.add(ident)
        original = self.lines[line - 1].strip()
        if op.endswith("-drop") and family != "not":       # show what went
            shown = f"pass  # was: {original}"
        else:
            new_lines = mutated.splitlines()
            shown = new_lines[line - 1].strip() if line <= len(new_lines) else ""
        self.mutants.append(Mutant(ident, self.module, line, col, op, family, tuple(edits), original, shown))

    def mutate(self, node: ast.AST) -> None:
        src = self.source
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            for i, op in enumerate(node.ops):
                name = CMP_NAMES[type(op)]
                lo, hi = self.span(operands[i])[1], self.span(operands[i + 1])[0]
                found = re.search(CMP_TOKEN[name], src[lo:hi])
                if found:
                    new, text = CMP_FLIP[name]
                    start, end = lo + found.start(), lo + found.end()
                    self.add(start, f"{name}-{new}", "cmp", [(start, end, text)])
        elif isinstance(node, ast.BoolOp):
            word = "and" if isinstance(node.op, ast.And) else "or"
            other = "or" if word == "and" else "and"
            edits = []
            for left, right in zip(node.values, node.values[1:]):
                lo, hi = self.span(left)[1], self.span(right)[0]
                found = re.search(rf"\b{word}\b", src[lo:hi])
                if found:
                    edits.append((lo + found.start(), lo + found.end(), other))
            if edits and len(edits) == len(node.values) - 1:
                self.add(self.span(node)[0], f"{word}-{other}", "bool", edits)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            start = self.span(node)[0]
            found = re.match(r"not\s*", src[start:])
            if found:
                self.add(start, "not-drop", "not", [(start, start + found.end(), "")])
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            start, end = self.span(node)
            self.add(start, f"{str(node.value).lower()}-{str(not node.value).lower()}", "const",
                     [(start, end, str(not node.value))])
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
            start, end = self.span(node)
            value = node.value
            if type(value) is int:
                new = 1 if value == 0 else 0 if value == 1 else value - 1
            else:
                new = 1.0 if value == 0 else 0.0
            self.add(start, "num", "num", [(start, end, repr(new))])
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and not self.is_logging_call(node.value):
            start, end = self.span(node)
            self.add(start, "call-drop", "call", [(start, end, "pass")])
        elif isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            start, end = self.span(node.value)
            self.add(start, "return-none", "return", [(start, end, "None")])
        elif isinstance(node, (ast.Continue, ast.Break)):
            start, end = self.span(node)
            word = "continue" if isinstance(node, ast.Continue) else "break"
            self.add(start, f"{word}-drop", "loop", [(start, end, "pass")])
        elif isinstance(node, ast.If):
            start, end = self.span(node.test)
            for value in (True, False):
                if not (isinstance(node.test, ast.Constant) and node.test.value is value):
                    self.add(start, f"if-{str(value).lower()}", "if", [(start, end, str(value))])


def find_js_mutants(module: str, source: str) -> list[Mutant]:
    """The same operators in a JavaScript file (see js_mutants.py)."""
    found = list(js_mutants.find(source))
    valid = js_mutants.parses(source, [edits for _, _, _, edits in found])
    lines = source.splitlines()
    starts = [0]
    for line in source.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    mutants, ids = [], set()
    for (at, op, family, edits), ok in zip(found, valid):
        if not ok:
            continue
        index = bisect.bisect_right(starts, at) - 1
        line, col = index + 1, at - starts[index] + 1
        ident = f"{module_key(module)}:{line}:{col}:{op}"
        n = 2
        while ident in ids:
            ident = f"{module_key(module)}:{line}:{col}:{op}#{n}"
            n += 1
        ids.add(ident)
        mutated = Mutant("", module, 0, 0, op, family, tuple(edits), "", "").apply(source).splitlines()
        shown = mutated[line - 1].strip() if line <= len(mutated) else ""
        if op.endswith("-drop") and family != "not":
            shown = f"/* was: {lines[line - 1].strip()} */"
        mutants.append(Mutant(ident, module, line, col, op, family, tuple(edits), lines[line - 1].strip(), shown))
    return sorted(mutants, key=lambda m: (m.line, m.col, m.op, m.id))


def find_mutants(module: str, source: str) -> list[Mutant]:
    if module.endswith(".js"):
        return find_js_mutants(module, source)
    finder = _Finder(module, source)
    finder.walk(finder.tree)
    return sorted(finder.mutants, key=lambda m: (m.line, m.col, m.op, m.id))


def default_modules() -> list[str]:
    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT / PACKAGE).as_posix()
        if rel not in EXCLUDED_MODULES and "static" not in path.relative_to(ROOT / PACKAGE).parts:
            found.append(f"{PACKAGE}/{rel}")
    return found


def normalize_module(name: str) -> str:
    """hub, hub.py, comet/hub.py, comet.hub, backends/redis -> comet/...py"""
    name = name.strip().replace("\\", "/")
    if name.endswith(".js"):
        module = module_from_key(Path(name).name)
        if not (ROOT / module).is_file():
            raise SystemExit(f"no such script: {module}")
        return module
    if name.endswith(".py"):
        name = name[:-3]
    if "/" not in name and "." in name:
        name = name.replace(".", "/")
    if name.startswith(PACKAGE + "/"):
        name = name[len(PACKAGE) + 1:]
    module = module_from_key(name)
    if not (ROOT / module).is_file():
        raise SystemExit(f"no such module: {module}")
    return module


def all_mutants(modules: Iterable[str]) -> list[Mutant]:
    mutants = []
    for module in modules:
        mutants += find_mutants(module, (ROOT / module).read_text(encoding="utf-8"))
    return mutants


def sample(mutants: list[Mutant], n: int, seed: int) -> list[Mutant]:
    """*n* mutants spread over the modules: each module gets a share in
    proportion to its mutants (at least one when n allows), picked at random
    with a seed derived from *seed* and the module's name, so adding a module
    does not change the picks in the others."""
    if n >= len(mutants):
        return list(mutants)
    by_module: dict[str, list[Mutant]] = {}
    for m in mutants:
        by_module.setdefault(m.module, []).append(m)
    modules = sorted(by_module)
    if n < len(modules):     # fewer picks than modules: draw the modules, one mutant each
        chosen = set(random.Random(f"{seed}:modules").sample(modules, n))
        share = {mod: int(mod in chosen) for mod in modules}
    else:                    # one each, the rest in proportion (largest remainders)
        share = {mod: 1 for mod in modules}
        left = n - len(modules)
        total = sum(len(by_module[mod]) - 1 for mod in modules)
        exact = {mod: left * (len(by_module[mod]) - 1) / total for mod in modules}
        for mod in modules:
            share[mod] += int(exact[mod])
        rest = n - sum(share.values())
        for mod in sorted(modules, key=lambda mod: (int(exact[mod]) - exact[mod], mod))[:rest]:
            share[mod] += 1
    picked = []
    for mod in modules:
        rng = random.Random(f"{seed}:{mod}")
        picked += rng.sample(by_module[mod], min(share[mod], len(by_module[mod])))
    order = {m.id: i for i, m in enumerate(mutants)}
    return sorted(picked, key=lambda m: order[m.id])


def diff(mutant: Mutant) -> str:
    source = (ROOT / mutant.module).read_text(encoding="utf-8")
    return "".join(difflib.unified_diff(source.splitlines(keepends=True), mutant.apply(source).splitlines(keepends=True),
                                        f"a/{mutant.module}", f"b/{mutant.module}"))


# --------------------------------------------------------------------------
# Test files per module
# --------------------------------------------------------------------------

def fallback_tests() -> list[str]:
    found = [p.relative_to(ROOT).as_posix() for p in sorted(ROOT.glob("tests/test_*.py"))]
    found += [p.relative_to(ROOT).as_posix() for p in sorted(ROOT.glob("docs/examples/test_*.py"))]
    return [f for f in found if f not in FALLBACK_EXCLUDE]


def covering_tests(module: str, browser: bool) -> list[str]:
    key = Path(module).relative_to(PACKAGE).as_posix()
    files = [f for f in TESTS_FOR.get(key, []) if (ROOT / f.split("::")[0]).exists()]
    if module.endswith(".js"):      # its judges are browser tests; no fallback, no doctests
        return files
    if not files:
        files = fallback_tests()
    if ">>>" in (ROOT / module).read_text(encoding="utf-8"):
        files = [module, *files]         # its doctests (pyproject turns on --doctest-modules)
    if browser:
        files += [f for f in BROWSER_TESTS if (ROOT / f).exists()]
    return list(dict.fromkeys(files))


# --------------------------------------------------------------------------
# Private copies and processes
# --------------------------------------------------------------------------

COPY_IGNORE = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", "_build"}


def repo_files() -> list[str]:
    """The files a copy holds: the working tree's tracked and untracked but
    not ignored files."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             check=True).stdout
        files = [f for f in out.decode().split("\0") if f]
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*")
                 if p.is_file() and not COPY_IGNORE & set(p.relative_to(ROOT).parts)]
    tool = HERE.relative_to(ROOT).as_posix() + "/"     # this tool and its results: not needed, not hashed
    # An untracked virtualenv (.venv-lowest/ and the like, not in .gitignore)
    # is no part of the code under test: copying it is slow, and it changes
    # while someone installs into it.
    venvs = tuple(f[:-len("pyvenv.cfg")] for f in files if f.endswith("/pyvenv.cfg"))
    return sorted(f for f in files if (ROOT / f).is_file() and not f.startswith(tool)
                  and not f.startswith(venvs) and not COPY_IGNORE & set(f.split("/")))


def tree_hash(files: list[str]) -> str:
    digest = hashlib.sha256(sys.version.encode())
    for f in files:
        digest.update(f.encode() + b"\0" + (ROOT / f).read_bytes() + b"\0")
    return digest.hexdigest()


def make_copy(files: list[str]) -> Path:
    copy = Path(tempfile.mkdtemp(prefix="comet-mutant-"))
    assert ROOT not in copy.parents and copy != ROOT
    for f in files:
        target = copy / f
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy2(ROOT / f, target, follow_symlinks=False)
        except FileNotFoundError:       # removed since the listing (someone else's work in progress)
            pass
    return copy


def write_mutant(copy: Path, mutant: Mutant) -> None:
    target = (copy / mutant.module).resolve()
    if copy.resolve() not in target.parents or ROOT in target.parents:
        raise RuntimeError(f"refusing to write a mutant outside the private copy: {target}")
    source = (ROOT / mutant.module).read_text(encoding="utf-8")
    target.write_text(mutant.apply(source), encoding="utf-8")


class Processes:
    """Every pytest runs in its own process group (killed on timeout and
    after it ends); this process is a child subreaper (Linux), so servers that
    leave the group (setsid, daemons, browsers) are reparented here and
    killed too: those carrying the run's marker in their environment, or any
    of them once nothing else runs."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, subprocess.Popen] = {}
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.subreaper = libc.prctl(36, 1, 0, 0, 0) == 0     # PR_SET_CHILD_SUBREAPER
        except (OSError, AttributeError):
            self.subreaper = False

    def run(self, argv: list[str], cwd: Path, env: dict[str, str], timeout: float, log: Path,
            marker: str) -> tuple[int | None, bool]:
        """(return code, timed out); the return code is None on a timeout."""
        with open(log, "wb") as out, self.lock:
            proc = subprocess.Popen(argv, cwd=cwd, env={**env, "COMET_MUTATION_RUN": marker}, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.active[proc.pid] = proc
        try:
            try:
                return proc.wait(timeout), False
            except subprocess.TimeoutExpired:
                self.stop(proc)
                return None, True
            except BaseException:       # interrupted: let pytest tear its servers down first
                self.stop(proc, grace=5.0)
                raise
        finally:
            self.kill_group(proc.pid)
            with self.lock:
                del self.active[proc.pid]
            self.reap(marker)

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        """SIGINT (pytest tears its fixtures down), then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    @staticmethod
    def kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def children(self) -> list[int]:
        me, found = os.getpid(), []
        for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
            if not entry.isdigit():
                continue
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) == me:
                found.append(int(entry))
        return found

    def reap(self, marker: str | None) -> None:
        """Kill and reap orphans of finished runs (marker None: any orphan)."""
        if not self.subreaper:
            return
        for _ in range(20):
            with self.lock:
                alone = not self.active
                orphans = [pid for pid in self.children() if pid not in self.active]
                mine = []
                for pid in orphans:
                    try:
                        environ = Path(f"/proc/{pid}/environ").read_bytes()
                    except OSError:
                        environ = b""
                    if alone or marker is None or f"COMET_MUTATION_RUN={marker}".encode() in environ.split(b"\0"):
                        mine.append(pid)
                for pid in mine:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    try:
                        os.waitpid(pid, 0)
                    except ChildProcessError:
                        pass
            if not mine:
                return
            time.sleep(0.1)       # their own children are reparented here next

    def stop_all(self) -> None:
        with self.lock:
            procs = list(self.active.values())
        for proc in procs:
            self.stop(proc, grace=5.0)
            self.kill_group(proc.pid)
        self.reap(None)


PROCESSES: Processes | None = None
STOPPING = threading.Event()


def pytest_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"     # a stale .pyc must never stand in for a mutant
    env["COLUMNS"] = "200"                   # room for the failing test's message in the summary
    return env


def pytest_argv(files: list[str], per_test_timeout: float, extra: list[str] = ()) -> list[str]:
    return [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--timeout={per_test_timeout:g}", *extra,
            *files]


def check_import(copy: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import comet; print(comet.__file__)"], cwd=copy, env=pytest_env(copy),
                         capture_output=True, text=True, timeout=60)
    where = Path(out.stdout.strip() or "/").resolve()
    if copy.resolve() not in where.parents:
        raise SystemExit(f"comet imports from {where}, not from the private copy {copy}:\n{out.stderr}")


# --------------------------------------------------------------------------
# Baseline: the unmutated test files must pass; their timings set the limits
# --------------------------------------------------------------------------

BASELINE_CACHE = Path(tempfile.gettempdir()) / "comet-mutation-baseline.json"


def baseline(files: list[str], needed: list[str], per_test_timeout: float) -> dict[str, float]:
    """Seconds per test file on the unmutated tree (cached per tree hash)."""
    key = tree_hash(files)
    try:
        cache = json.loads(BASELINE_CACHE.read_text())
    except (OSError, ValueError):
        cache = {}
    durations: dict[str, float] = cache.get("durations", {}) if cache.get("key") == key else {}
    missing = [f for f in needed if f not in durations]
    if not missing:
        return durations
    print(f"baseline: unmutated run of {len(missing)} test file(s): {' '.join(missing)}", flush=True)
    copy = make_copy(files)
    try:
        check_import(copy)
        xml = copy / ".mutation-baseline.xml"
        started = time.monotonic()
        rc, timed_out = PROCESSES.run(
            pytest_argv(missing, per_test_timeout, [f"--junitxml={xml}", "-o", "junit_family=xunit1"]), copy,
            pytest_env(copy), 3600, copy / ".mutation-baseline.log", "baseline")
        elapsed = time.monotonic() - started
        log = (copy / ".mutation-baseline.log").read_text(errors="replace")
        if rc != 0:
            tail = "\n".join(log.splitlines()[-40:])
            raise SystemExit(f"baseline failed (rc={rc}, timed out={timed_out}): the unmutated tests must pass first\n{tail}")
        found = {f: 0.0 for f in missing}
        for case in ElementTree.parse(xml).getroot().iter("testcase"):
            path = case.get("file", "")
            owner = next((f for f in missing if path == f.split("::")[0] or path.startswith(f.rstrip("/") + "/")), None)
            if owner:
                found[owner] += float(case.get("time") or 0)
        print(f"baseline: passed in {elapsed:.1f}s: " + ", ".join(f"{f} {s:.1f}s" for f, s in found.items()), flush=True)
        durations.update(found)
        BASELINE_CACHE.write_text(json.dumps({"key": key, "durations": durations}, indent=1))
        return durations
    finally:
        shutil.rmtree(copy, ignore_errors=True)


# --------------------------------------------------------------------------
# Running mutants
# --------------------------------------------------------------------------

FAILED_LINE = re.compile(r"^(FAILED|ERROR) (.+)$", re.M)
PYTEST_TIMEOUT = re.compile(r"Timeout \(>[\d.]+s\) from pytest-timeout|\+{5,} Timeout \+{5,}")


@dataclasses.dataclass
class Settings:
    browser: bool
    per_test_timeout: float
    timeout_factor: float
    min_timeout: float
    fixed_timeout: float | None
    durations: dict[str, float]


def run_mutant(mutant: Mutant, files: list[str], settings: Settings) -> dict:
    tests = covering_tests(mutant.module, settings.browser)
    tests.sort(key=lambda f: settings.durations.get(f, 1e9))    # fastest first: -x stops at the first failure
    if settings.fixed_timeout:
        limit = settings.fixed_timeout
    else:
        limit = max(settings.min_timeout, settings.timeout_factor * sum(settings.durations.get(f, 60.0) for f in tests) + 30)
    copy = make_copy(files)
    started = time.monotonic()
    try:
        write_mutant(copy, mutant)
        log = copy / ".mutation.log"
        rc, timed_out = PROCESSES.run(pytest_argv(tests, settings.per_test_timeout, ["-x"]), copy, pytest_env(copy),
                                      limit, log, hashlib.sha1(f"{mutant.id}{time.time()}".encode()).hexdigest()[:16])
        seconds = time.monotonic() - started
        output = log.read_text(errors="replace")
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    failed = FAILED_LINE.search(output)
    if timed_out:
        status, detail = "timeout", f"no result after {limit:.0f}s"
    elif rc == 0:
        status, detail = "survived", ""
    elif rc in (4, 5):          # usage error / nothing collected: a problem of the tool, not a kill
        status, detail = "error", (output.strip().splitlines() or [""])[-1][:300]
    else:
        status = "timeout" if PYTEST_TIMEOUT.search(output) else "killed"
        lines = [line for line in output.splitlines() if line.strip()]
        detail = (failed.group(2) if failed else (lines[-1] if lines else f"rc={rc}"))[:300]
    return {"id": mutant.id, "module": mutant.module, "line": mutant.line, "col": mutant.col, "operator": mutant.op,
            "family": mutant.family, "original": mutant.original, "mutated": mutant.mutated, "status": status,
            "seconds": round(seconds, 1), "limit": round(limit), "rc": rc, "tests": tests, "detail": detail}


# --------------------------------------------------------------------------
# Results and report
# --------------------------------------------------------------------------

def load_equivalent(path: Path) -> dict[str, str]:
    found = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                ident, _, reason = line.partition(" ")
                found[ident] = reason.strip()
    return found


def load_results(path: Path) -> tuple[dict, list[dict]]:
    """(the run's metadata, one record per mutant) from the JSON-lines file."""
    meta, results = {}, []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                if "_meta" in record:
                    meta = record["_meta"]
                else:
                    results.append(record)
    return meta, results


def write_results(path: Path, meta: dict, results: list[dict]) -> None:
    lines = [json.dumps({"_meta": meta}, sort_keys=True)] + [json.dumps(r, sort_keys=True) for r in results]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def score(results: list[dict], equivalent: dict[str, str]) -> dict:
    count = {s: 0 for s in ("killed", "timeout", "survived", "equivalent", "error")}
    for r in results:
        if r["status"] == "survived" and r["id"] in equivalent:
            count["equivalent"] += 1
        else:
            count[r["status"]] += 1
    counted = count["killed"] + count["timeout"] + count["survived"]
    count["total"] = len(results)
    count["score"] = 100.0 * (count["killed"] + count["timeout"]) / counted if counted else 0.0
    return count


def summary_line(count: dict) -> str:
    return (f"score {count['score']:.1f}%: {count['killed'] + count['timeout']} killed "
            f"({count['timeout']} by timeout) of {count['killed'] + count['timeout'] + count['survived']} "
            f"({count['total']} mutants, {count['equivalent']} equivalent, {count['error']} errors)")


def git_describe() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", f":(exclude){HERE.relative_to(ROOT).as_posix()}"],
                               cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def md(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'")


def write_report(path: Path, results: list[dict], equivalent: dict[str, str], meta: dict) -> None:
    count = score(results, equivalent)
    out = ["# Mutation testing results", "",
           "Generated by `tests/mutation/mutate.py` (see README.md here); do not edit by hand.", "",
           f"- command: `{meta.get('command', '')}`",
           f"- tree: {meta.get('commit', '')}, {meta.get('date', '')}",
           *(f"- re-run: `{r}`" for r in meta.get("reruns", [])),
           f"- **{summary_line(count)}**", ""]
    families: dict[str, list[int]] = {}
    for r in results:
        row = families.setdefault(r["family"], [0, 0])
        row[1] += 1
        row[0] += r["status"] in ("killed", "timeout") or r["id"] in equivalent
    out += ["| operator | killed (or equivalent) / mutants |", "|---|---|"]
    out += [f"| {FAMILIES.get(f, f)} | {k} / {n} |" for f, (k, n) in sorted(families.items())]
    out += ["", "| id | module | line | operator | mutated line | result | s | killed by |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        status = "equivalent" if r["status"] == "survived" and r["id"] in equivalent else r["status"]
        shown = f"**{status}**" if status in ("survived", "error") else status
        out.append(f"| `{r['id']}` | {r['module']} | {r['line']} | {r['operator']} | `{md(r['mutated'])}` | {shown} "
                   f"| {r['seconds']:.0f} | {md(r['detail']) if status != 'survived' else ''} |")
    survivors = [r for r in results if r["status"] == "survived" and r["id"] not in equivalent]
    if survivors:
        out += ["", "## Survivors", "",
                "Each is a gap in the tests, or an equivalent mutant to list in equivalent.txt with its reason.", ""]
        out += [f"- `{r['id']}`: `{md(r['original'])}` -> `{md(r['mutated'])}` (ran {', '.join(r['tests'])})"
                for r in survivors]
    ran = {r["id"]: r for r in results}
    listed = [(i, why) for i, why in equivalent.items() if i in ran]
    if listed:
        out += ["", "## Equivalent mutants (left out of the score)", ""]
        for ident, why in listed:
            note = "" if ran[ident]["status"] == "survived" else f" (but it was {ran[ident]['status']}: drop the line)"
            out.append(f"- `{ident}`: `{md(ran[ident]['mutated'])}`: {why}{note}")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("modules", nargs="*", help="modules to mutate (hub, backends/redis, comet/stream.py...); "
                                              "default: every module in comet/ but " + ", ".join(sorted(EXCLUDED_MODULES)))
    p.add_argument("--sample", type=int, metavar="N", help="run N mutants spread over the modules")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    p.add_argument("--only", action="append", metavar="ID", help="run this mutant (repeatable); merges into the results")
    p.add_argument("--show", metavar="ID", help="print this mutant's diff and exit")
    p.add_argument("--list", action="store_true", help="list the mutants (after --sample) and exit")
    p.add_argument("--report", action="store_true", help="rewrite the markdown report from the results file and exit")
    p.add_argument("--resume", action="store_true", help="keep the results file and skip mutants already in it")
    p.add_argument("--browser", action="store_true", help="also run tests/browser for every mutant")
    p.add_argument("--jobs", "-j", type=int, default=1, help="mutants at a time (default 1)")
    p.add_argument("--per-test-timeout", type=float, default=60, help="pytest-timeout per test, s (default 60)")
    p.add_argument("--timeout-factor", type=float, default=3.0,
                   help="a mutant's limit is factor x the baseline time of its tests + 30 s (default 3)")
    p.add_argument("--min-timeout", type=float, default=60, help="lowest per-mutant limit, s (default 60)")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run; use --timeout as every limit")
    p.add_argument("--timeout", type=float, default=600, help="per-mutant limit with --no-baseline, s (default 600)")
    p.add_argument("--results", type=Path, default=HERE / "results.jsonl", help="JSON-lines results (default %(default)s)")
    p.add_argument("--equivalent", type=Path, default=HERE / "equivalent.txt", help="equivalent mutants: id reason")
    return p.parse_args(argv)


def report_path(results: Path) -> Path:
    return results.with_suffix(".md")


def main(argv: list[str] | None = None) -> int:
    global PROCESSES
    args = parse_args(argv)
    equivalent = load_equivalent(args.equivalent)
    if args.report:
        meta, results = load_results(args.results)
        write_report(report_path(args.results), results, equivalent, meta)
        print(summary_line(score(results, equivalent)))
        return 0
    wanted = args.only or ([args.show] if args.show else [])
    if wanted:
        modules = sorted({normalize_module(i.split(":", 1)[0]) for i in wanted})
    else:
        modules = [normalize_module(m) for m in args.modules] if args.modules else default_modules()
    mutants = every = all_mutants(modules)
    if wanted:
        known = {m.id: m for m in mutants}
        unknown = [i for i in wanted if i not in known]
        if unknown:
            raise SystemExit(f"no such mutant: {', '.join(unknown)} (the source changed? see --list)")
        mutants = [known[i] for i in wanted]
    if args.show:
        print(diff(mutants[0]), end="")
        return 0
    if args.sample and not wanted:
        mutants = sample(mutants, args.sample, args.seed)
    if args.list:
        for m in mutants:
            print(f"{m.id:40} {m.mutated}")
        per: dict[str, int] = {}
        for m in mutants:
            per[m.module] = per.get(m.module, 0) + 1
        print(f"{len(mutants)} mutants: " + ", ".join(f"{module_key(k)} {v}" for k, v in per.items()))
        return 0

    old_meta, previous = load_results(args.results) if (args.only or args.resume) else ({}, [])
    if args.resume:
        done = {r["id"] for r in previous}
        mutants = [m for m in mutants if m.id not in done]
    results = {r["id"]: r for r in previous}
    order = [r["id"] for r in previous] + [m.id for m in mutants if m.id not in results]
    command = " ".join(["tests/mutation/mutate.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "commit": git_describe(), "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    if args.only and old_meta:   # a re-run of some mutants of an earlier run
        meta = {**old_meta, "reruns": [*old_meta.get("reruns", []), f"{command} ({meta['commit']}, {meta['date']})"]}

    PROCESSES = Processes()

    def on_term(signum, frame):
        raise KeyboardInterrupt

    previous_term = signal.signal(signal.SIGTERM, on_term)
    files = repo_files()
    write_lock = threading.Lock()
    started = time.monotonic()
    try:
        needed = sorted({f for m in mutants for f in covering_tests(m.module, args.browser)})
        durations = {} if args.no_baseline else baseline(files, needed, args.per_test_timeout)
        settings = Settings(args.browser, args.per_test_timeout, args.timeout_factor, args.min_timeout,
                            args.timeout if args.no_baseline else None, durations)
        print(f"running {len(mutants)} mutant(s), {args.jobs} at a time", flush=True)
        if not (args.only or args.resume):
            write_results(args.results, meta, [])
        done = [0]

        def one(mutant: Mutant) -> None:
            if STOPPING.is_set():
                return
            result = run_mutant(mutant, files, settings)
            if STOPPING.is_set():       # cut short by an interrupt: not a result
                return
            with write_lock:
                results[mutant.id] = result
                done[0] += 1
                if result["status"] == "survived" and mutant.id in equivalent:
                    result_status = "equivalent"
                else:
                    result_status = result["status"]
                print(f"[{done[0]}/{len(mutants)}] {result_status:10} {result['seconds']:6.1f}s  {mutant.id:34} "
                      f"{mutant.mutated[:60]}" + (f"  <- {result['detail'][:90]}" if result_status in ("killed", "timeout", "error") else ""),
                      flush=True)
                write_results(args.results, meta, [results[i] for i in order if i in results])

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(one, m) for m in mutants]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                STOPPING.set()
                for future in futures:
                    future.cancel()
                PROCESSES.stop_all()
                raise
    except KeyboardInterrupt:
        print("interrupted: processes stopped, partial results kept", file=sys.stderr)
        return 130
    finally:
        PROCESSES.stop_all()
        signal.signal(signal.SIGTERM, previous_term)
        final = [results[i] for i in order if i in results]
        if final:
            write_results(args.results, meta, final)
            write_report(report_path(args.results), final, equivalent, meta)
    final = [results[i] for i in order if i in results]
    count = score(final, equivalent)
    print(f"{summary_line(count)} in {time.monotonic() - started:.0f}s")
    survivors = [r["id"] for r in final if r["status"] == "survived" and r["id"] not in equivalent]
    if survivors:
        print("survivors (see --show ID): " + " ".join(survivors))
    stale = [i for i in equivalent if i not in {m.id for m in every}]
    if stale and not args.modules and not wanted:
        print(f"equivalent.txt names mutants that no longer exist (the source moved): {' '.join(stale)}")
    where = args.results.resolve()
    print(f"results: {where.relative_to(ROOT) if ROOT in where.parents else where}, {report_path(where).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
