"""Run untrusted Python in a separate, resource-limited process (for the ``code`` task).

What is enforced: a separate ``python -I`` interpreter (isolated mode: no user site, no
``PYTHON*`` environment variables, script directory not on ``sys.path``), a fresh temporary
directory as the working directory (deleted afterwards), a minimal environment, a wall-clock time
limit (the whole process group is killed), and where the ``resource`` module exists (POSIX): CPU
time, address space (memory), file size and process-count limits.

What is NOT enforced: network access, reading files the user can read, and anything a determined
attacker does inside the limits.  This is a guard against accidents (infinite loops, runaway memory,
stray files) in model-written code, not a security boundary; run untrusted workloads in a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass
class SandboxResult:
    """Outcome of :func:`run_python`: exit code (None when killed on timeout), captured output."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool


# Runs first in the child (instead of a preexec_fn, which is unsafe in threaded parents): applies the
# resource limits, then runs main.py as __main__.
_LAUNCHER = """import runpy, sys
try:
    import resource
except ImportError:
    resource = None
if resource is not None:
    mem, cpu, fsize, nproc = (int(v) for v in sys.argv[1:5])
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    if nproc > 0 and hasattr(resource, "RLIMIT_NPROC"):
        soft, hard = resource.getrlimit(resource.RLIMIT_NPROC)
        cap = nproc if soft == resource.RLIM_INFINITY else min(soft, nproc)
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (cap, hard))
        except (ValueError, OSError):
            pass
del sys.argv[1:5]
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    stdin: str = "",
    max_file_mb: int = 16,
    max_procs: int = 0,
    max_output_chars: int = 100_000,
) -> SandboxResult:
    """Run ``code`` as a script in a fresh ``python -I`` process (see module docstring).

    ``timeout_s`` is the wall-clock limit (CPU limit = ceil(timeout_s) + 1 s); ``memory_mb`` the
    address-space limit; ``max_procs > 0`` additionally caps the user's process count.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be >= 32 (the interpreter itself needs it), got {memory_mb}")
    with tempfile.TemporaryDirectory(prefix="flowalign_sandbox_") as tmp:
        with open(os.path.join(tmp, "main.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        launcher = os.path.join(tmp, "_launch.py")
        with open(launcher, "w", encoding="utf-8") as fh:
            fh.write(_LAUNCHER)
        limits = [str(memory_mb * 1024 * 1024), str(int(timeout_s) + 2), str(max_file_mb * 1024 * 1024),
                  str(max_procs)]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tmp, "TMPDIR": tmp,
               "PYTHONHASHSEED": "0", "PYTHONIOENCODING": "utf-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", launcher, *limits], cwd=tmp, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        try:
            out, err = proc.communicate(stdin, timeout=timeout_s)
            timed_out = False
            rc: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            timed_out = True
            rc = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
            out, err = proc.communicate()
    return SandboxResult(returncode=rc, stdout=out[:max_output_chars], stderr=err[:max_output_chars],
                         timed_out=timed_out)
