"""Run untrusted Python (a model's completion) and count the tests it passes, without trusting it with anything.

    result = run_python("def add(a, b):\\n    return a + b", tests=["assert add(1, 2) == 3"])
    result.fraction_passed          # 1.0

Two isolation modes (`isolation=`; "auto" picks the first that works on this machine, probed once per process):

``namespaces`` (preferred; needs util-linux `unshare` and either root or unprivileged user namespaces)
    The child starts under `unshare --net --pid --mount --ipc --uts --fork --kill-child` (plus `--user
    --map-root-user` when not root). Inside, `_sandbox_child.py`
      * makes a fresh tmpfs the root, holding only read-only binds of the interpreter (sys.prefix,
        sys.base_prefix), /usr and the library directories, a few device nodes (null, zero, full, random,
        urandom), a fresh /proc of the new pid namespace, and a private size-limited tmpfs at /sandbox which is the
        working directory and $HOME; it pivots into that root and detaches the host's tree, so the host's
        files (home directories, the project, other runs' data) are not reachable at all;
      * sets rlimits: CPU seconds, address space (RLIMIT_AS), processes (RLIMIT_NPROC), file size, open files,
        no core dumps;
      * as root: switches to a fresh random unprivileged uid (so RLIMIT_NPROC is enforced, which it is not for
        root, and no file of anyone else is writable), after dropping the capability bounding set; in a user
        namespace: drops every capability; then sets no_new_privs;
      * forks the program off and stays as pid 1 of the pid namespace: when the program finishes, or when the
        parent kills the process group on timeout, the kernel kills every process left in the namespace.
    The network namespace has only a loopback device that is down: nothing, not even 127.0.0.1, is reachable.
    The parent's pid is not visible from the pid namespace, and the sandbox uid may not signal it anyway.

``process`` (fallback, weaker)
    A plain child process in its own session, in an empty host temporary directory, with the same rlimits and,
    when root and the interpreter is readable by others, the same uid switch (when it is not, e.g. a pyenv
    under /root, the program stays root and a warning says so). An audit hook (PEP 578) refuses sockets,
    signals to other processes, new processes, ctypes/cffi, writes outside the working directory and reads
    outside it and the paths the jail would bind. An audit hook is a Python-level barrier: native code (a C
    extension that is already importable) can step around it.

Both modes: a clean environment (PATH, HOME, TMPDIR, LANG only: nothing of the trainer's), the interpreter in
isolated mode (-I: no PYTHON* variables, no user site, no current directory on sys.path), stdin from
/dev/null, stdout/stderr captured up to `max_output_bytes`, and a wall-clock timeout after which the whole
process group is killed with SIGKILL.

Why these mechanisms: RLIMIT_NPROC is not enforced for root, so a fork bomb is stopped by the uid switch (as
root) or the user namespace (otherwise) together with RLIMIT_NPROC, and cleaned up by the pid namespace; seccomp
is not used (no portable way from the standard library). tests/test_sandbox.py runs every hostile behaviour
(loops, sleeps, fork bombs, daemons, memory and output bombs, writes/deletes outside, reading secrets, sockets
to 127.0.0.1, signalling the trainer, setuid/mount/chroot) against both modes, and the namespace mode also as an
unprivileged user.

Not protected against: side channels and CPU/memory-bandwidth contention with the trainer; a kernel exploit;
memory use of up to max_processes x memory_mb in total (no cgroup memory limit is set up); reading what the jail
binds (the interpreter, its site-packages, /usr); and code that forges its own verdict (the tests run in the
program's own interpreter, so a program can e.g. override `__eq__` or write result lines itself) -- the sandbox
protects the machine, not the reward's honesty.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
MODES = ("auto", "namespaces", "process")
_UID_BASE = 1_500_000_000            # sandbox uids: _UID_BASE + random 24 bits (no passwd entry needed)
_SYSTEM_RO_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache",
                    "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime")
_GRACE = 0.5                         # seconds to drain pipes after the program exits


class SandboxError(RuntimeError):
    """The sandbox itself failed (not the program in it): no isolation available, or the jail did not start."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    timeout: float = 10.0            # wall-clock seconds for the whole run, start-up included
    cpu_seconds: int = 10            # RLIMIT_CPU per process
    memory_mb: int = 1024            # RLIMIT_AS per process (address space, so keep headroom over the RSS)
    max_processes: int = 32          # RLIMIT_NPROC for the sandbox uid (threads count too)
    disk_mb: int = 16                # size of the private /sandbox (namespaces) and RLIMIT_FSIZE per file
    max_open_files: int = 256        # RLIMIT_NOFILE
    max_output_bytes: int = 65536    # stdout and stderr are each kept up to this many bytes

    def __post_init__(self):
        for name in ("timeout", "cpu_seconds", "memory_mb", "max_processes", "disk_mb", "max_open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


@dataclass
class SandboxResult:
    """What happened in one run. `tests_passed[i]` is False for a test that failed or was never reached."""

    isolation: str
    ready: bool = False              # the jail was built and privileges dropped
    code_ok: bool = False            # the program itself ran to the end without an exception
    code_error: str = ""
    tests_passed: list[bool] = field(default_factory=list)
    test_errors: list[str] = field(default_factory=list)
    timed_out: bool = False
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0

    @property
    def fraction_passed(self) -> float:
        """Fraction of the tests that passed (0.0 with no tests)."""
        return sum(self.tests_passed) / len(self.tests_passed) if self.tests_passed else 0.0


def run_python(code: str, tests: list[str] | tuple[str, ...] = (), *, limits: SandboxLimits | None = None,
               isolation: str = "auto") -> SandboxResult:
    """Run `code`, then each statement block of `tests` in the same globals, in a sandbox; see the module doc.

    Raises SandboxError only when the sandbox cannot be set up; everything the program does (exceptions,
    timeouts, crashes, limits hit) is reported in the result.
    """
    limits = limits or SandboxLimits()
    mode = resolve_isolation(isolation)
    root = tempfile.mkdtemp(prefix="posttrain-sandbox-")
    uid = _sandbox_uid(mode)
    try:
        if uid is not None and mode == "process":
            os.chown(root, uid, uid)
        return _run(code, list(tests), limits, mode, root, uid)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def resolve_isolation(isolation: str = "auto") -> str:
    """The isolation mode that `run_python(isolation=...)` will use; raises SandboxError if it is unavailable."""
    if isolation not in MODES:
        raise ValueError(f"isolation must be one of {', '.join(MODES)}; got {isolation!r}")
    if isolation == "process":
        return "process"
    ok, reason = namespaces_available()
    if ok:
        return "namespaces"
    if isolation == "namespaces":
        raise SandboxError(f"namespace isolation is not available here: {reason}")
    _warn_once(f"code sandbox: namespace isolation is not available ({reason}); falling back to the weaker "
               "process mode (rlimits, uid switch when root, Python audit hook)")
    return "process"


_probe_lock = threading.Lock()
_probe: tuple[bool, str] | None = None
_warned: set[str] = set()


def namespaces_available() -> tuple[bool, str]:
    """(True, "") when a namespace sandbox starts and runs here (probed once per process), else (False, why)."""
    global _probe
    with _probe_lock:
        if _probe is None:
            _probe = _probe_namespaces()
        return _probe


def _probe_namespaces() -> tuple[bool, str]:
    if not sys.platform.startswith("linux"):
        return False, f"not Linux ({sys.platform})"
    if shutil.which("unshare") is None:
        return False, "util-linux `unshare` not found on PATH"
    root = tempfile.mkdtemp(prefix="posttrain-sandbox-probe-")
    try:
        uid = _sandbox_uid("namespaces")
        result = _run("print('ok')", ["assert True"], SandboxLimits(timeout=30), "namespaces", root, uid)
    except SandboxError as e:
        return False, str(e)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if result.tests_passed == [True] and result.stdout.strip() == "ok":
        return True, ""
    return False, f"probe run failed: {result.code_error or result.stderr.strip()[-300:]}"


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        log.warning(msg)


def _sandbox_uid(mode: str) -> int | None:
    """A fresh unprivileged uid when we are root (in process mode only if others can read the interpreter)."""
    if os.geteuid() != 0:
        return None
    if mode == "process" and not _readable_by_others(sys.base_prefix, sys.prefix, os.path.realpath(sys.executable)):
        _warn_once(f"code sandbox (process mode): the interpreter under {sys.base_prefix} is not readable by other "
                   "users, so the program keeps running as root (no RLIMIT_NPROC, no file-permission barrier)")
        return None
    return _UID_BASE + secrets.randbelow(1 << 24)


def _readable_by_others(*paths: str) -> bool:
    for path in paths:
        p = Path(path)
        for part in [*reversed(p.parents), p]:
            mode = os.stat(part).st_mode
            if not mode & stat.S_IXOTH or (part == p and not mode & stat.S_IROTH):
                return False
    return True


def _ro_paths() -> list[str]:
    """Host paths bound read-only into the jail: system libraries and this interpreter, parents first."""
    wanted = list(_SYSTEM_RO_PATHS)
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                   str(Path(os.path.realpath(sys.executable)).parent.parent)}:
        wanted.append(os.path.normpath(prefix))
    out: list[str] = []
    for path in sorted(set(wanted), key=lambda p: (p.count("/"), p)):
        covered = any(path == q or path.startswith(q.rstrip("/") + "/") for q in out if not os.path.islink(q))
        if not covered and os.path.lexists(path):
            out.append(path)
    return out


def _child_config(mode: str, root: str, uid: int | None, limits: SandboxLimits, result_fd: int) -> dict:
    return {
        "mode": mode, "root": root, "uid": uid, "userns": os.geteuid() != 0, "result_fd": result_fd,
        "ro_paths": _ro_paths(), "disk_mb": limits.disk_mb,
        "rlimits": {"cpu": int(limits.cpu_seconds), "as": limits.memory_mb << 20, "nproc": limits.max_processes,
                    "fsize": limits.disk_mb << 20, "nofile": limits.max_open_files, "core": 0},
    }


def _command(mode: str) -> list[str]:
    python = [sys.executable, "-I", CHILD]
    if mode == "process":
        return python
    userns = ["--user", "--map-root-user"] if os.geteuid() != 0 else []
    return ["unshare", *userns, "--net", "--pid", "--mount", "--ipc", "--uts", "--fork", "--kill-child", "--", *python]


def _clean_env(mode: str, root: str) -> dict[str, str]:
    home = "/sandbox" if mode == "namespaces" else root   # _sandbox_child.JAIL_WORKDIR
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8"}


def _run(code: str, tests: list[str], limits: SandboxLimits, mode: str, root: str, uid: int | None) -> SandboxResult:
    start = time.monotonic()
    result_r, result_w = os.pipe()
    cfg = _child_config(mode, root, uid, limits, result_w)
    payload = json.dumps({"code": code, "tests": tests, "config": cfg}).encode()
    try:
        proc = subprocess.Popen(_command(mode), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=(result_w,), env=_clean_env(mode, root),
                                cwd=root if mode == "process" else "/", start_new_session=True)
    except OSError as e:
        os.close(result_r)
        raise SandboxError(f"cannot start the sandbox: {e}") from None
    finally:
        os.close(result_w)
    try:
        streams, timed_out = _pump(proc, payload, result_r, limits, start + limits.timeout)
    finally:
        _kill_group(proc)
        os.close(result_r)
    res = SandboxResult(isolation=mode, timed_out=timed_out, returncode=proc.returncode,
                        stdout=streams["stdout"].decode(errors="replace"),
                        stderr=streams["stderr"].decode(errors="replace"), seconds=time.monotonic() - start,
                        tests_passed=[False] * len(tests), test_errors=[""] * len(tests))
    _read_events(streams["result"], res)
    if not res.ready and not timed_out:
        raise SandboxError(f"the {mode} sandbox did not start (exit code {proc.returncode}): "
                           f"{res.stderr.strip()[-500:]}")
    if not res.ready:
        res.code_error = f"the sandbox did not start within the {limits.timeout}s timeout"
    elif timed_out and not res.code_error:
        res.code_error = f"timed out after {limits.timeout}s"
    return res


def _pump(proc: subprocess.Popen, payload: bytes, result_r: int, limits: SandboxLimits, deadline: float):
    """Feed stdin, collect stdout/stderr (bounded) and the result pipe until EOF, exit + grace, or the deadline."""
    caps = {"stdout": limits.max_output_bytes, "stderr": limits.max_output_bytes, "result": 1 << 20}
    bufs = {name: bytearray() for name in caps}
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
    sel.register(proc.stdout.fileno(), selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    sel.register(result_r, selectors.EVENT_READ, "result")
    view, exited_at, timed_out = memoryview(payload), None, False
    try:
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > _GRACE:
                break                                       # something outside the program holds a pipe open
            for key, _ in sel.select(timeout=min(0.05, deadline - now)):
                name = key.data
                if name == "stdin":
                    try:
                        view = view[os.write(key.fd, view[:65536]):]
                    except BlockingIOError:
                        continue
                    except BrokenPipeError:                 # the child is gone; what it read is all it gets
                        view = view[:0]
                    if not len(view):
                        sel.unregister(key.fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                room = caps[name] - len(bufs[name])
                if room > 0:
                    bufs[name] += chunk[:room]
    finally:
        sel.close()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if not stream.closed:
                try:
                    stream.close()
                except OSError:
                    pass
    return {k: bytes(v) for k, v in bufs.items()}, timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole process group (the leader is unreaped until wait, so the group id cannot be reused)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_events(raw: bytes, res: SandboxResult) -> None:
    for line in raw.decode(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if not isinstance(event, dict):
            continue
        kind = event.get("event")
        if kind == "ready":
            res.ready = True
        elif kind == "code":
            res.code_ok, res.code_error = bool(event.get("ok")), str(event.get("error", ""))
        elif kind == "exit" and isinstance(event.get("code"), int) and event["code"] < 0 and not res.code_error:
            res.code_error = f"the program was killed by {_signal_name(-event['code'])}"
        elif kind == "test" and isinstance(event.get("index"), int) and 0 <= event["index"] < len(res.tests_passed):
            res.tests_passed[event["index"]] = bool(event.get("ok"))
            res.test_errors[event["index"]] = str(event.get("error", ""))


def _signal_name(number: int) -> str:
    reasons = {signal.SIGXCPU: " (CPU time limit)", signal.SIGXFSZ: " (file size limit)", signal.SIGKILL: ""}
    try:
        return signal.Signals(number).name + reasons.get(number, "")
    except ValueError:
        return f"signal {number}"
