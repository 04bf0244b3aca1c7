"""Verifiable-reward tasks (flowalign.dllm.tasks) and the sandbox: hand-written cases."""

from __future__ import annotations

import json
import os
import random
import textwrap
import time
from fractions import Fraction

import pytest

from flowalign.dllm.pretrain import (
    carry_count,
    dropped_carry_sum,
    flawed_addition_pairs,
)
from flowalign.dllm.sandbox import run_python
from flowalign.dllm.tasks import (
    TASKS,
    AdditionTask,
    CountdownTask,
    TaskExample,
    addition_answer,
    addition_prompt,
    evaluate_countdown,
    extract_gsm8k_answer,
    get_task,
    parse_number,
)


def ex(prompt: str = "p", answer: str = "", **meta) -> TaskExample:
    return TaskExample(prompt=prompt, answer=answer, metadata=meta)


# ---------------------------------------------------------------- registry / loading
def test_registry_and_get_task():
    assert set(TASKS) == {"addition", "gsm8k", "countdown", "sudoku", "code"}
    assert isinstance(get_task("addition"), AdditionTask)
    assert get_task("countdown", format_score=0.1).format_score == 0.1
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")
    with pytest.raises(TypeError, match="does not accept"):
        get_task("addition", bogus=1)


def test_load_jsonl(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"prompt": "047+085=", "answer": "0132", "reference": "0132", "a": 47}) + "\n\n"
                 + json.dumps({"prompt": "q", "answer": 7, "numbers": [1, 2]}) + "\n")
    exs = AdditionTask().load(str(p))
    assert [e.prompt for e in exs] == ["047+085=", "q"]
    assert exs[0].reference == "0132" and exs[0].metadata == {"a": 47}
    assert exs[1].answer == "7" and exs[1].metadata == {"numbers": [1, 2]}
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AdditionTask().load(str(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="missing required field 'answer'"):
        AdditionTask().load(str(bad))
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        AdditionTask().load(str(bad))


# ---------------------------------------------------------------- addition
def test_addition_reward():
    t = AdditionTask()
    e = ex(addition_prompt(47, 85), addition_answer(132))
    assert e.prompt == "047+085=" and e.answer == "0132"
    assert t.reward("0132", e) == 1.0
    assert t.reward(" 132 ", e) == 1.0
    assert t.reward("0022", e) == 0.0  # the dropped-carry answer
    for bad in ["", "13a2", "[MASK]132", "-132", "1 32", "²"]:
        assert t.reward(bad, e) == 0.0


def test_carry_helpers_against_column_arithmetic():
    assert carry_count(47, 85) == 2 and dropped_carry_sum(47, 85) == 22
    assert carry_count(123, 456) == 0 and dropped_carry_sum(123, 456) == 579
    assert carry_count(95, 5) == 2 and dropped_carry_sum(95, 5) == 90
    assert carry_count(999, 1) == 3 and dropped_carry_sum(999, 1) == 990
    rng = random.Random(0)
    for _ in range(500):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        # independent definition: a carry out of column k happens iff (a mod 10^(k+1)) + (b mod 10^(k+1)) >= 10^(k+1)
        expected = sum((a % 10 ** (k + 1)) + (b % 10 ** (k + 1)) >= 10 ** (k + 1) for k in range(4))
        assert carry_count(a, b) == expected
        assert dropped_carry_sum(a, b) == int("".join(str((int(x) + int(y)) % 10) for x, y in
                                                      zip(f"{a:04d}", f"{b:04d}")))
        assert (dropped_carry_sum(a, b) == a + b) == (carry_count(a, b) == 0)


def test_flawed_pairs_follow_the_drop_probabilities():
    rng = random.Random(1)
    exs = flawed_addition_pairs(4000, rng=rng, drop_prob={0: 0.0, 1: 0.25, 2: 0.75}, exclude={(10, 10)})
    by = {0: [], 1: [], 2: []}
    for e in exs:
        a, b = e.metadata["a"], e.metadata["b"]
        assert (a, b) != (10, 10) and 10 <= a <= 999 and 10 <= b <= 999
        assert e.reference == addition_answer(a + b)
        written = int(e.answer)
        assert written == (dropped_carry_sum(a, b) if e.metadata["flawed"] else a + b)
        by[min(e.metadata["carries"], 2)].append(e.metadata["flawed"])
    assert not any(by[0])
    assert abs(sum(by[1]) / len(by[1]) - 0.25) < 0.05
    assert abs(sum(by[2]) / len(by[2]) - 0.75) < 0.05
    with pytest.raises(ValueError, match=r"drop_prob\[1\]=1.5"):
        flawed_addition_pairs(1, rng=rng, drop_prob={1: 1.5})


# ---------------------------------------------------------------- gsm8k
@pytest.mark.parametrize("text,expected", [
    ("so 6*7 = 42\n#### 42", "42"),
    ("we get \\boxed{1,234} dollars", "1,234"),
    ("\\boxed{\\frac{1}{2}} then \\boxed{17}", "17"),
    ("The answer is $18.00.", "$18.00"),
    ("the answer is: -3", "-3"),
    ("I think 3 apples and 5 pears, so 8", "8"),
    ("#### 5 but the answer is 7", "5"),
    ("no numbers here", None),
])
def test_gsm8k_extraction(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_parse_number():
    assert parse_number("1,234") == 1234
    assert parse_number("$42.0") == 42
    assert parse_number("42.") == 42
    assert parse_number("-3.5") == Fraction(-7, 2)
    assert parse_number("3/4") == Fraction(3, 4)
    assert parse_number("50%") == 50
    assert parse_number("4/0") is None and parse_number("abc") is None and parse_number("") is None


def test_gsm8k_reward():
    t = get_task("gsm8k")
    e = ex("q", "Natalia sold 48/2 = 24 clips.\n#### 72")
    assert t.reward("She sold 72 clips in all. #### 72", e) == 1.0
    assert t.reward("The answer is 72.0", e) == 1.0
    assert t.reward("\\boxed{72}", e) == 1.0
    assert t.reward("48 + 24 = 72", e) == 1.0  # last-number fallback
    assert t.reward("The answer is 71", e) == 0.0
    assert t.reward("", e) == 0.0
    assert t.reward("$1,000", ex("q", "1000")) == 1.0
    assert t.reward("[MASK][MASK]", ex("q", "3")) == 0.0


# ---------------------------------------------------------------- countdown
def test_countdown_safe_evaluation():
    assert evaluate_countdown("(3+5)*7") == (Fraction(56), [3, 5, 7])
    assert evaluate_countdown("7/2") == (Fraction(7, 2), [7, 2])
    assert evaluate_countdown("1/(2-2)") is None
    for bad in ["__import__('os').system('true')", "2**10", "-3+5", "3.5*2", "x+1", "[1][0]", "3 +"]:
        assert evaluate_countdown(bad) is None, bad


def test_countdown_reward():
    t = CountdownTask()
    e = ex("Use [3, 5, 7] to make 22", "22", numbers=[3, 5, 7], target=22)
    assert t.reward("<answer>3*5+7</answer>", e) == 1.0
    assert t.reward("let me think\n3*5+7 = 22", e) == 1.0
    assert t.reward("<answer>(7+5)*3-14</answer>", e) == 0.0  # 14 not given
    assert t.reward("<answer>7*3+7-6</answer>", e) == 0.0  # 7 used twice
    assert t.reward("<answer>3*5+5</answer>", e) == 0.0  # wrong value, 5 twice
    assert t.reward("<answer>3*7</answer>", e) == 0.0  # valid numbers, wrong value, no partial credit
    assert CountdownTask(format_score=0.1).reward("<answer>3*7</answer>", e) == pytest.approx(0.1)
    assert t.reward("<answer>22</answer>", e) == 0.0
    assert t.reward("", e) == 0.0 and t.reward("<answer>import os</answer>", e) == 0.0
    strict = CountdownTask(require_all_numbers=True)
    e2 = ex("q", "15", numbers=[3, 5, 7], target=15)
    assert t.reward("3*5", e2) == 1.0 and strict.reward("3*5", e2) == 0.0
    assert strict.reward("(7-5+3)*3", ex("q", "15", numbers=[3, 3, 5, 7])) == 1.0
    with pytest.raises(ValueError, match="metadata\\['numbers'\\]"):
        t.reward("1+2", ex("q", "3"))


# ---------------------------------------------------------------- sudoku
SOL4 = "1234341221434321"
SOL9 = ("534678912672195348198342567859761423426853791713924856961537284287419635345286179")


def test_sudoku_reward_4x4_and_9x9():
    t = get_task("sudoku")
    puz4 = "1.3..4.2.1..4.2."
    e4 = ex("solve", SOL4, puzzle=puz4)
    assert t.reward(SOL4, e4) == 1.0
    assert t.reward("1234\n3412\n2143\n4321", e4) == 1.0
    assert t.reward("1 2 | 3 4\n3 4 | 1 2\n--\n2 1 | 4 3\n4 3 | 2 1", e4) == 1.0
    # a valid sudoku that breaks a given (the puzzle has 3 at cell 2)
    other = "2143432114323214"
    assert t.reward(other, ex("s", "", puzzle="2.4...2.1.3...1.")) == 1.0
    assert t.reward(other, e4) == 0.0
    assert t.reward("1234341221434312", e4) == 0.0  # last row repeats
    assert t.reward("123", e4) == 0.0 and t.reward("", e4) == 0.0
    # rows and columns fine, boxes broken: Latin square that is not a sudoku
    latin = "1234" "2341" "3412" "4123"
    assert t.reward(latin, ex("s", "", puzzle="0" * 16)) == 0.0
    puz9 = "".join(c if i % 3 else "0" for i, c in enumerate(SOL9))
    e9 = ex("s", SOL9, puzzle=puz9)
    assert t.reward(SOL9, e9) == 1.0
    swapped = SOL9[1] + SOL9[0] + SOL9[2:]
    assert t.reward(swapped, e9) == 0.0
    with pytest.raises(ValueError, match="16 or 81 cells"):
        t.reward(SOL4, ex("s", "", puzzle="123"))


# ---------------------------------------------------------------- code
def test_sandbox_basics():
    r = run_python("import os, sys\nprint(os.getcwd()); print(sys.flags.isolated); print(sys.stdin.read())",
                   stdin="hello", timeout_s=10)
    assert r.returncode == 0 and not r.timed_out
    cwd, isolated, echoed = r.stdout.splitlines()[:3]
    assert "flowalign_sandbox_" in cwd and isolated == "1" and echoed == "hello"
    r = run_python("x = bytearray(400 * 1024 * 1024)\nprint('allocated')", memory_mb=128, timeout_s=10)
    assert "allocated" not in r.stdout and r.returncode != 0
    with pytest.raises(ValueError, match="timeout_s"):
        run_python("pass", timeout_s=0)


def test_code_reward_fraction_and_all_or_nothing():
    tests = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]
    e = ex("write add", "", tests=tests)
    good = "```python\ndef add(a, b):\n    return a + b\n```\nDone."
    assert get_task("code").reward(good, e) == pytest.approx(2 / 3)
    assert get_task("code", all_or_nothing=True).reward(good, e) == 0.0
    assert get_task("code", all_or_nothing=True).reward(good, ex("q", "", tests=tests[:2])) == 1.0
    assert get_task("code").reward("def add(a, b) return", e) == 0.0  # syntax error
    assert get_task("code").reward("", e) == 0.0
    assert get_task("code").reward("import sys\nsys.exit(0)", e) == 0.0
    # a solution cannot fake the harness's PASS lines (it does not know the nonce)
    fake = "print('x PASS 0'); print('x PASS 1')\ndef add(a, b):\n    return None"
    assert get_task("code").reward(fake, e) == 0.0
    with pytest.raises(ValueError, match="metadata\\['tests'\\]"):
        get_task("code").reward(good, ex("q", ""))


def test_code_infinite_loop_hits_time_limit_quickly():
    t = get_task("code", timeout_s=1.0)
    e = ex("q", "", tests=["assert f() == 1"])
    t0 = time.time()
    assert t.reward("def f():\n    while True:\n        pass", e) == 0.0
    assert t.reward("while True:\n    pass", e) == 0.0
    assert time.time() - t0 < 6.0


def test_code_tests_are_split_so_expected_values_stay_out_of_the_solution_process():
    from flowalign.dllm.tasks import _plan_test, _solution_names

    names = _solution_names(__import__("ast").parse("import math\nfrom collections import Counter\n"
                                                     "def add(a, b):\n    return a + b\nlimit = 3"))
    plan = _plan_test("assert add(1, 2) == 3", names)
    assert plan.leaves == ["add(1, 2)"] and plan.fast and plan.imports == []
    plan = _plan_test("assert Counter(add('a', 'b')) == Counter('ab') and math.pi > limit", names)
    # Counter and math come from the standard library: the checker imports them itself
    assert plan.leaves == ["add('a', 'b')", "limit"] and not plan.fast
    assert plan.checker_imports == ["from collections import Counter", "import math"]
    plan = _plan_test("assert list(map(add, [1], [2])) == [3]", names)  # a solution function as an argument
    assert plan.leaves == ["map(add, [1], [2])"]
    plan = _plan_test("assert all(x > 0 for x in add([1], [2]))", names)  # leaf in the outer iterable: fine
    assert plan.leaves == ["add([1], [2])"]
    from flowalign.dllm.tasks import _Unverifiable

    for bad in ["for i in range(3):\n    assert add(i, 0) == i", "x = add(1, 2)\nassert x == 3",
                "assert all(add(i, 0) == i for i in range(3))", "assert (y := add(1, 2)) == 3"]:
        with pytest.raises(_Unverifiable):
            _plan_test(bad, names)


def test_code_reward_for_honest_solutions_across_assert_forms():
    tests = [
        "assert f(2) == 4",
        "assert f(2) == 4.0 and f(-1) != 0",  # int/float equality as in Python
        "assert f(0) in (0, 1) and not f(0)",
        "assert g(3) == [0, 1, 2] and g(0) == []",
        "assert g(2) != (0, 1)",  # a list is not a tuple
        "assert h() == {'a': {1, 2}, 'b': None}",
        "assert big(5000) == 10 ** 5000",  # beyond int-to-str digit limits
        "import math\nassert math.isclose(f(0.1), 0.01)",
        "assert sorted(g(3), reverse=True) == [2, 1, 0]",
        "assert list(gen(3)) == [0, 1, 2] and sum(gen(4)) == 6",
        "assert Counter(word('aab')) == Counter({'a': 2, 'b': 1})",
        "assert list(map(f, [1, 2])) == [1, 4]",
        "assert f(3) == 9, 'the message is never evaluated'",
        "f(1)",  # must not raise
    ]
    solution = textwrap.dedent("""
        from collections import Counter
        def f(x):
            return x * x
        def g(n):
            return list(range(n))
        def h():
            return {"a": {1, 2}, "b": None}
        def big(n):
            return 10 ** n
        def gen(n):
            yield from range(n)
        def word(s):
            return Counter(s)
    """)
    e = ex("q", "", tests=tests)
    assert get_task("code", timeout_s=30).reward(solution, e) == 1.0
    wrong = solution.replace("return x * x", "return x + x").replace("yield from range(n)", "yield from range(n + 1)")
    # 2 * x: isclose, map and f(3) == 9 fail (f(2) == 4 and f(0) == 0 still hold); gen(3) has 4 items
    assert get_task("code", timeout_s=30).reward(wrong, e) == pytest.approx(10 / len(tests))


def test_code_raising_values_and_non_plain_results_fail():
    tests = ["assert f(1) == 1", "assert f(0) == 0", "assert obj() == obj()", "assert obj() is not None",
             "boom()"]
    solution = ("def f(x):\n    return 1 / x\nclass A:\n    def __eq__(self, o):\n        return True\n"
                "def obj():\n    return A()\ndef boom():\n    raise ValueError('no')\n")
    # f(0) raises; an opaque A() equals only itself (not another call's A()); boom() raises
    assert get_task("code").reward(solution, ex("q", "", tests=tests)) == pytest.approx(2 / 5)


def test_code_builtin_names_defined_by_the_solution_are_the_solutions():
    e = ex("q", "", tests=["assert max(3) == 3"])
    assert get_task("code").reward("def max(x):\n    return x\n", e) == 1.0
    assert get_task("code").reward("def other(x):\n    return x\n", e) == 0.0  # builtin max(3) raises


def test_code_unverifiable_tests_modes(tmp_path):
    loop_test = "for i in range(3):\n    assert sq(i) == i * i"
    e = ex("q", "", tests=["assert sq(2) == 4", loop_test])
    good = "def sq(x):\n    return x * x\n"
    with pytest.raises(ValueError, match="cannot be verified outside the solution's process"):
        get_task("code").reward(good, e)
    assert get_task("code", unverified_tests="fail").reward(good, e) == 0.5
    assert get_task("code", unverified_tests="run").reward(good, e) == 1.0
    assert get_task("code", unverified_tests="run").reward("def sq(x):\n    return 0\n", e) == 0.0
    with pytest.raises(ValueError, match="unverified_tests"):
        get_task("code", unverified_tests="trust")
    p = tmp_path / "code.jsonl"
    p.write_text(json.dumps({"prompt": "q", "answer": "", "tests": [loop_test]}) + "\n")
    with pytest.raises(ValueError, match="example 1: code test"):
        get_task("code").load(str(p))
    assert len(get_task("code", unverified_tests="fail").load(str(p))) == 1
    p.write_text(json.dumps({"prompt": "q", "answer": "", "tests": ["assert f(1) =="]}) + "\n")
    with pytest.raises(ValueError, match="is not valid Python"):
        get_task("code", unverified_tests="run").load(str(p))


def test_sandbox_output_cap_and_privilege_report():
    r = run_python("import sys\nprint('a' * 5000, flush=True)\nsys.stderr.write('b' * 5000)", max_output_bytes=100,
                   timeout_s=10)
    assert r.truncated and r.returncode is None and r.stdout == "a" * 100 and len(r.stderr) <= 100
    r = run_python("import os\nprint(os.getuid())", timeout_s=10)
    assert r.privileges_dropped == (os.geteuid() == 0 and r.stdout.strip() == "65534")
    if not r.privileges_dropped:
        assert r.stdout.strip() == str(os.getuid())
