"""Abuse of the code sandbox (flowalign.dllm.sandbox) and reward forgery in the code task.

Every test here is bounded in time (a few seconds) and in processes (at most a few dozen, always under a
per-call RLIMIT_NPROC when privileges are dropped), uses no network, and checks that nothing it started
survives.  Processes are recognised by a per-test marker, in their command line (exec'd sleepers) or in
their ``comm`` name (forked copies of the sandboxed interpreter, renamed with prctl(PR_SET_NAME)).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from flowalign.dllm.sandbox import run_python
from flowalign.dllm.tasks import TaskExample, get_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sandbox abuse tests need Linux /proc")


def _marked(marker: str) -> list[int]:
    """Live (non-zombie) processes whose command line or comm name contains ``marker``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmd = fh.read()
            with open(f"/proc/{name}/comm", "rb") as fh:
                comm = fh.read()
            with open(f"/proc/{name}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if state != b"Z" and (marker.encode() in cmd or marker.encode() in comm):
            out.append(int(name))
    return out


def _survivors(marker: str, wait_s: float = 1.0) -> list[int]:
    """Processes with ``marker`` still alive after up to ``wait_s`` (SIGKILL'd ones need a moment to go)."""
    end = time.monotonic() + wait_s
    while True:
        alive = _marked(marker)
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.05)


@pytest.fixture
def marker():
    """A unique marker; anything still carrying it after the test is killed (and the test fails)."""
    m = "fa" + uuid.uuid4().hex[:12]  # <= 15 chars: fits in a comm name
    yield m
    for pid in _marked(m):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _sleeper(marker: str, seconds: int = 30) -> str:
    """Python statement that replaces the current process with a marked sleeper."""
    return (f"os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep({seconds})', '{marker}'])")


def _rename(marker: str) -> str:
    return f"import ctypes; ctypes.CDLL(None).prctl(15, b'{marker}', 0, 0, 0)"


def _privileges_droppable() -> bool:
    if not IS_ROOT:
        return False
    try:
        return run_python("pass", drop_privileges=True, timeout_s=10).privileges_dropped
    except RuntimeError:
        return False


needs_drop = pytest.mark.skipif(not _privileges_droppable(),
                                reason="needs root and a Python interpreter the sandbox user can run "
                                       "(privilege drop not applicable)")


# ---------------------------------------------------------------- timeouts and escaped processes
def test_setsid_child_holding_stdout_cannot_stretch_the_timeout(marker):
    code = textwrap.dedent(f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            {_sleeper(marker)}
        time.sleep(0.3)
        print("main still running", flush=True)
        while True:
            time.sleep(1)
    """)
    t0 = time.monotonic()
    r = run_python(code, timeout_s=2)
    dt = time.monotonic() - t0
    assert r.timed_out and r.returncode is None
    assert "main still running" in r.stdout
    assert dt < 2 + 3, f"run_python took {dt:.1f}s for a 2 s limit"
    assert _survivors(marker) == []


def test_setsid_grandchild_does_not_outlive_a_finished_child(marker):
    # the main process exits at once; a setsid'd child keeps stdout open and would sleep 30 s
    code = textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            {_sleeper(marker)}
        print("main done")
    """)
    t0 = time.monotonic()
    r = run_python(code, timeout_s=10)
    dt = time.monotonic() - t0
    assert r.returncode == 0 and not r.timed_out and r.stdout == "main done\n"
    assert dt < 5
    assert _survivors(marker) == []


def test_double_forked_daemons_and_grandchildren_are_all_killed(marker):
    # 3 children, each with 2 grandchildren; one branch double-forks into a detached daemon with no stdio
    code = textwrap.dedent(f"""
        import os, sys, time
        for i in range(3):
            if os.fork() == 0:
                for j in range(2):
                    if os.fork() == 0:
                        if i == 0 and j == 0:
                            os.setsid()
                            if os.fork():
                                os._exit(0)
                            os.closerange(0, 3)
                        {_sleeper(marker)}
                time.sleep(30)
                os._exit(0)
        time.sleep(0.5)
        print("spawned", flush=True)
    """)
    r = run_python(code, timeout_s=10, max_procs=24 if IS_ROOT else 0)  # non-root: NPROC counts the whole user
    assert r.returncode == 0 and "spawned" in r.stdout
    assert _survivors(marker) == []


@needs_drop
def test_bounded_fork_bomb_is_contained_and_cleaned_up(marker):
    code = textwrap.dedent(f"""
        import os, time
        {_rename(marker)}
        while True:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
    """)
    t0 = time.monotonic()
    r = run_python(code, timeout_s=2, max_procs=12)
    assert r.timed_out and time.monotonic() - t0 < 5
    assert _survivors(marker) == []


# ---------------------------------------------------------------- output volume
def test_huge_output_is_capped_while_streaming():
    # in a fresh, small parent so that its peak RSS (VmHWM) is meaningful
    script = textwrap.dedent("""
        import json, time
        from flowalign.dllm.sandbox import run_python

        def hwm_kb():
            with open("/proc/self/status") as fh:
                return int(next(l for l in fh if l.startswith("VmHWM")).split()[1])

        before = hwm_kb()
        t0 = time.monotonic()
        r = run_python("import sys\\nb = 'x' * (1 << 20)\\nfor _ in range(400):\\n    sys.stdout.write(b)\\n",
                       timeout_s=30, memory_mb=256, max_output_bytes=1_000_000)
        print(json.dumps({"len": len(r.stdout), "truncated": r.truncated, "rc": r.returncode,
                          "dt": time.monotonic() - t0, "delta_mb": (hwm_kb() - before) / 1024}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["len"] == 1_000_000 and res["truncated"] and res["rc"] is None
    assert res["delta_mb"] < 50, res  # 400 MB printed; the caller keeps 1 MB
    assert res["dt"] < 20, res


# ---------------------------------------------------------------- privileges
@needs_drop
def test_child_cannot_read_the_callers_environment_or_kill_it():
    # the caller is a throwaway subprocess holding a secret in its environment, not pytest itself
    child_code = textwrap.dedent("""
        import json, os, signal
        out = {"uid": os.getuid(), "env_has_secret": any("FA_SECRET" in k for k in os.environ)}
        for label, pid in (("caller", CALLER_PID), ("supervisor", os.getppid())):
            try:
                with open("/proc/%d/environ" % pid, "rb") as fh:
                    out[label + "_environ"] = "read:" + str(b"FA_SECRET" in fh.read())
            except OSError as exc:
                out[label + "_environ"] = type(exc).__name__
        for label, pid in (("caller", CALLER_PID), ("supervisor", os.getppid())):
            try:
                os.kill(pid, signal.SIGKILL)
                out[label + "_kill"] = "killed"
            except OSError as exc:
                out[label + "_kill"] = type(exc).__name__
        print(json.dumps(out))
    """)
    script = textwrap.dedent(f"""
        import os
        from flowalign.dllm.sandbox import run_python
        code = {child_code!r}.replace("CALLER_PID", str(os.getpid()))
        r = run_python(code, timeout_s=10)
        print("RESULT", r.stdout.strip(), r.privileges_dropped)
        print("CALLER ALIVE")
    """)
    env = {**os.environ, "FA_SECRET": "hunter2"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env,
                         cwd=REPO)
    assert "CALLER ALIVE" in out.stdout, (out.returncode, out.stdout, out.stderr[-2000:])
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("RESULT "))
    payload, dropped = line[len("RESULT "):].rsplit(" ", 1)
    res = json.loads(payload)
    assert dropped == "True" and res["uid"] == 65534 and res["env_has_secret"] is False
    assert res["caller_environ"] == "PermissionError" and res["supervisor_environ"] == "PermissionError"
    assert res["caller_kill"] == "PermissionError" and res["supervisor_kill"] == "PermissionError"


def test_environment_is_minimal(monkeypatch):
    monkeypatch.setenv("FA_SECRET", "hunter2")
    r = run_python("import json, os\nprint(json.dumps(dict(os.environ)))", timeout_s=10)
    env = json.loads(r.stdout)
    assert set(env) <= {"PATH", "LANG", "HOME", "TMPDIR", "LC_CTYPE"} and "FA_SECRET" not in r.stdout


@needs_drop
def test_max_procs_holds_when_the_caller_is_root(marker):
    code = textwrap.dedent(f"""
        import os, sys, time
        {_rename(marker)}
        kids = []
        for i in range(50):
            try:
                pid = os.fork()
            except OSError as exc:
                print("fork failed", exc.errno, flush=True)
                break
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            kids.append(pid)
        print("forked", len(kids), flush=True)
    """)
    r = run_python(code, timeout_s=10, max_procs=8)
    assert r.privileges_dropped and "fork failed" in r.stdout
    forked = int(r.stdout.split("forked")[1].split()[0])
    assert forked < 8  # the sandboxed process itself counts
    assert _survivors(marker) == []


@pytest.mark.skipif(IS_ROOT, reason="the caller is root: privileges can be dropped")
def test_requiring_a_privilege_drop_without_root_raises():
    with pytest.raises(RuntimeError, match="needs the caller to run as root"):
        run_python("pass", drop_privileges=True)


# ---------------------------------------------------------------- code reward forgery
ADD_TESTS = [
    "assert add(1, 2) == 3",
    "assert add(-1, 1) == 0",
    "assert add(2, 2) == 5",
    "assert sorted([add(1, 1), 9]) == [2, 9]",  # checked in the checker process, not the parent
    "import math\nassert math.isclose(add(0.5, 0.25), 0.75)",
]
WRONG = "def add(a, b):\n    return 0\n"  # honest and wrong: passes add(-1, 1) == 0 only

FORGERIES = {
    "old-format PASS lines with the harness nonce": """
        import __main__
        nonce = getattr(__main__, "_nonce", "x")
        for i in range(10):
            print(nonce, "PASS", i, flush=True)
            print("x PASS", i, flush=True)
    """,
    "new-format messages printed": """
        import json
        print(json.dumps({"load": "ok"}))
        for i in range(10):
            print(json.dumps({"k": i, "v": ["b", True]}))
            print(json.dumps({"t": i, "ok": True}))
        print("0" * 32, json.dumps([True] * 10))
    """,
    "messages written to every fd 0-20, then exit 0 from inside the function": """
        import json, os
        _LINES = ["{}", json.dumps({"load": "ok"})] + [json.dumps({"k": i, "v": ["b", True]}) for i in range(5)] \\
            + [json.dumps({"t": i, "ok": True}) for i in range(5)] + ["%s %s" % ("0" * 32, json.dumps([True] * 5))]
        def _spray():
            for fd in range(21):
                for line in _LINES:
                    try:
                        os.write(fd, (line + "\\n").encode())
                    except OSError:
                        pass
        _spray()
        _wrong = add
        def add(a, b):
            _spray()
            os._exit(0)
    """,
    "guessing several values for each result": """
        import os
        def add(a, b):
            for guess in range(10):
                for fd in range(3, 21):
                    for k in range(3):
                        try:
                            os.write(fd, ('{"k": %d, "v": ["i", "%x"]}\\n' % (k, guess)).encode())
                        except OSError:
                            pass
            return 0
    """,
    "SystemExit(0) from inside the function": """
        def add(a, b):
            raise SystemExit(0)
    """,
    "an object whose __eq__ always says True": """
        class _Yes:
            def __eq__(self, other):
                return True
            __hash__ = object.__hash__
            def __bool__(self):
                return True
            def __lt__(self, other):
                return True
        def add(a, b):
            return _Yes()
    """,
    "an int subclass whose __eq__ always says True": """
        class _YesInt(int):
            def __eq__(self, other):
                return True
            __hash__ = int.__hash__
        def add(a, b):
            return _YesInt(0)
    """,
    "monkeypatched builtins and serializers": """
        import builtins, json, math
        builtins.print = lambda *a, **k: None
        builtins.sorted = lambda *a, **k: [2, 9]
        builtins.isinstance = lambda *a: True
        math.isclose = lambda *a, **k: True
        _dumps = json.dumps
        json.dumps = lambda obj, *a, **k: _dumps({"k": obj.get("k"), "v": ["b", True]} if isinstance(obj, dict) and "k" in obj else obj)
        builtins.repr = lambda obj: "True"
    """,
    "reads its interpreter, files, /proc and stdin for expected values": """
        import ast, gc, os, re, sys
        def _texts():
            out = []
            for path in ("main.py", "/proc/self/cmdline", "/proc/self/environ", "/proc/%d/cmdline" % os.getppid()):
                try:
                    out.append(open(path, "rb").read().decode("utf-8", "replace"))
                except OSError:
                    pass
            try:
                out.append(sys.stdin.read())
            except Exception:
                pass
            for obj in gc.get_objects():
                if obj is not out and isinstance(obj, (list, tuple, dict)):
                    for v in list(obj.values() if isinstance(obj, dict) else obj):
                        if isinstance(v, str):
                            out.append(v)
            frame = sys._getframe()
            while frame is not None:
                out.extend(v for v in frame.f_globals.values() if isinstance(v, str))
                frame = frame.f_back
            return "\\n".join(out)
        def add(a, b):
            pattern = r"add\\(\\s*%s\\s*,\\s*%s\\s*\\)\\s*==\\s*([^\\\\\\n'\\"]+)" % (re.escape(repr(a)), re.escape(repr(b)))
            for m in re.finditer(pattern, _texts()):
                try:
                    return ast.literal_eval(m.group(1).strip())
                except Exception:
                    pass
            return 0
    """,
}


def _example() -> TaskExample:
    return TaskExample(prompt="write add", answer="", metadata={"tests": list(ADD_TESTS)})


def test_honest_baselines():
    task = get_task("code")
    assert task.reward(WRONG, _example()) == pytest.approx(1 / 5)
    assert task.reward("def add(a, b):\n    return a + b\n", _example()) == pytest.approx(4 / 5)


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forgery_scores_no_more_than_an_honest_wrong_solution(name):
    task = get_task("code", timeout_s=10)
    forged = WRONG + textwrap.dedent(FORGERIES[name])
    baseline = task.reward(WRONG, _example())
    assert task.reward(forged, _example()) <= baseline, name


def test_expected_values_never_reach_the_solution_process():
    # the solution returns the expected value only if it can find it anywhere it can look
    tests = ["assert probe() == 987654321"]
    solution = textwrap.dedent("""
        import gc, os, sys
        def probe():
            needle = str(987654320 + int("1"))  # not constant-folded into the source
            for path in ("main.py", "/proc/self/cmdline", "/proc/self/environ"):
                try:
                    if needle in open(path, "rb").read().decode("utf-8", "replace"):
                        return int(needle)
                except OSError:
                    pass
            for obj in gc.get_objects():
                try:
                    if needle in repr(obj)[:100000]:
                        return int(needle)
                except Exception:
                    pass
            return -1
    """)
    task = get_task("code", timeout_s=20)
    assert task.reward(solution, TaskExample("p", "", metadata={"tests": tests})) == 0.0
    honest = "def probe():\n    return 987654320 + 1\n"
    assert task.reward(honest, TaskExample("p", "", metadata={"tests": tests})) == 1.0


def test_exit_code_does_not_matter():
    task = get_task("code")
    e = TaskExample("p", "", metadata={"tests": ["assert f() == 1", "assert f() == 2"]})
    # exits 3 after the test's values are computed: still 1 of 2
    assert task.reward("import atexit, os\natexit.register(lambda: os._exit(3))\ndef f():\n    return 1\n", e) == 0.5
    # exits 0 before: nothing was computed, nothing passes
    assert task.reward("import os\nos._exit(0)\ndef f():\n    return 1\n", e) == 0.0
