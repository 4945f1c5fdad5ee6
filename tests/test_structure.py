"""The package keeps its walls: checked from the source with ``ast``, no
server started.

* No import circle among comet's modules: every ``import`` counts, those
  inside functions and under ``if TYPE_CHECKING:`` included (a lazy or
  type-only import is still a dependency a reader has to follow).
* No module over 800 lines, no class over 400.
* ``docs/tests-by-module.md``, the index from each module to the tests
  that exercise it, names every module and every test file, and holds the
  mutation tool's map (``TESTS_FOR`` in ``tests/mutation/mutate.py``).
* ``docs/concurrency.md`` names every lock, condition, event and thread
  the package keeps, and its numbered invariants and the code's ``#
  invariant In`` markers match both ways.
* No private name of one comet module used in another: no ``from .x import
  _name``, no ``module._name``, and no ``obj._name`` where ``_name`` is
  defined nowhere in the module that uses it (a heuristic: a name the module
  defines itself is taken to be its own). :mod:`comet.internals` is where
  cheroot's and CherryPy's private names are touched; the other modules use
  the names it exports.

``KNOWN`` lists the violations left when the check was written, while the
big modules were being split: the check fails on any violation not in it,
so nothing new creeps in, and prints the entries that no longer occur, so
the list can be shrunk (delete them).
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "comet"

MAX_MODULE_LINES = 800
MAX_CLASS_LINES = 400
#: Where server-private names may be touched (cheroot's, CherryPy's).
INTERNALS = "comet.internals"

#: Violations left over (see the module docstring). Delete an entry once it
#: no longer occurs; never add one to make a new violation pass.
KNOWN: set[str] = set()


# -- reading the package --------------------------------------------------------


class Module:
    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.text = path.read_text()
        self.tree = ast.parse(self.text, str(path))
        self.is_package = path.name == "__init__.py"

    def resolve(self, node: ast.ImportFrom) -> str:
        """The absolute name of the module *node* imports from."""
        if not node.level:
            return node.module or ""
        parts = self.name.split(".") if self.is_package else self.name.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        return ".".join(parts + ([node.module] if node.module else []))


def modules() -> dict[str, Module]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = Module(name, path)
    return found


def imports(module: Module, known: dict[str, Module]) -> Iterator[tuple[str, ast.stmt, str | None]]:
    """``(imported module, statement, name imported from it)`` for every
    import of a comet module anywhere in *module* (functions and
    ``TYPE_CHECKING`` blocks included); the name is ``None`` for a whole
    module."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    yield alias.name, node, None
        elif isinstance(node, ast.ImportFrom):
            source = module.resolve(node)
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    yield f"{source}.{alias.name}", node, None
                elif source in known:
                    yield source, node, alias.name


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


# -- the checks -----------------------------------------------------------------


def import_cycles(mods: dict[str, Module]) -> set[str]:
    """Every strongly connected set of modules, as ``"cycle: a, b"``. An
    import of a package a module belongs to is not counted (Python runs the
    package first anyway; ``comet/__init__`` imports the public modules)."""
    edges: dict[str, set[str]] = {name: set() for name in mods}
    for name, module in mods.items():
        for target, _, _ in imports(module, mods):
            if target != name and not name.startswith(target + "."):
                edges[name].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[str] = set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add("cycle: " + ", ".join(sorted(component)))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(mods) + 100))
    try:
        for v in sorted(mods):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def big_things(mods: dict[str, Module]) -> set[str]:
    found = set()
    for name, module in mods.items():
        if len(module.text.splitlines()) > MAX_MODULE_LINES:
            found.add(f"big module: {name}")
        for node in ast.walk(module.tree):
            if isinstance(node, ast.ClassDef) and node.end_lineno is not None \
                    and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                found.add(f"big class: {name}.{node.name}")
    return found


def _defined_in(module: Module) -> set[str]:
    """Names *module* defines or assigns itself: functions, classes,
    attributes it stores, variables, parameters, ``__slots__`` strings."""
    defined = set()
    for node in ast.walk(module.tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)):
            defined.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and is_private(node.value):
            defined.add(node.value)  # __slots__ entries, getattr/setattr names
    return defined


def private_uses(mods: dict[str, Module]) -> set[str]:
    """``"private: user -> what"`` for every private name crossing modules."""
    found = set()
    for name, module in mods.items():
        in_internals = name == INTERNALS or name.startswith(INTERNALS + ".")
        comet_aliases: dict[str, str] = {}
        other_aliases: set[str] = set()
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    bound = alias.asname or alias.name.split(".")[0]
                    if alias.name in mods and alias.asname:
                        comet_aliases[bound] = alias.name
                    elif not alias.name.startswith("comet"):
                        other_aliases.add(bound)
            elif isinstance(node, ast.ImportFrom):
                source = module.resolve(node)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if full in mods:
                        comet_aliases[alias.asname or alias.name] = full
                    elif source in mods:
                        both_internal = in_internals and source.startswith(INTERNALS)
                        if is_private(alias.name) and not both_internal:
                            found.add(f"private: {name} imports {source}.{alias.name}")
                    elif not source.startswith("comet"):
                        other_aliases.add(alias.asname or alias.name)
        defined = _defined_in(module)
        for node in ast.walk(module.tree):
            if not (isinstance(node, ast.Attribute) and is_private(node.attr)):
                continue
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if owner in comet_aliases:
                target = comet_aliases[owner]
                if target != name and not (in_internals and target.startswith(INTERNALS)):
                    found.add(f"private: {name} uses {target}.{node.attr}")
            elif owner in other_aliases or in_internals:
                continue  # a library's module (sys._getframe), or the place for server privates
            elif node.attr not in defined:
                found.add(f"private: {name} uses {ast.unparse(node)}")
    return found


def _check(kind: str, found: set[str]) -> None:
    known = {entry for entry in KNOWN if entry.startswith(kind)}
    for entry in sorted(known - found):
        print(f"KNOWN entry no longer occurs (delete it from tests/test_structure.py): {entry!r}")
    new = sorted(found - known)
    assert not new, "new structure violations:\n  " + "\n  ".join(new)


def test_no_import_circles():
    _check("cycle:", import_cycles(modules()))


def test_no_module_or_class_too_big():
    _check("big ", big_things(modules()))


def test_no_private_name_crosses_modules():
    _check("private:", private_uses(modules()))


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """Each check finds what it looks for, in a package made for it."""
    package = tmp_path / "comet"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("from .a import A\n")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n"
                                  "class A:\n" + "    x = 1\n" * 400 + "def f(b):\n    return b._secret\n")
    (package / "b.py").write_text("import sys\nfrom .a import A\nfrom .inner import _hidden\n"
                                  "def g():\n    from . import a\n    return a._private, sys._getframe\n")
    (package / "inner" / "__init__.py").write_text("_hidden = 1\n" + "\n" * 800)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mods = modules()
    assert import_cycles(mods) == {"cycle: comet.a, comet.b"}
    assert big_things(mods) == {"big class: comet.a.A", "big module: comet.inner"}
    assert private_uses(mods) == {"private: comet.a uses b._secret", "private: comet.b imports comet.inner._hidden",
                                  "private: comet.b uses comet.a._private"}


# -- the index from modules to tests (docs/tests-by-module.md) -------------------

INDEX = ROOT / "docs" / "tests-by-module.md"
ROW = re.compile(r"^\| `comet/([^`]+)` \|[^|]*\|(.*)\|\s*$", re.M)


def index_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for module, tests in ROW.findall(INDEX.read_text()):
        assert module not in rows, f"comet/{module} has two rows in {INDEX.name}"
        rows[module] = re.findall(r"`([^`]+)`", tests)
    return rows


def mutation_map() -> dict[str, list[str]]:
    spec = importlib.util.spec_from_file_location("comet_mutate", ROOT / "tests" / "mutation" / "mutate.py")
    assert spec is not None and spec.loader is not None
    mutate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mutate  # (its dataclasses look their module up)
    try:
        spec.loader.exec_module(mutate)
    finally:
        del sys.modules[spec.name]
    return {key: [f.split("::")[0] for f in files] for key, files in mutate.TESTS_FOR.items()}


def test_the_index_names_every_module_and_every_test_file():
    rows = index_rows()
    present = {p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")} | {"static/comet.js"}
    assert sorted(present - rows.keys()) == [], f"modules with no row in {INDEX.name}"
    assert sorted(rows.keys() - present) == [], f"rows in {INDEX.name} for modules that do not exist"
    named = {test for tests in rows.values() for test in tests}
    assert sorted(t for t in named if not (ROOT / t).is_file()) == [], f"files named in {INDEX.name} that do not exist"
    assert [module for module, tests in rows.items() if not tests] == [], "modules with no tests"
    every = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").glob("test_*.py")}
    assert sorted(every - named) == [], f"test files named on no row of {INDEX.name}"


def test_the_index_holds_the_mutation_tools_map():
    rows = index_rows()
    mapped = mutation_map()
    assert sorted(key for key in mapped if not (PACKAGE / key).is_file()) == [], \
        "TESTS_FOR in tests/mutation/mutate.py maps modules that do not exist"
    missing = {key: sorted(set(files) - set(rows.get(key, []))) for key, files in mapped.items()}
    assert {key: files for key, files in missing.items() if files} == {}, \
        f"files the mutation tool runs for a module, missing from its row in {INDEX.name}"


# -- the concurrency page (docs/concurrency.md) ----------------------------------

CONCURRENCY = ROOT / "docs" / "concurrency.md"
#: The test kit's own threads and locks (a proxy, servers for tests) are not comet's.
TEST_KIT = {"comet.testing", "comet.live_servers", "comet.processes", "comet.faults"}
SYNC = {"Lock", "RLock", "Condition", "Event", "Semaphore", "BoundedSemaphore", "Thread", "Timer"}
INVARIANT = re.compile(r"^\*\*(I\d+)\.\*\*", re.M)
MARKER = re.compile(r"#.*\binvariants? ((?:I\d+(?:, | and )?)+)")


def sync_objects(mods: dict[str, Module]) -> tuple[set[str], set[str]]:
    """``Class.attr`` (or ``module.NAME``) of every lock, condition, event and
    thread comet keeps, and the names (or name prefixes) of the threads it
    starts."""
    kept, threads = set(), set()

    def visit(node: ast.AST, module: str, cls: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, ast.ClassDef) else cls
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) \
                    and isinstance(child.func.value, ast.Name) and child.func.value.id == "threading" \
                    and child.func.attr == "Thread":
                for keyword in child.keywords:
                    if keyword.arg == "name" and isinstance(keyword.value, ast.Constant):
                        threads.add(str(keyword.value.value))
                    elif keyword.arg == "name" and isinstance(keyword.value, ast.JoinedStr) \
                            and isinstance(keyword.value.values[0], ast.Constant):
                        threads.add(str(keyword.value.values[0].value))
            if isinstance(child, (ast.Assign, ast.AnnAssign)) and child.value is not None:
                creates = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in SYNC
                              and isinstance(n.func.value, ast.Name) and n.func.value.id == "threading"
                              for n in ast.walk(child.value))
                targets = child.targets if isinstance(child, ast.Assign) else [child.target]
                for target in targets if creates else []:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                            and target.value.id == "self" and cls is not None:
                        kept.add(f"{cls}.{target.attr}")
                    elif isinstance(target, ast.Name) and cls is None and node is mods[module].tree:
                        kept.add(f"{module.rsplit('.', 1)[-1]}.{target.id}")
            visit(child, module, inner)

    for name, module in mods.items():
        if name not in TEST_KIT:
            visit(module.tree, name, None)
    return kept, threads


def invariant_markers(mods: dict[str, Module]) -> dict[str, list[str]]:
    """Invariant id -> the ``path:line`` of every ``# invariant In`` marker."""
    found: dict[str, list[str]] = {}
    for name, module in mods.items():
        for number, line in enumerate(module.text.splitlines(), 1):
            for group in MARKER.findall(line):
                for ident in re.findall(r"I\d+", group):
                    found.setdefault(ident, []).append(f"{module.path.relative_to(ROOT)}:{number}")
    return found


def test_the_concurrency_page_names_every_thread_and_lock():
    page = CONCURRENCY.read_text()
    kept, threads = sync_objects(modules())
    assert sorted(k for k in kept if f"`{k}`" not in page) == [], f"locks, events, threads missing from {CONCURRENCY.name}"
    assert sorted(t for t in threads if t not in page) == [], f"thread names missing from {CONCURRENCY.name}"


def test_every_invariant_is_cited_in_the_code_and_every_citation_is_on_the_page():
    defined = INVARIANT.findall(CONCURRENCY.read_text())
    assert defined and len(defined) == len(set(defined)), "invariants numbered once each"
    cited = invariant_markers(modules())
    assert sorted(set(defined) - cited.keys()) == [], "invariants no code line cites (# invariant In)"
    assert {i: at for i, at in cited.items() if i not in defined} == {}, f"markers naming no invariant of {CONCURRENCY.name}"


def test_the_concurrency_checks_can_fail(tmp_path, monkeypatch):
    package = tmp_path / "comet"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "w.py").write_text(
        "import threading\n_SHUT = threading.Lock()\n"
        "class W:\n    def __init__(self):\n        self._lock = threading.Lock()\n"
        "        threading.Thread(target=print, name=f'comet-w-{1}').start()\n"
        "        self.gone = threading.Event()  # invariant I2\n"
        "    def f(self):  # invariants I3, I4\n        pass\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    mods = modules()
    assert sync_objects(mods) == ({"w._SHUT", "W._lock", "W.gone"}, {"comet-w-"})
    assert invariant_markers(mods) == {"I2": ["comet/w.py:7"], "I3": ["comet/w.py:8"], "I4": ["comet/w.py:8"]}
