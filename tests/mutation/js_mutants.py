"""Mutants of comet.js: the operators of mutate.py, found in JavaScript tokens.

Python has no JavaScript parser in its standard library, and the project has
no npm dependencies; comet.js is our own dependency-free ES2017 file, so a
tokenizer that knows strings, template literals, comments and regular
expression literals (by the usual rule: a ``/`` starts a regular expression
where an operand is expected) finds every operator exactly. Each mutant is
then parsed by node (the one on PATH, or the one Playwright ships), so none
that cannot run is ever offered.

    >>> src = "if (a === 1 && !b) { go(); return x + 2; }"
    >>> sorted({m[1] for m in find(src)})
    ['and-or', 'call-drop', 'eq-ne', 'if-false', 'if-true', 'not-drop', 'num', 'return-none']
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

#: (op, family, replacement) for a token's text
SWAPS = {"===": ("eq-ne", "cmp", "!=="), "!==": ("ne-eq", "cmp", "==="), "==": ("eq-ne", "cmp", "!="),
         "!=": ("ne-eq", "cmp", "=="), "<": ("lt-le", "cmp", "<="), "<=": ("le-lt", "cmp", "<"),
         ">": ("gt-ge", "cmp", ">="), ">=": ("ge-gt", "cmp", ">"), "&&": ("and-or", "bool", "||"),
         "||": ("or-and", "bool", "&&"), "true": ("true-false", "const", "false"),
         "false": ("false-true", "const", "true")}

PUNCT = sorted(""">>>= ... === !== **= <<= >>= >>> &&= ||= ??= => == != <= >= && || ?? ?. ++ -- += -= *= /= %= &= |=
^= ** << >> { } ( ) [ ] ; , < > + - * / % & | ^ ! ~ ? : = . @ #""".split(), key=len, reverse=True)
#: after these keywords an operand (so a regular expression) is expected
OPERAND_KEYWORDS = {"return", "typeof", "instanceof", "in", "of", "new", "delete", "void", "throw", "case", "do",
                    "else", "yield", "await"}
NAME = re.compile(r"[A-Za-z_$][\w$]*")
NUMBER = re.compile(r"(?:0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))n?")
#: calls whose removal no test should have to notice: the console
UNMUTATED_CALLS = re.compile(r"console\.")


class Token(tuple):   # (kind, start, end, text)
    kind = property(lambda self: self[0])
    start = property(lambda self: self[1])
    end = property(lambda self: self[2])
    text = property(lambda self: self[3])


def tokens(src: str) -> list[Token]:
    """The significant tokens of *src* (no comments, no white space)."""
    out: list[Token] = []
    i, n = 0, len(src)

    def operand_expected() -> bool:
        if not out:
            return True
        last = out[-1]
        if last.kind == "punct":
            return last.text not in (")", "]", "}")
        return last.kind == "name" and last.text in OPERAND_KEYWORDS

    while i < n:
        c = src[i]
        if c.isspace():
            i += 1
        elif src.startswith("//", i):
            j = src.find("\n", i)
            i = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            if j < 0:
                raise ValueError(f"unterminated comment at {i}")
            i = j + 2
        elif c in "'\"":
            j = i + 1
            while src[j] != c:
                j += 2 if src[j] == "\\" else 1
            out.append(Token(("str", i, j + 1, src[i:j + 1])))
            i = j + 1
        elif c == "`":
            j, depth = i + 1, 0
            while depth or src[j] != "`":
                if src[j] == "\\":
                    j += 1
                elif src.startswith("${", j):
                    depth += 1
                    j += 1
                elif depth and src[j] == "}":
                    depth -= 1
                j += 1
            out.append(Token(("str", i, j + 1, src[i:j + 1])))
            i = j + 1
        elif c == "/" and operand_expected():
            j, in_class = i + 1, False
            while in_class or src[j] != "/":
                if src[j] == "\\":
                    j += 1
                elif src[j] == "[":
                    in_class = True
                elif src[j] == "]":
                    in_class = False
                elif src[j] == "\n":
                    raise ValueError(f"unterminated regular expression at {i}")
                j += 1
            j += 1
            while j < n and (src[j].isalnum()):
                j += 1
            out.append(Token(("regex", i, j, src[i:j])))
            i = j
        elif c.isdigit() or (c == "." and i + 1 < n and src[i + 1].isdigit()):
            m = NUMBER.match(src, i)
            assert m is not None
            out.append(Token(("num", i, m.end(), m.group())))
            i = m.end()
        elif NAME.match(src, i):
            m = NAME.match(src, i)
            assert m is not None
            out.append(Token(("name", i, m.end(), m.group())))
            i = m.end()
        else:
            for p in PUNCT:
                if src.startswith(p, i):
                    out.append(Token(("punct", i, i + len(p), p)))
                    i += len(p)
                    break
            else:
                raise ValueError(f"unexpected {c!r} at {i}")
    return out


def _closing(toks: list[Token], k: int) -> int:
    """Index of the bracket closing the one at toks[k]."""
    pairs = {"(": ")", "[": "]", "{": "}"}
    depth = 0
    for j in range(k, len(toks)):
        t = toks[j].text if toks[j].kind == "punct" else ""
        if t in pairs:
            depth += 1
        elif t in pairs.values():
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced bracket at {toks[k].start}")


def _number(text: str) -> str | None:
    if not re.fullmatch(r"\d+(\.\d+)?", text):
        return None          # hex, exponents, BigInt: left alone
    if "." in text:
        return "1.0" if float(text) == 0 else "0.0"
    value = int(text)
    return "1" if value == 0 else "0" if value == 1 else str(value - 1)


def find(src: str) -> Iterator[tuple[int, str, str, list[tuple[int, int, str]]]]:
    """(offset, op, family, edits) for every mutant of *src*, unchecked."""
    toks = tokens(src)
    for k, t in enumerate(toks):
        prev = toks[k - 1] if k else None
        if t.kind in ("punct", "name") and t.text in SWAPS and not (prev and prev.text == "." and t.kind == "name"):
            op, family, new = SWAPS[t.text]
            yield t.start, op, family, [(t.start, t.end, new)]
        elif t.kind == "punct" and t.text == "!":
            yield t.start, "not-drop", "not", [(t.start, t.end, "")]
        elif t.kind == "num" and (new := _number(t.text)) is not None:
            yield t.start, "num", "num", [(t.start, t.end, new)]
        elif t.kind == "name" and t.text in ("continue", "break") and k + 1 < len(toks) and toks[k + 1].text == ";":
            yield t.start, f"{t.text}-drop", "loop", [(t.start, t.end, "")]
        elif t.kind == "name" and t.text == "return" and (prev is None or prev.text != "."):
            j, depth = k + 1, 0
            while j < len(toks) and not (depth == 0 and toks[j].text in (";", "}")):
                if toks[j].kind == "punct" and toks[j].text in "([{":
                    depth += 1
                elif toks[j].kind == "punct" and toks[j].text in ")]}":
                    depth -= 1
                j += 1
            if j > k + 1 and not (j == k + 2 and toks[k + 1].text in ("undefined", "null")):
                yield toks[k + 1].start, "return-none", "return", [(toks[k + 1].start, toks[j - 1].end, "undefined")]
        elif (t.kind == "name" and t.text == "if" and k + 1 < len(toks) and toks[k + 1].text == "("
              and (prev is None or prev.text != ".")):
            close = _closing(toks, k + 1)
            lo, hi = toks[k + 2].start, toks[close - 1].end
            for value in ("true", "false"):
                if src[lo:hi] != value:
                    yield lo, f"if-{value}", "if", [(lo, hi, value)]
        if (t.kind == "name" and (prev is None or (prev.kind == "punct" and prev.text in (";", "{", "}")))
                and t.text not in OPERAND_KEYWORDS and t.text not in ("if", "for", "while", "switch", "function",
                                                                        "const", "let", "var", "try", "class")):
            # a statement that is a call chain: a.b(c).d(e);
            j = k
            while j < len(toks) and toks[j].kind == "name":
                j += 1
                if j < len(toks) and toks[j].text in (".", "?."):
                    j += 1
                    continue
                if j < len(toks) and toks[j].text == "(":
                    j = _closing(toks, j) + 1
                    if j < len(toks) and toks[j].text in (".", "?."):
                        j += 1
                        continue
                break
            if (j < len(toks) and toks[j].text == ";" and toks[j - 1].text == ")"
                    and not UNMUTATED_CALLS.match(src[t.start:toks[j].start])):
                yield t.start, "call-drop", "call", [(t.start, toks[j - 1].end, "")]


def node_binary() -> str | None:
    """node on PATH, else the one Playwright's Python package ships."""
    found = shutil.which("node")
    if found:
        return found
    try:
        import playwright
    except ImportError:
        return None
    shipped = Path(playwright.__file__).parent / "driver" / "node"
    return str(shipped) if shipped.is_file() else None


CHECK = r"""
const fs = require("fs");
const job = JSON.parse(fs.readFileSync(0, "utf8"));
const ok = job.mutants.map((edits) => {
  let src = job.source;
  for (const [start, end, text] of edits.slice().sort((a, b) => b[0] - a[0]))
    src = src.slice(0, start) + text + src.slice(end);
  try { new Function(src); return true; } catch (e) { return false; }
});
process.stdout.write(JSON.stringify(ok));
"""


def parses(source: str, mutants: list[list[tuple[int, int, str]]]) -> list[bool]:
    """Which edit lists leave *source* valid JavaScript (all, when no node)."""
    node = node_binary()
    if node is None or not mutants:
        return [True] * len(mutants)
    out = subprocess.run([node, "-e", CHECK], input=json.dumps({"source": source, "mutants": mutants}),
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return list(json.loads(out))
