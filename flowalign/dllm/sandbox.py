"""Run untrusted Python in a separate, resource-limited process (for the ``code`` task). POSIX only.

Process layout: the caller starts a small *supervisor* (``python -I -S``, same user as the caller), which
marks itself a child subreaper (``prctl(PR_SET_CHILD_SUBREAPER)``, Linux) and forks the sandboxed
child: the child starts a new session (own process group), applies the resource limits, drops
privileges when the caller is root, and execs ``python -I main.py`` in a fresh temporary directory with
a minimal environment (``PATH``, ``LANG``, ``HOME``/``TMPDIR`` = that directory; nothing inherited).

What is enforced:

* **Wall-clock limit**, measured by the caller without waiting for end-of-file on the output pipes: at the
  deadline the supervisor kills the whole process tree and ``run_python`` returns (within about
  ``timeout_s`` + a fraction of a second; a 2 s hard grace if the supervisor does not answer).
* **The whole process tree dies with every call**: when the child exits, times out or overflows its
  output, the supervisor SIGKILLs its process group and then every descendant, repeatedly, until it has
  none left.  Because the supervisor is a subreaper, descendants that ``setsid()`` or double-fork are
  re-parented to it, not to init, so they cannot escape.  The supervisor dies with the caller
  (``PR_SET_PDEATHSIG``) and cleans up on the way; the child dies with the supervisor.
* **Bounded output**: stdout and stderr are read in chunks while the child runs; beyond
  ``max_output_bytes`` per stream the rest is discarded, the tree is killed and ``truncated`` is set, so
  the caller's memory stays bounded whatever the child prints.
* **Privilege drop when the caller is root** (``drop_privileges=None``, the default, or ``True``): the child
  runs as ``sandbox_uid``/``sandbox_gid`` (default ``nobody``/``nogroup``, 65534) with no supplementary
  groups and ``PR_SET_NO_NEW_PRIVS``.  It then cannot signal the caller or the supervisor, cannot read
  their ``/proc/<pid>/environ`` (or any file only root can read), and ``max_procs`` (``RLIMIT_NPROC``,
  which the kernel ignores for root) becomes effective.  When the caller's interpreter is not
  accessible to that user (e.g. pyenv under ``/root``), a system ``pythonX.Y`` of the same version is used
  instead.  ``SandboxResult.privileges_dropped`` says whether it happened; ``drop_privileges=True``
  raises ``RuntimeError`` instead of running with the caller's privileges.
* **rlimits**: address space (``memory_mb``), CPU time (``ceil(timeout_s) + 1`` s), file size
  (``max_file_mb``), no core files, and ``max_procs`` when > 0.

What is NOT enforced: network access; reading world-readable files (your code, your datasets, the
command lines of all processes in ``/proc``); writing into world-writable directories (``/tmp``,
``/dev/shm``) within the file-size limit; and, when the caller is not root (no privilege drop), anything
the caller's user may do: the child can read the caller's environment through ``/proc``, signal the
caller and kill the supervisor (after which setsid'd descendants can outlive the call).
``RLIMIT_NPROC`` counts *all* processes of the sandbox user, including other sandboxes running at the
same time (which, sharing the user, can also signal each other).  This is a guard against accidents and
casual abuse by model-written code, not a security boundary; run untrusted workloads in a container or VM.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache

NOBODY = 65534
_GRACE_S = 2.0  # how long the caller waits for the supervisor to clean up before killing it itself
_CHUNK = 65536
_warned: set[str] = set()


@dataclass
class SandboxResult:
    """Outcome of :func:`run_python`.

    ``returncode``: the child's exit status (negative signal number if it died of a signal), ``None`` when
    it was killed by the sandbox (timeout or output overflow) or could not start.  ``stdout``/``stderr``:
    the first ``max_output_bytes`` of each stream, decoded as UTF-8 (invalid bytes replaced).
    ``timed_out``: the wall-clock limit was hit.  ``truncated``: a stream exceeded ``max_output_bytes``
    (the child was then killed).  ``privileges_dropped``: the child ran as the sandbox user rather than
    as the caller's user.  ``error``: why the child could not be started, if it could not.
    """

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool
    truncated: bool = False
    privileges_dropped: bool = False
    error: str | None = None


# The supervisor (see module docstring).  argv[1] is a JSON config; it reports on the status fd, one line
# per event: "started <pid> <dropped 0|1>", "exit <code>", "error <text>", "stopped", "done".
_SUPERVISOR = r'''
import json, os, resource, signal, sys, time  # imported now: after the privilege drop the stdlib may be unreadable
cfg = json.loads(sys.argv[1])
STATUS = cfg["status_fd"]

def report(line):
    try:
        os.write(STATUS, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
    except OSError:
        pass

class Stop(BaseException):
    pass

def on_signal(signum, frame):
    raise Stop(signum)

for _s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM):
    signal.signal(_s, on_signal)

try:
    import ctypes
    _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl

    def prctl(option, arg):
        c = ctypes.c_ulong
        return _libc_prctl(ctypes.c_int(option), c(arg), c(0), c(0), c(0))
except Exception:
    prctl = None

PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
if prctl is not None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
if os.getppid() != cfg["caller_pid"]:
    os._exit(3)
ME = os.getpid()

def children():
    try:
        with open("/proc/%d/task/%d/children" % (ME, ME)) as fh:
            return [int(p) for p in fh.read().split()]
    except (OSError, ValueError):
        pass
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name, "rb") as fh:
                    data = fh.read()
                if int(data[data.rindex(b")") + 2:].split()[1]) == ME:
                    out.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out

def kill_tree(pgid):
    if pgid:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    while True:
        kids = children()
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            pid, _ = os.waitpid(-1, 0 if kids else os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.005)

def run_child(errw):
    os.setsid()
    uid, gid = cfg["uid"], cfg["gid"]
    dropped = 0
    if uid >= 0:
        try:
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            dropped = 1
        except OSError:
            if cfg["require_drop"]:
                raise
    if prctl is not None:
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != ME:
        os._exit(3)
    os.chdir(cfg["cwd"])
    if dropped and not os.access(cfg["argv"][0], os.X_OK):
        raise PermissionError("the sandbox user cannot execute %s" % cfg["argv"][0])
    for name, value in cfg["limits"]:
        which = getattr(resource, name, None)
        if which is None:
            continue
        soft, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))
    for _s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(_s, signal.SIG_DFL)
    os.close(STATUS)
    os.write(errw, b"P%d" % dropped)
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])

child = 0
try:
    signal.alarm(cfg["hard_timeout"])
    errr, errw = os.pipe()  # close-on-exec: EOF tells the supervisor the exec happened
    child = os.fork()
    if child == 0:
        try:
            os.close(errr)
            run_child(errw)
        except BaseException as exc:
            try:
                os.write(errw, ("E%s: %s" % (type(exc).__name__, exc)).encode("utf-8", "replace")[:2000])
            finally:
                os._exit(127)
    os.close(errw)
    msg = b""
    while True:
        chunk = os.read(errr, 4096)
        if not chunk:
            break
        msg += chunk
    os.close(errr)
    if b"E" in msg:
        report("error " + msg[msg.index(b"E") + 1:].decode("utf-8", "replace"))
    else:
        report("started %d %s" % (child, msg[1:2].decode() or "0"))
        _, status = os.waitpid(child, 0)
        report("exit %d" % os.waitstatus_to_exitcode(status))
except Stop:
    report("stopped")
finally:
    for _s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM):
        signal.signal(_s, signal.SIG_IGN)
    signal.alarm(0)
    kill_tree(child)
    report("done")
os._exit(0)
'''


def _mode_bits(st: os.stat_result, uid: int, gid: int) -> int:
    if st.st_uid == uid:
        return (st.st_mode >> 6) & 7
    if st.st_gid == gid:
        return (st.st_mode >> 3) & 7
    return st.st_mode & 7


def _accessible(path: str, uid: int, gid: int, want: int) -> bool:
    """Whether ``uid``/``gid`` (no supplementary groups) can search every directory leading to ``path``
    and has the ``want`` permission bits (4 read, 2 write, 1 execute/search) on it.  Checks both the
    path as given and its symlink-resolved form.  Mode bits only (ACLs are ignored)."""
    for p in {os.path.abspath(path), os.path.realpath(path)}:
        parts = p.split(os.sep)
        try:
            for i in range(1, len(parts)):
                d = os.sep.join(parts[:i]) or os.sep
                if not _mode_bits(os.stat(d), uid, gid) & 1:
                    return False
            if _mode_bits(os.stat(p), uid, gid) & want != want:
                return False
        except OSError:
            return False
    return True


@lru_cache(maxsize=8)
def _interpreter_for(uid: int, gid: int) -> str | None:
    """A Python interpreter the sandbox user can run: the caller's own if its binary, standard library
    and shared libpython are accessible, else a system ``pythonX.Y`` of the same version, else None."""
    needs = [(sys.executable, 5)]
    stdlib = sysconfig.get_paths().get("stdlib")
    if stdlib:
        needs.append((stdlib, 5))
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        lib = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
        if os.path.isfile(lib):
            needs.append((lib, 4))
    if all(_accessible(p, uid, gid, w) for p, w in needs):
        return sys.executable
    name = "python%d.%d" % sys.version_info[:2]
    for d in ("/usr/bin", "/usr/local/bin", "/bin"):
        cand = os.path.join(d, name)
        if os.path.isfile(cand) and _accessible(cand, uid, gid, 5):
            return cand
    return None


def _signal_process(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
        except OSError:
            pass


def run_python(
    code: str,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    stdin: str = "",
    max_file_mb: int = 16,
    max_procs: int = 0,
    max_output_bytes: int = 1_000_000,
    drop_privileges: bool | None = None,
    sandbox_uid: int = NOBODY,
    sandbox_gid: int = NOBODY,
) -> SandboxResult:
    """Run ``code`` as ``main.py`` in a fresh ``python -I`` process (see the module docstring).

    ``timeout_s``: wall-clock limit (CPU limit = ceil(timeout_s) + 1 s).  ``memory_mb``: address-space
    limit.  ``stdin``: text fed to the child's standard input.  ``max_procs > 0``: ``RLIMIT_NPROC`` for
    the child (counts every process of the user it runs as; ignored by the kernel for root, so only
    effective with the privilege drop).  ``max_output_bytes``: cap per output stream.
    ``drop_privileges``: None = drop to ``sandbox_uid``/``sandbox_gid`` when the caller is root and it
    is possible, True = require it (RuntimeError otherwise), False = never.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if memory_mb < 32:
        raise ValueError(f"memory_mb must be >= 32 (the interpreter itself needs it), got {memory_mb}")
    if max_output_bytes < 0:
        raise ValueError(f"max_output_bytes must be >= 0, got {max_output_bytes}")
    if os.name != "posix" or not hasattr(os, "fork"):
        raise NotImplementedError("run_python needs a POSIX system")
    is_root = os.geteuid() == 0
    if drop_privileges and not is_root:
        raise RuntimeError("drop_privileges=True needs the caller to run as root")
    want_drop = is_root if drop_privileges is None else bool(drop_privileges)
    if want_drop and (sandbox_uid <= 0 or sandbox_gid <= 0):
        raise ValueError(f"sandbox_uid/sandbox_gid must be unprivileged ids (> 0), got {sandbox_uid}/{sandbox_gid}")
    interpreter = sys.executable
    base_dir = tempfile.gettempdir()
    if want_drop:
        why = None
        found = _interpreter_for(sandbox_uid, sandbox_gid)
        if found is None:
            why = f"no Python {sys.version_info[0]}.{sys.version_info[1]} interpreter is accessible to uid {sandbox_uid}"
        if not _accessible(base_dir, sandbox_uid, sandbox_gid, 1):
            base_dir = "/tmp"
            if not _accessible(base_dir, sandbox_uid, sandbox_gid, 1):
                why = f"no temporary directory is reachable by uid {sandbox_uid}"
        if why is not None:
            if drop_privileges:
                raise RuntimeError(f"cannot drop privileges: {why}")
            if why not in _warned:
                _warned.add(why)
                warnings.warn(f"run_python: the caller is root but the sandboxed code runs as root too ({why}); "
                              f"it can read the caller's /proc entries and signal it (see SandboxResult."
                              f"privileges_dropped)", RuntimeWarning, stacklevel=2)
            want_drop = False
            base_dir = tempfile.gettempdir()
        else:
            interpreter = found  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="flowalign_sandbox_", dir=base_dir) as tmp:
        main_py = os.path.join(tmp, "main.py")
        with open(main_py, "w", encoding="utf-8") as fh:
            fh.write(code)
        if want_drop:
            os.chown(tmp, sandbox_uid, sandbox_gid)
            os.chown(main_py, sandbox_uid, sandbox_gid)
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": tmp, "TMPDIR": tmp}
        limits = [["RLIMIT_AS", memory_mb * 1024 * 1024], ["RLIMIT_CPU", math.ceil(timeout_s) + 1],
                  ["RLIMIT_FSIZE", max_file_mb * 1024 * 1024], ["RLIMIT_CORE", 0]]
        if max_procs > 0:
            limits.append(["RLIMIT_NPROC", int(max_procs)])
        status_r, status_w = os.pipe()
        cfg = {"status_fd": status_w, "caller_pid": os.getpid(), "uid": sandbox_uid if want_drop else -1,
               "gid": sandbox_gid if want_drop else -1, "require_drop": bool(drop_privileges), "cwd": tmp,
               "argv": [interpreter, "-I", "main.py"], "env": env, "limits": limits,
               "hard_timeout": math.ceil(timeout_s) + 5}
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin.encode("utf-8"))
            stdin_file.flush()
            stdin_file.seek(0)
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _SUPERVISOR, json.dumps(cfg)], stdin=stdin_file,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,), cwd=tmp,
                    env={"PATH": env["PATH"], "LANG": "C.UTF-8"}, start_new_session=True, close_fds=True,
                )
            finally:
                os.close(status_w)
            try:
                out, err, status, timed_out, truncated = _collect(proc, status_r, timeout_s, max_output_bytes)
            finally:
                os.close(status_r)
    return _result(out, err, status, timed_out, truncated, bool(drop_privileges))


def _read_chunk(fd: int) -> bytes:
    """Up to one chunk from a ready pipe; ``b""`` at end of file or on a read error."""
    try:
        return os.read(fd, _CHUNK)
    except OSError:
        return b""


def _append_capped(buf: bytearray, data: bytes, cap: int) -> bool:
    """Append what fits of ``data`` under ``cap`` bytes to ``buf``; True when some of it did not fit."""
    room = cap - len(buf)
    if room > 0:
        buf += data[:room]
    return len(data) > room


def _collect(proc: subprocess.Popen, status_r: int, timeout_s: float, cap: int):
    """Read stdout/stderr/status until the supervisor is done, enforcing the deadline and the output cap."""
    assert proc.stdout is not None and proc.stderr is not None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    fds = {out_fd: bytearray(), err_fd: bytearray()}
    status = bytearray()
    sel = selectors.DefaultSelector()
    for fd in (*fds, status_r):
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    stop_at: float | None = None
    timed_out = truncated = killed = status_eof = False
    child_pid = None
    try:
        while True:
            now = time.monotonic()
            if stop_at is None and now >= deadline:
                timed_out, stop_at = True, now
                _signal_process(proc, signal.SIGTERM)
            if stop_at is not None and not killed and now >= stop_at + _GRACE_S:
                killed = True  # the supervisor did not clean up in time: kill it and the child's group
                _signal_process(proc, signal.SIGKILL)
                if child_pid is not None and b"\ndone" not in status:
                    try:
                        os.killpg(child_pid, signal.SIGKILL)
                    except OSError:
                        pass
            if status_eof and proc.poll() is not None:
                break
            if killed and now >= stop_at + _GRACE_S + 0.5:  # type: ignore[operator]
                break
            wait = 0.05 if stop_at is not None or status_eof else max(0.0, min(deadline - now, 0.5))
            for key, _ in sel.select(wait):
                data = _read_chunk(key.fd)
                if not data:
                    sel.unregister(key.fd)
                    if key.fd == status_r:
                        status_eof = True
                    continue
                if key.fd == status_r:
                    if len(status) < _CHUNK:
                        status += data
                        if child_pid is None and status.startswith(b"started "):
                            child_pid = int(status.split()[1])
                    continue
                if _append_capped(fds[key.fd], data, cap):
                    truncated = True
                    if stop_at is None:
                        stop_at = now
                        _signal_process(proc, signal.SIGTERM)
        # the supervisor is gone and has killed the tree: drain what is left in the pipes, briefly
        end = time.monotonic() + 0.5
        while sel.get_map() and time.monotonic() < end:
            ready = sel.select(0.05)
            for key, _ in ready:
                data = _read_chunk(key.fd)
                if not data:
                    sel.unregister(key.fd)
                    continue
                if key.fd in fds and _append_capped(fds[key.fd], data, cap):
                    truncated = True
    finally:  # also on KeyboardInterrupt & co.: let the supervisor clean up, then make sure
        sel.close()
        if proc.poll() is None:
            _signal_process(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=_GRACE_S)
            except subprocess.TimeoutExpired:
                _signal_process(proc, signal.SIGKILL)
                if child_pid is not None:
                    try:
                        os.killpg(child_pid, signal.SIGKILL)
                    except OSError:
                        pass
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    return bytes(fds[out_fd]), bytes(fds[err_fd]), bytes(status), timed_out, truncated


def _result(out: bytes, err: bytes, status: bytes, timed_out: bool, truncated: bool,
            require_drop: bool) -> SandboxResult:
    returncode: int | None = None
    dropped = False
    error = None
    for line in status.decode("utf-8", "replace").splitlines():
        word, _, rest = line.partition(" ")
        if word == "started":
            dropped = rest.split()[-1:] == ["1"]
        elif word == "exit" and rest.lstrip("-").isdigit():
            returncode = int(rest)
        elif word == "error":
            error = rest
    if b"done" not in status.split(b"\n") and error is None and not timed_out:
        error = "the sandbox supervisor ended unexpectedly"
    if error is not None and require_drop and not dropped:
        raise RuntimeError(f"sandbox could not start the child with dropped privileges: {error}")
    if timed_out or truncated:
        returncode = None
    return SandboxResult(returncode=returncode, stdout=out.decode("utf-8", "replace"),
                         stderr=err.decode("utf-8", "replace"), timed_out=timed_out, truncated=truncated,
                         privileges_dropped=dropped, error=error)
