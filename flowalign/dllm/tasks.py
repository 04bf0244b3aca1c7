"""Verifiable-reward tasks for masked-diffusion LMs (issue 6).

A :class:`Task` scores a decoded completion (text up to the first EOS) against a
:class:`TaskExample`; every reward is a float in ``[0, 1]`` and a malformed completion scores 0
(rewards never raise on model output).  ``TASKS`` maps names to task classes; ``get_task(name, **kw)``
instantiates one.  Example files are JSONL with fields ``prompt``, ``answer``, optional
``reference`` (the full reference completion, used by IGPO hints) and any other fields, which land
in ``TaskExample.metadata``.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import math
import operator
import os
import re
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from flowalign.dllm.sandbox import run_python


@dataclass
class TaskExample:
    """One prompt with its verifiable answer.

    ``reference`` is the full reference completion text (what a perfect model would write);
    ``metadata`` carries task-specific fields (e.g. countdown numbers, sudoku givens, unit tests).
    """

    prompt: str
    answer: str
    reference: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


class Task:
    """Base class: ``reward(completion, example) -> float in [0, 1]`` and ``load(path)``."""

    name: str = "task"

    def reward(self, completion: str, example: TaskExample) -> float:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement reward()")

    def load(self, path: str) -> list[TaskExample]:
        """Read a JSONL file: one object per line with ``prompt`` and ``answer`` (strings or numbers)."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{self.name} task: example file {path!r} does not exist")
        out: list[TaskExample] = []
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")  # noqa: TRY004
                for key in ("prompt", "answer"):
                    if key not in obj:
                        raise ValueError(f"{path}:{lineno}: missing required field {key!r}")
                prompt, answer = obj.pop("prompt"), obj.pop("answer")
                reference = obj.pop("reference", "")
                meta = obj.pop("metadata", {})
                if not isinstance(meta, dict):
                    raise ValueError(f"{path}:{lineno}: field 'metadata' must be an object")  # noqa: TRY004
                meta = {**obj, **meta}
                out.append(TaskExample(prompt=str(prompt), answer=_as_text(answer),
                                       reference="" if reference is None else _as_text(reference),
                                       metadata=meta))
        if not out:
            raise ValueError(f"{self.name} task: example file {path!r} holds no examples")
        return out


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


# ----------------------------------------------------------------------------------------------
# addition (the quickstart)
# ----------------------------------------------------------------------------------------------
def addition_prompt(a: int, b: int, *, digits: int = 3) -> str:
    """Zero-padded fixed-width prompt, e.g. ``addition_prompt(47, 85) == "047+085="``."""
    if a < 0 or b < 0 or a >= 10**digits or b >= 10**digits:
        raise ValueError(f"operands must be in [0, 10**{digits}), got a={a}, b={b}")
    return f"{a:0{digits}d}+{b:0{digits}d}="


def addition_answer(value: int, *, digits: int = 4) -> str:
    """Zero-padded fixed-width answer, e.g. ``addition_answer(132) == "0132"``."""
    if value < 0 or value >= 10**digits:
        raise ValueError(f"answer {value} does not fit in {digits} digits")
    return f"{value:0{digits}d}"


_DIGITS = re.compile(r"[0-9]+")


class AdditionTask(Task):
    """Exact match of the integer answer: reward 1 iff the completion (stripped) is a digit string
    whose integer value equals the answer's (leading zeros ignored), else 0."""

    name = "addition"

    def reward(self, completion: str, example: TaskExample) -> float:
        text = completion.strip()
        target = example.answer.strip()
        if not _DIGITS.fullmatch(text) or not _DIGITS.fullmatch(target):
            return 0.0
        return 1.0 if int(text) == int(target) else 0.0


# ----------------------------------------------------------------------------------------------
# GSM8K-style math
# ----------------------------------------------------------------------------------------------
_NUM = r"-?(?:\$\s*)?\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?"
_HASH = re.compile(r"####\s*(" + _NUM + ")")
_ANSWER_IS = re.compile(r"answer\s+is\s*[:=]?\s*(" + _NUM + ")", re.IGNORECASE)
_ANY_NUM = re.compile(_NUM)


def _boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` (brace-balanced), in order."""
    out = []
    start = 0
    while True:
        i = text.find("\\boxed{", start)
        if i < 0:
            return out
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            return out
        out.append(text[i + len("\\boxed{") : j - 1])
        start = j


def parse_number(text: str) -> Fraction | None:
    """Parse ``"1,234"``, ``"$42"``, ``"42.0"``, ``"-3.5"``, ``"3/4"``, ``"42."`` into an exact
    Fraction; None if ``text`` is not a single number."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    s = s.removesuffix("%")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?(?:/\d+)?", s):
        return None
    try:
        if "/" in s:
            num, den = s.split("/")
            return None if Fraction(den) == 0 else Fraction(num) / Fraction(den)
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def extract_gsm8k_answer(text: str) -> str | None:
    """GSM8K answer extraction, first rule that matches wins (last occurrence within a rule):
    ``#### 42``; ``\\boxed{42}``; ``the answer is 42``; else the last number in the text."""
    hits = _HASH.findall(text)
    if hits:
        return hits[-1]
    for box in reversed(_boxed_contents(text)):
        nums = _ANY_NUM.findall(box)
        if nums:
            return nums[-1]
    hits = _ANSWER_IS.findall(text)
    if hits:
        return hits[-1]
    nums = _ANY_NUM.findall(text)
    return nums[-1] if nums else None


class GSM8KTask(Task):
    """Exact numeric answer: 1 iff the extracted completion answer equals the reference number
    (exact rational comparison after removing commas, ``$``, ``%`` and a trailing ``.``/``.0``)."""

    name = "gsm8k"

    def reward(self, completion: str, example: TaskExample) -> float:
        target_text = example.answer
        if "####" in target_text or "\\boxed" in target_text:
            target_text = extract_gsm8k_answer(target_text) or ""
        target = parse_number(target_text)
        got_text = extract_gsm8k_answer(completion)
        got = parse_number(got_text) if got_text is not None else None
        if target is None or got is None:
            return 0.0
        return 1.0 if got == target else 0.0


# ----------------------------------------------------------------------------------------------
# Countdown
# ----------------------------------------------------------------------------------------------
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_ALLOWED_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _countdown_expression(completion: str) -> str | None:
    tags = _ANSWER_TAG.findall(completion)
    text = tags[-1] if tags else completion
    lines = [ln.strip() for ln in text.strip().splitlines() if re.search(r"\d", ln)]
    if not lines:
        return None
    expr = lines[-1]
    if "=" in expr:  # "3*5+7 = 22" -> "3*5+7"
        expr = expr.split("=")[0]
    return expr.strip() or None


def evaluate_countdown(expr: str) -> tuple[Fraction, list[int]] | None:
    """Safely evaluate an arithmetic expression of integer literals with ``+ - * /`` and parentheses
    (parsed with ``ast``, never ``eval``): returns (exact value, literals used) or None if the
    expression is not of that form or divides by zero."""
    if len(expr) > 200:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError):
        return None
    used: list[int] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _ALLOWED_BINOPS:
            left, right = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ZeroDivisionError
            return _ALLOWED_BINOPS[type(node.op)](left, right)
        raise ValueError(f"disallowed syntax {type(node).__name__}")

    try:
        value = ev(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None
    return value, used


class CountdownTask(Task):
    """Countdown: the completion's expression (inside ``<answer>...</answer>`` if present, else its
    last line with a digit; a trailing ``= target`` is ignored) must use only the example's numbers,
    each at most once (all of them if ``require_all_numbers``), with ``+ - * /`` and parentheses,
    and equal the target exactly.  Reward 1 then; ``format_score`` (default 0: no partial credit)
    for a well-formed expression over valid numbers with the wrong value; 0 otherwise.

    Example metadata: ``numbers`` (list of ints) and ``target`` (int; defaults to ``answer``).
    """

    name = "countdown"

    def __init__(self, format_score: float = 0.0, require_all_numbers: bool = False) -> None:
        if not 0.0 <= format_score < 1.0:
            raise ValueError(f"format_score must be in [0, 1), got {format_score}")
        self.format_score = float(format_score)
        self.require_all_numbers = bool(require_all_numbers)

    def reward(self, completion: str, example: TaskExample) -> float:
        numbers = example.metadata.get("numbers")
        if not isinstance(numbers, list) or not all(isinstance(n, int) for n in numbers):
            raise ValueError(f"countdown example {example.prompt!r} needs metadata['numbers'] as a list of ints, "
                             f"got {numbers!r}")
        target = parse_number(str(example.metadata.get("target", example.answer)))
        if target is None:
            raise ValueError(f"countdown example {example.prompt!r} has no numeric target")
        expr = _countdown_expression(completion)
        result = evaluate_countdown(expr) if expr is not None else None
        if result is None:
            return 0.0
        value, used = result
        pool = Counter(numbers)
        if Counter(used) - pool:  # a number not given, or used too often
            return 0.0
        if self.require_all_numbers and Counter(used) != pool:
            return 0.0
        return 1.0 if value == target else self.format_score


# ----------------------------------------------------------------------------------------------
# Sudoku
# ----------------------------------------------------------------------------------------------
def parse_grid(text: str, size: int) -> list[int] | None:
    """The last ``size*size`` digits of ``text`` (separators, spaces, newlines ignored), row-major."""
    digits = [int(c) for c in text if c in "0123456789"]
    if len(digits) < size * size:
        return None
    return digits[-size * size :]


def is_valid_sudoku_solution(grid: list[int], puzzle: list[int], size: int) -> bool:
    """``grid`` solves ``puzzle`` (0 = blank): rows, columns and boxes are permutations of 1..size
    and every given is kept."""
    box = math.isqrt(size)
    if box * box != size or len(grid) != size * size or len(puzzle) != size * size:
        return False
    full = set(range(1, size + 1))
    if any(p and p != g for p, g in zip(puzzle, grid)):
        return False
    for r in range(size):
        if set(grid[r * size : (r + 1) * size]) != full:
            return False
    for c in range(size):
        if {grid[r * size + c] for r in range(size)} != full:
            return False
    for br in range(0, size, box):
        for bc in range(0, size, box):
            if {grid[(br + i) * size + bc + j] for i in range(box) for j in range(box)} != full:
                return False
    return True


class SudokuTask(Task):
    """4x4 or 9x9 Sudoku, all-or-nothing: 1 iff the last ``N*N`` digits of the completion form a
    valid solution that keeps every given.  Example metadata ``puzzle``: ``N*N`` characters,
    digits for givens and ``0``/``.``/``_`` for blanks (size inferred: 16 -> 4x4, 81 -> 9x9)."""

    name = "sudoku"

    def reward(self, completion: str, example: TaskExample) -> float:
        puzzle_text = str(example.metadata.get("puzzle", "")).strip()
        cells = [c for c in puzzle_text if c in "0123456789._"]
        if len(cells) not in (16, 81):
            raise ValueError(f"sudoku example {example.prompt!r}: metadata['puzzle'] must have 16 or 81 cells, "
                             f"got {len(cells)}")
        size = 4 if len(cells) == 16 else 9
        puzzle = [int(c) if c.isdigit() else 0 for c in cells]
        grid = parse_grid(completion, size)
        if grid is None:
            return 0.0
        return 1.0 if is_valid_sudoku_solution(grid, puzzle, size) else 0.0


# ----------------------------------------------------------------------------------------------
# code with unit tests
# ----------------------------------------------------------------------------------------------
# How a test is verified (the verdict never comes from the solution's process):
#   * the parent parses each test snippet; a *verifiable* snippet holds only import statements,
#     ``assert`` statements and bare expression statements (e.g. a call that must not raise);
#   * in every assert/expression, each minimal sub-expression that needs the solution (a name the
#     solution defines, or a call / attribute / subscript of one) is a *leaf*: ``assert f(2) == 4``
#     has the leaf ``f(2)``;
#   * one fresh sandboxed process per test loads the solution, evaluates that test's leaves (and
#     nothing else: the expected values never enter it) and prints each result as tagged JSON of
#     plain data (int, float, str, list, dict, ...; anything else becomes an opaque stand-in);
#   * the parent decodes the results into its own plain objects and evaluates the rest of the assert
#     itself (comparisons with literals) or, for anything more, in a separate sandboxed *checker*
#     process that never sees the solution.
# Whatever the solution prints, returns through exit codes or reads from its interpreter, it can only
# choose the values of its own leaves -- exactly what an (honest, possibly wrong) solution chooses by
# returning them.  Each leaf must be reported exactly once; duplicates or gaps fail the test.
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)
_LEAF_FN = "__fa_leaf__"
_MAX_RESULT_BYTES = 4_000_000
_BUILTIN_NAMES = frozenset(dir(builtins))

# Value codec, shared by the solution process (encode), the parent and the checker (decode).
_CODEC_SRC = r'''
class _Opaque:
    """Stand-in for a result that is not plain data: equal only to itself, truthy."""

    __slots__ = ("type_name",)

    def __init__(self, type_name):
        self.type_name = type_name

    def __repr__(self):
        return "<%s object>" % self.type_name


class _IterResult(list):
    """Items of an iterator the solution returned; each use of the result gets a fresh iterator."""


class _LeafFailed(Exception):
    """The solution raised (or did not report) while computing this value."""


_MAX_DEPTH = 200
_MAX_ITEMS = 100000


def _encode(x, depth=0):
    if depth > _MAX_DEPTH:
        raise ValueError("result nested too deeply")
    d = depth + 1
    if x is None:
        return ["n"]
    if x is True or x is False:
        return ["b", x is True]
    if isinstance(x, int):
        return ["i", int.__format__(x, "x")]
    if isinstance(x, float):
        return ["f", float.hex(x)]
    if isinstance(x, complex):
        return ["c", float.hex(float(x.real)), float.hex(float(x.imag))]
    if isinstance(x, str):
        return ["s", str.__str__(x)]
    if isinstance(x, bytes):
        return ["y", bytes.hex(x)]
    if isinstance(x, bytearray):
        return ["a", bytearray.hex(x)]
    if isinstance(x, list):
        return ["l", [_encode(v, d) for v in list.__iter__(x)]]
    if isinstance(x, tuple):
        return ["t", [_encode(v, d) for v in tuple.__iter__(x)]]
    if isinstance(x, frozenset):
        return ["F", [_encode(v, d) for v in frozenset.__iter__(x)]]
    if isinstance(x, set):
        return ["S", [_encode(v, d) for v in set.__iter__(x)]]
    if isinstance(x, dict):
        return ["d", [[_encode(k, d), _encode(v, d)] for k, v in dict.items(x)]]
    t = type(x)
    if getattr(t, "__module__", "") == "numpy" and getattr(x, "ndim", None) == 0 and hasattr(x, "item"):
        return _encode(x.item(), d)
    if hasattr(t, "__next__") and hasattr(t, "__iter__"):
        items = []
        for v in x:
            if len(items) >= _MAX_ITEMS:
                raise ValueError("iterator result longer than %d items" % _MAX_ITEMS)
            items.append(_encode(v, d))
        return ["g", items]
    return ["o", str(getattr(t, "__qualname__", "object"))[:200]]


def _decode(t, depth=0):
    if depth > _MAX_DEPTH + 2 or type(t) is not list or not t or type(t[0]) is not str:
        raise ValueError("malformed value")
    tag, d = t[0], depth + 1
    if tag == "n" and len(t) == 1:
        return None
    if len(t) == 2:
        v = t[1]
        if tag == "b" and type(v) is bool:
            return v
        if tag == "i" and type(v) is str:
            return int(v, 16)
        if tag == "f" and type(v) is str:
            return float.fromhex(v)
        if tag == "s" and type(v) is str:
            return v
        if tag == "y" and type(v) is str:
            return bytes.fromhex(v)
        if tag == "a" and type(v) is str:
            return bytearray.fromhex(v)
        if tag == "o" and type(v) is str:
            return _Opaque(v[:200])
        if type(v) is list:
            if tag == "l":
                return [_decode(e, d) for e in v]
            if tag == "t":
                return tuple(_decode(e, d) for e in v)
            if tag == "S":
                return {_decode(e, d) for e in v}
            if tag == "F":
                return frozenset(_decode(e, d) for e in v)
            if tag == "g":
                items = [_decode(e, d) for e in v]
                return _IterResult(items) if depth == 0 else iter(items)
            if tag == "d":
                out = {}
                for pair in v:
                    if type(pair) is not list or len(pair) != 2:
                        raise ValueError("malformed value")
                    out[_decode(pair[0], d)] = _decode(pair[1], d)
                return out
    if tag == "c" and len(t) == 3 and type(t[1]) is str and type(t[2]) is str:
        return complex(float.fromhex(t[1]), float.fromhex(t[2]))
    raise ValueError("malformed value")


def _leaf_values(reports):
    """reports[k]: ["v", encoded] | ["x", exception name] | ["m"] (missing) -> list of value-or-_LeafFailed."""
    out = []
    for r in reports:
        try:
            out.append(_decode(r[1]) if r[0] == "v" else _LeafFailed(str(r[-1])[:100]))
        except Exception as exc:
            out.append(_LeafFailed("undecodable result (%s)" % type(exc).__name__))
    return out


def _make_leaf_fn(values):
    def leaf(k):
        v = values[k]
        if isinstance(v, _LeafFailed):
            raise v
        return iter(v) if type(v) is _IterResult else v
    return leaf
'''
_codec: dict[str, Any] = {}
exec(compile(_CODEC_SRC, "<flowalign value codec>", "exec"), _codec)  # noqa: S102 - our own constant source

# The start of every script run in the solution's process: its stdin/stdout/stderr become /dev/null
# and _send(obj) writes one JSON line to a copy of the original stdout.
_CHILD_IO = r'''
import json as _json, os as _os
_out = _os.dup(1)
_null = _os.open(_os.devnull, _os.O_RDWR)
for _fd in (0, 1, 2):
    _os.dup2(_null, _fd)


def _send(obj):
    data = memoryview((_json.dumps(obj) + "\n").encode("ascii"))
    while data:
        data = data[_os.write(_out, data):]
'''

# Runs in the solution's process: loads the solution, then evaluates this test's leaves only.  The
# solution's own stdin/stdout/stderr are /dev/null; results go to a copy of the original stdout.
_LEAVES_MAIN = _CHILD_IO + r'''

def _exc_name(exc):
    try:
        return str(type(exc).__name__)[:100]
    except BaseException:
        return "Exception"


def _main():
    ns = {"__name__": "__solution__"}
    try:
        exec(compile(_SOLUTION, "solution.py", "exec"), ns)
        for src in _IMPORTS:
            exec(compile(src, "test.py", "exec"), ns)
    except BaseException as exc:
        _send({"load": "fail", "error": _exc_name(exc)})
        return
    _send({"load": "ok"})
    for k, src in enumerate(_LEAVES):
        try:
            msg = {"k": k, "v": _encode(eval(compile(src, "test.py", "eval"), ns))}
        except BaseException as exc:
            msg = {"k": k, "x": _exc_name(exc)}
        _send(msg)


_main()
'''

# Runs in a clean process without the solution: evaluates the tests given the decoded leaf values.
_CHECKER_MAIN = r'''
import builtins as _builtins, json as _json, os as _os, sys as _sys
_job = _json.loads(_sys.stdin.read())
_out = _os.dup(1)
_null = _os.open(_os.devnull, _os.O_RDWR)
for _fd in (0, 1, 2):
    _os.dup2(_null, _fd)
_verdicts = []
for _test in _job["tests"]:
    _ok = True
    try:
        _ns = {"__builtins__": _builtins, "__fa_leaf__": _make_leaf_fn(_leaf_values(_test["leaves"]))}
        for _src in _test["imports"]:
            exec(compile(_src, "test.py", "exec"), _ns)
        for _kind, _src in _test["checks"]:
            _value = eval(compile(_src, "test.py", "eval"), _ns)
            if _kind == "assert" and not _value:
                _ok = False
                break
    except BaseException:
        _ok = False
    _verdicts.append(_ok)
_data = memoryview((_job["nonce"] + " " + _json.dumps(_verdicts) + "\n").encode("ascii"))
while _data:
    _data = _data[_os.write(_out, _data):]
'''

# Only for unverifiable tests with unverified_tests="run": the old scheme, verdicts self-reported
# by the solution's own process (forgeable; documented).
_SELF_REPORT_MAIN = _CHILD_IO + r'''

def _main():
    ns = {"__name__": "__solution__"}
    try:
        exec(compile(_SOLUTION, "solution.py", "exec"), ns)
    except BaseException:
        return
    for i, src in _TESTS:
        try:
            exec(compile(src, "test_%d.py" % i, "exec"), dict(ns))
            _send({"t": i, "ok": True})
        except BaseException:
            _send({"t": i, "ok": False})


_main()
'''


class _Unverifiable(Exception):
    """A test that cannot be split into solution-side values and a solution-free check."""


def _targets(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _arg_names(args: ast.arguments) -> set[str]:
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return {a.arg for a in every if a is not None}


def _free_names(node: ast.AST) -> set[str]:
    """Names read by ``node`` that are not bound inside it (comprehension targets, lambda parameters)."""
    if isinstance(node, ast.Name):
        return {node.id} if isinstance(node.ctx, ast.Load) else set()
    if isinstance(node, ast.Lambda):
        defaults = [*node.args.defaults, *(d for d in node.args.kw_defaults if d is not None)]
        out = _free_names(node.body) - _arg_names(node.args)
        for d in defaults:
            out |= _free_names(d)
        return out
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        out = _free_names(node.generators[0].iter)
        bound: set[str] = set()
        for i, gen in enumerate(node.generators):
            if i:
                out |= _free_names(gen.iter) - bound
            bound |= _targets(gen.target)
            for cond in gen.ifs:
                out |= _free_names(cond) - bound
        for part in ([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]):
            out |= _free_names(part) - bound
        return out
    out = set()
    for child in ast.iter_child_nodes(node):
        out |= _free_names(child)
    return out


@dataclass(frozen=True)
class _SolutionNames:
    """What the solution binds at module level: ``other`` (by def/class/assignment/non-stdlib import,
    or declared ``global``) and ``stdlib`` (name -> import statement, bound only by importing the
    standard library; the checker repeats that import instead of trusting the solution's object)."""

    other: frozenset[str] = frozenset()
    stdlib: tuple[tuple[str, str], ...] = ()


def _solution_names(tree: ast.Module) -> _SolutionNames:
    other: set[str] = set()
    stdlib: dict[str, set[str]] = {}

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Global):
                other.update(child.names)
            elif isinstance(child, ast.NamedExpr) and isinstance(child.target, ast.Name):
                other.add(child.target.id)
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                if top and not isinstance(child, ast.Lambda):
                    other.add(child.name)
                visit(child, False)
                continue
            if top:
                if isinstance(child, ast.Name) and not isinstance(child.ctx, ast.Load):
                    other.add(child.id)
                elif isinstance(child, ast.ExceptHandler) and child.name:
                    other.add(child.name)
                elif isinstance(child, (ast.MatchAs, ast.MatchStar)) and child.name:
                    other.add(child.name)
                elif isinstance(child, ast.MatchMapping) and child.rest:
                    other.add(child.rest)
                elif isinstance(child, (ast.Import, ast.ImportFrom)):
                    for alias in child.names:
                        if alias.name == "*":
                            continue
                        if isinstance(child, ast.Import):
                            bound, module = alias.asname or alias.name.split(".")[0], alias.name
                            stmt = ast.unparse(ast.Import(names=[alias]))
                        else:
                            bound, module = alias.asname or alias.name, child.module or ""
                            stmt = ast.unparse(ast.ImportFrom(module=child.module, names=[alias], level=0))
                        if isinstance(child, ast.ImportFrom) and child.level:
                            other.add(bound)
                        elif module.split(".")[0] in sys.stdlib_module_names:
                            stdlib.setdefault(bound, set()).add(stmt)
                        else:
                            other.add(bound)
            visit(child, top)

    visit(tree, True)
    clean = tuple(sorted((name, next(iter(stmts))) for name, stmts in stdlib.items()
                         if len(stmts) == 1 and name not in other))
    other |= {name for name, stmts in stdlib.items() if len(stmts) > 1}
    return _SolutionNames(other=frozenset(other), stdlib=clean)


@dataclass
class _TestPlan:
    """One verifiable test: what the solution's process evaluates and what the parent/checker checks."""

    imports: list[str]  # the test's own import statements (run in both processes)
    checker_imports: list[str]  # solution stdlib imports the checks use, then the test's imports
    checks: list[tuple[str, ast.expr]]  # ("assert" | "expr", expression with leaves -> __fa_leaf__(k))
    leaves: list[str]  # leaf expressions, in order, for the solution's process
    fast: bool  # every check can be evaluated in the parent without a checker process


class _Splitter:
    def __init__(self, trusted: set[str]) -> None:
        self.trusted = trusted
        self.leaves: list[str] = []

    def _depends(self, node: ast.AST, bound: set[str]) -> bool:
        return any(n not in self.trusted and n != _LEAF_FN for n in _free_names(node) - bound)

    def _solution_object(self, arg: ast.AST, bound: set[str]) -> bool:
        """``arg`` passes a solution object itself (``map(f, xs)``, ``sorted(xs, key=k)``): then the whole
        call is evaluated with the solution, since a function cannot travel as plain data."""
        if isinstance(arg, ast.Starred):
            arg = arg.value
        return isinstance(arg, (ast.Name, ast.Attribute)) and self._depends(arg, bound)

    def split(self, node: ast.AST, bound: set[str]) -> Any:
        if not self._depends(node, bound):
            return node
        if isinstance(node, ast.NamedExpr):
            raise _Unverifiable("assignment expressions (:=) are not supported")
        is_leaf = (isinstance(node, ast.Name)
                   or (isinstance(node, ast.Call) and (self._depends(node.func, bound) or any(
                       self._solution_object(a, bound) for a in [*node.args, *(k.value for k in node.keywords)])))
                   or (isinstance(node, (ast.Attribute, ast.Subscript)) and self._depends(node.value, bound)))
        if is_leaf:
            if _free_names(node) & bound:
                raise _Unverifiable("a call into the solution uses a comprehension or lambda variable")
            self.leaves.append(ast.unparse(node))
            return ast.Call(func=ast.Name(id=_LEAF_FN, ctx=ast.Load()),
                            args=[ast.Constant(value=len(self.leaves) - 1)], keywords=[])
        if isinstance(node, ast.Lambda):
            node.args = self.split(node.args, bound)
            node.body = self.split(node.body, bound | _arg_names(node.args))
            return node
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            inner = set(bound)
            for i, gen in enumerate(node.generators):
                gen.iter = self.split(gen.iter, bound if i == 0 else inner)
                inner |= _targets(gen.target)
                gen.ifs = [self.split(c, inner) for c in gen.ifs]
            if isinstance(node, ast.DictComp):
                node.key, node.value = self.split(node.key, inner), self.split(node.value, inner)
            else:
                node.elt = self.split(node.elt, inner)
            return node
        for name, value in ast.iter_fields(node):
            if isinstance(value, ast.AST):
                setattr(node, name, self.split(value, bound))
            elif isinstance(value, list):
                setattr(node, name, [self.split(v, bound) if isinstance(v, ast.AST) else v for v in value])
        return node


def _is_leaf_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == _LEAF_FN
            and len(node.args) == 1 and isinstance(node.args[0], ast.Constant))


def _parent_evaluable(node: ast.AST) -> bool:
    """Leaves, literals, comparisons, ``and``/``or``/``not`` of those: evaluated in the parent."""
    if _is_leaf_call(node):
        return True
    if isinstance(node, ast.Compare):
        return all(_parent_evaluable(n) for n in [node.left, *node.comparators])
    if isinstance(node, ast.BoolOp):
        return all(_parent_evaluable(n) for n in node.values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return _parent_evaluable(node.operand)
    if any(_is_leaf_call(n) for n in ast.walk(node)):
        return False
    try:
        ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
            ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


def _parent_eval(node: ast.AST, leaf: Any) -> Any:
    """Evaluate a :func:`_parent_evaluable` expression with Python's semantics on plain decoded data."""
    if _is_leaf_call(node):
        return leaf(node.args[0].value)  # type: ignore[attr-defined]
    if isinstance(node, ast.Compare):
        left = _parent_eval(node.left, leaf)
        for op, comp in zip(node.ops, node.comparators):
            right = _parent_eval(comp, leaf)
            result = _COMPARE[type(op)](left, right)
            if not result:
                return result
            left = right
        return result
    if isinstance(node, ast.BoolOp):
        for value_node in node.values:
            value = _parent_eval(value_node, leaf)
            if bool(value) != isinstance(node.op, ast.And):
                return value
        return value
    if isinstance(node, ast.UnaryOp):
        return not _parent_eval(node.operand, leaf)
    return ast.literal_eval(node)


def _plan_test(source: str, names: _SolutionNames) -> _TestPlan:
    """Split one test snippet (raises :class:`_Unverifiable` if it has other statements)."""
    tree = ast.parse(source)
    imports, test_bound = [], set()
    for stmt in tree.body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            if isinstance(stmt, ast.ImportFrom) and (stmt.level or any(a.name == "*" for a in stmt.names)):
                raise _Unverifiable(f"line {stmt.lineno}: relative or star import")
            imports.append(ast.unparse(stmt))
            test_bound |= {a.asname or a.name.split(".")[0] for a in stmt.names}
        elif not isinstance(stmt, (ast.Assert, ast.Expr, ast.Pass)):
            raise _Unverifiable(f"line {stmt.lineno}: {type(stmt).__name__} statement (only imports, asserts "
                                f"and expressions can be checked outside the solution's process)")
    stdlib = dict(names.stdlib)
    trusted = test_bound | set(stdlib) | (_BUILTIN_NAMES - names.other)
    splitter = _Splitter(trusted)
    checks: list[tuple[str, ast.expr]] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assert):
            checks.append(("assert", splitter.split(stmt.test, set())))
        elif isinstance(stmt, ast.Expr):
            checks.append(("expr", splitter.split(stmt.value, set())))
    used = set()
    for _, expr in checks:
        ast.fix_missing_locations(expr)
        used |= _free_names(expr)
    checker_imports = [stmt for name, stmt in sorted(stdlib.items()) if name in used and name not in test_bound]
    return _TestPlan(imports=imports, checker_imports=checker_imports + imports, checks=checks,
                     leaves=splitter.leaves, fast=all(_parent_evaluable(e) for _, e in checks))


@functools.lru_cache(maxsize=4096)
def _dataset_problem(source: str) -> str | None:
    """Why a test cannot be verified whatever the solution (None if it can); ValueError if it does not parse."""
    try:
        _plan_test(source, _SolutionNames())
    except SyntaxError as exc:
        raise ValueError(f"code test {source!r} is not valid Python: {exc.msg} (line {exc.lineno})") from None
    except _Unverifiable as exc:
        return str(exc)
    return None


def _leaf_reports(stdout: str, n_leaves: int) -> tuple[bool, list[list[Any]]]:
    """Parse the solution process's messages: (loaded, one report per leaf).  A leaf reported zero or
    several times is "missing"."""
    loaded = False
    counts = [0] * n_leaves
    reports: list[list[Any]] = [["m"] for _ in range(n_leaves)]
    for line in stdout.splitlines():
        try:
            msg = json.loads(line)
        except Exception:  # noqa: BLE001 - anything the solution wrote
            continue
        if not isinstance(msg, dict):
            continue
        if msg.get("load") == "ok":
            loaded = True
        k = msg.get("k")
        if type(k) is int and 0 <= k < n_leaves:
            counts[k] += 1
            reports[k] = ["v", msg["v"]] if "v" in msg else ["x", str(msg.get("x", "error"))]
    return loaded, [r if c == 1 else ["m"] for r, c in zip(reports, counts)]


def _parent_verdict(plan: _TestPlan, reports: list[list[Any]]) -> bool:
    try:
        leaf = _codec["_make_leaf_fn"](_codec["_leaf_values"](reports))
        for kind, expr in plan.checks:
            value = _parent_eval(expr, leaf)
            if kind == "assert" and not value:
                return False
        return True
    except Exception:  # noqa: BLE001 - a raising leaf, unorderable values, too deep data...
        return False


def extract_code(completion: str) -> str:
    """The first fenced ```python block of the completion, or the whole completion."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


class CodeTask(Task):
    """Python code with unit tests, verified outside the solution's process.

    Example metadata ``tests``: a list of test snippets (e.g. ``"assert add(1, 2) == 3"``) or one string.
    The solution is the first fenced ```python block of the completion, else the whole completion.
    Reward = fraction of tests passed (``all_or_nothing=False``, default) or 1 only if all pass; an empty
    or unparsable solution, or one that fails to load, scores 0.

    Verification (see the comment above ``_FENCE``): each test runs in its own sandboxed process
    (:func:`flowalign.dllm.sandbox.run_python`: separate ``python -I``, temp dir, time/memory/process
    limits, privileges dropped when root), which loads the solution and evaluates only the test's
    solution-dependent sub-expressions, returning their values as plain data; comparisons against the
    expected values happen in the parent or in a checker process that never holds the solution.  Nothing
    the solution prints, its exit code, or anything it reads from its interpreter can pass a test that
    its returned values do not pass.  Results must be plain data (None, bool, int, float, complex, str,
    bytes, containers of those, iterators, 0-d numpy scalars); any other object is an opaque stand-in
    equal only to itself.  Tests run in order, so a solution's module-level code runs once per test.

    A verifiable test holds only imports, ``assert`` statements and expression statements.  Others
    (``def check(...)``, loops, assignments, try blocks) are handled per ``unverified_tests``:
    ``"error"`` (default) raises ValueError when the example is loaded or scored; ``"fail"`` counts them
    as failed; ``"run"`` runs them the old way in one process and trusts its self-reported verdict,
    which a solution CAN forge.

    ``timeout_s``: wall-clock budget for all tests of one example (tests left when it runs out fail;
    the checker process, needed only for asserts beyond comparisons with literals, has its own
    ``timeout_s``).  ``memory_mb``, ``max_procs`` (default: 64 when the caller is root, else no cap),
    ``drop_privileges``: per process, see :func:`~flowalign.dllm.sandbox.run_python`; a process that
    cannot be started raises RuntimeError (never a silent 0).
    """

    name = "code"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, all_or_nothing: bool = False,
                 unverified_tests: str = "error", max_procs: int | None = None,
                 drop_privileges: bool | None = None) -> None:
        if unverified_tests not in ("error", "fail", "run"):
            raise ValueError(f"unverified_tests must be 'error', 'fail' or 'run', got {unverified_tests!r}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.all_or_nothing = bool(all_or_nothing)
        self.unverified_tests = unverified_tests
        # RLIMIT_NPROC counts every process of the user the code runs as: a cap is only meaningful when a
        # root caller runs it as the sandbox user (for other users it would count their whole session)
        self.max_procs = int(max_procs) if max_procs is not None else (64 if os.geteuid() == 0 else 0)
        self.drop_privileges = drop_privileges

    def load(self, path: str) -> list[TaskExample]:
        examples = super().load(path)
        for i, example in enumerate(examples, 1):
            try:
                self._tests(example)
            except ValueError as exc:
                raise ValueError(f"{path}: example {i}: {exc}") from None
        return examples

    def _tests(self, example: TaskExample) -> list[str]:
        tests = example.metadata.get("tests")
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"code example {example.prompt!r} needs metadata['tests'] as a non-empty list of "
                             f"strings, got {tests!r}")
        for t in tests:
            problem = _dataset_problem(t)
            if problem is not None and self.unverified_tests == "error":
                raise ValueError(
                    f"code test {t!r} cannot be verified outside the solution's process ({problem}); rewrite it as "
                    f"import/assert statements, or pass unverified_tests='run' (self-reported verdicts a solution "
                    f"can forge) or 'fail'")
        return tests

    def _run(self, source: str, timeout_s: float, stdin: str = "") -> Any:
        res = run_python(source, timeout_s=timeout_s, memory_mb=self.memory_mb, stdin=stdin,
                         max_procs=self.max_procs, max_output_bytes=_MAX_RESULT_BYTES,
                         drop_privileges=self.drop_privileges)
        if res.error is not None:  # not the solution's doing: the process had not started it yet
            raise RuntimeError(f"code task: the sandbox could not start a process: {res.error}")
        return res

    def reward(self, completion: str, example: TaskExample) -> float:
        tests = self._tests(example)
        code = extract_code(completion)
        if not code.strip():
            return 0.0
        try:
            names = _solution_names(ast.parse(code))
        except Exception:  # noqa: BLE001 - SyntaxError, ValueError (NUL bytes), RecursionError, ...
            return 0.0
        plans: dict[int, _TestPlan] = {}
        self_reported: list[int] = []
        for i, t in enumerate(tests):
            try:
                plans[i] = _plan_test(t, names)
            except _Unverifiable:
                if self.unverified_tests == "run":
                    self_reported.append(i)
        passed = [False] * len(tests)
        deadline = time.monotonic() + self.timeout_s
        to_check: list[tuple[int, _TestPlan, list[list[Any]]]] = []
        for i, plan in plans.items():
            remaining = deadline - time.monotonic()
            if remaining < 0.05:
                break
            source = "\n".join([_CODEC_SRC, f"_SOLUTION = {code!r}", f"_IMPORTS = {plan.imports!r}",
                                f"_LEAVES = {plan.leaves!r}", _LEAVES_MAIN])
            res = self._run(source, remaining)
            loaded, reports = _leaf_reports(res.stdout, len(plan.leaves))
            if not loaded:
                break  # the solution does not load (or not within the time left): every test would fail
            if plan.fast:
                passed[i] = _parent_verdict(plan, reports)
            else:
                to_check.append((i, plan, reports))
        remaining = deadline - time.monotonic()
        if self_reported and remaining >= 0.05:
            source = "\n".join([f"_SOLUTION = {code!r}", f"_TESTS = {[(i, tests[i]) for i in self_reported]!r}",
                                _SELF_REPORT_MAIN])
            res = self._run(source, remaining)
            ok: dict[int, list[bool]] = {}
            for line in res.stdout.splitlines():
                try:
                    msg = json.loads(line)
                except Exception:  # noqa: BLE001
                    continue
                if isinstance(msg, dict) and msg.get("t") in self_reported:
                    ok.setdefault(msg["t"], []).append(msg.get("ok") is True)
            for i in self_reported:
                passed[i] = ok.get(i) == [True]
        if to_check:
            nonce = secrets.token_hex(16)
            job = {"nonce": nonce, "tests": [
                {"imports": plan.checker_imports, "checks": [[kind, ast.unparse(e)] for kind, e in plan.checks],
                 "leaves": reports} for _, plan, reports in to_check]}
            res = self._run(_CODEC_SRC + "\n" + _CHECKER_MAIN, self.timeout_s, stdin=json.dumps(job))
            verdicts = None
            for line in res.stdout.splitlines():
                if line.startswith(nonce + " "):
                    try:
                        verdicts = json.loads(line[len(nonce) + 1:])
                    except ValueError:
                        verdicts = None
            if isinstance(verdicts, list) and len(verdicts) == len(to_check):
                for (i, _, _), verdict in zip(to_check, verdicts):
                    passed[i] = verdict is True
        frac = sum(passed) / len(tests)
        if self.all_or_nothing:
            return 1.0 if frac == 1.0 else 0.0
        return frac


TASKS: dict[str, type[Task]] = {
    "addition": AdditionTask,
    "gsm8k": GSM8KTask,
    "countdown": CountdownTask,
    "sudoku": SudokuTask,
    "code": CodeTask,
}


def get_task(name: str, **kwargs: Any) -> Task:
    """Instantiate the task registered under ``name`` (see :data:`TASKS`) with ``kwargs``."""
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as exc:
        raise TypeError(f"task {name!r} does not accept arguments {sorted(kwargs)}: {exc}") from exc
