"""The mutation tool's JavaScript side finds what it should in comet.js.

tests/mutation/ is not collected (its conftest ignores it), so the parts a
mutation run relies on are checked here: the tokenizer tells regular
expressions from division, skips strings, template literals and comments,
and every mutant it offers of comet.js is valid JavaScript that differs from
the original.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "mutation"))
import js_mutants  # noqa: E402


def ops(src: str) -> list[tuple[str, str]]:
    return [(op, src[at:at + 8]) for at, op, _, _ in js_mutants.find(src)]


def test_strings_comments_templates_and_regexes_are_not_mutated() -> None:
    src = ('const a = "x === y && !z"; // if (a < 1) b();\n'
           "/* return 1; */ const r = /a<b|[/]c/g.test(s);\n"
           "const t = `${a === 1} && ${'}'}`;\n")
    assert ops(src) == []


def test_division_is_not_a_regular_expression() -> None:
    found = {op for op, _ in ops("const q = (a) / 2 / (b < 3);")}
    assert found == {"num", "lt-le"}


def test_each_operator_in_a_snippet() -> None:
    src = "function f(x) { if (x >= 10 || !x) { g(x).h(); return x.y; } while (1) { break; } return true; }"
    found = sorted(op for op, _ in ops(src))
    assert found == sorted(["if-true", "if-false", "ge-gt", "num", "or-and", "not-drop", "call-drop",
                            "return-none", "num", "break-drop", "return-none", "true-false"])


def test_a_statement_call_is_dropped_whole_and_console_is_left() -> None:
    src = "a(); b.c(1)(2); console.log(x); d.e(f(g), [h]).k();"
    drops = [src[at:edits[0][1]] for at, op, _, edits in js_mutants.find(src) if op == "call-drop"]
    assert drops == ["a()", "d.e(f(g), [h]).k()"]


@pytest.mark.skipif(js_mutants.node_binary() is None, reason="no node to parse the mutants with")
def test_every_mutant_of_comet_js_parses_and_changes_it() -> None:
    import mutate

    module = "comet/static/comet.js"
    source = (ROOT / module).read_text(encoding="utf-8")
    mutants = mutate.find_mutants(module, source)
    assert len(mutants) > 500
    assert len({m.id for m in mutants}) == len(mutants)
    assert all(m.apply(source) != source for m in mutants)
    assert all(js_mutants.parses(source, [list(m.edits) for m in mutants]))
    assert js_mutants.parses(source, [[(0, 0, "}")]]) == [False]
    assert mutate.covering_tests(module, browser=False)[0] == "tests/browser/test_comet_js.py"
