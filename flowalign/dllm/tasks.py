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
import json
import math
import operator
import os
import re
import secrets
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
_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)

_HARNESS = '''import sys
_nonce = sys.stdin.readline().strip()
_tests = {tests!r}
_ns = {{"__name__": "__solution__"}}
try:
    exec(compile({solution!r}, "solution.py", "exec"), _ns)
except BaseException as _e:
    print(_nonce, "LOADFAIL", type(_e).__name__, flush=True)
    raise SystemExit(0)
for _i, _t in enumerate(_tests):
    try:
        exec(compile(_t, "test_%d.py" % _i, "exec"), dict(_ns))
        print(_nonce, "PASS", _i, flush=True)
    except BaseException as _e:
        print(_nonce, "FAIL", _i, type(_e).__name__, flush=True)
'''


def extract_code(completion: str) -> str:
    """The first fenced ```python block of the completion, or the whole completion."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


class CodeTask(Task):
    """Python code with unit tests run in :func:`flowalign.dllm.sandbox.run_python` (separate
    ``python -I`` process, temp dir, time and memory limits; network not blocked, see sandbox).

    Example metadata ``tests``: a list of test snippets (e.g. ``"assert add(1, 2) == 3"``) or one
    string (one test).  The solution (first fenced ```python block, else the whole completion) is
    executed once, then each test in a copy of its namespace.  Reward = fraction of tests passed
    (``all_or_nothing=False``, default) or 1 only if all pass.  A solution that fails to load, times
    out before any test reports, or is empty scores 0; tests unreported at the time limit fail.
    """

    name = "code"

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 512, all_or_nothing: bool = False) -> None:
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb)
        self.all_or_nothing = bool(all_or_nothing)

    def reward(self, completion: str, example: TaskExample) -> float:
        tests = example.metadata.get("tests")
        if isinstance(tests, str):
            tests = [tests]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError(f"code example {example.prompt!r} needs metadata['tests'] as a non-empty list of "
                             f"strings, got {tests!r}")
        code = extract_code(completion)
        if not code.strip():
            return 0.0
        nonce = secrets.token_hex(16)
        harness = _HARNESS.format(tests=list(tests), solution=code)
        res = run_python(harness, timeout_s=self.timeout_s, memory_mb=self.memory_mb, stdin=nonce + "\n")
        passed: set[int] = set()
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == nonce and parts[1] == "PASS" and parts[2].isdigit():
                passed.add(int(parts[2]))
        frac = len(passed & set(range(len(tests)))) / len(tests)
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
