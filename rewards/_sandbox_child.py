"""The process that runs untrusted code for `rewards/sandbox.py` (standard library only; run as a script).

The parent starts it (inside fresh namespaces when available) and writes one JSON object to its stdin:
    {"code": str, "tests": [str], "config": {...}}        (config: see `rewards/sandbox.py::_child_config`)
It then
  1. builds the jail (namespace mode): a fresh tmpfs as the root holding read-only binds of the interpreter and
     the system libraries only, a fresh /proc for the new pid namespace, a few device nodes, and a private
     size-limited tmpfs at /sandbox that is the working directory; pivots into it and detaches the host's tree;
  2. sets the resource limits, drops to the sandbox uid (or, in a user namespace, drops every capability),
     sets no_new_privs; in process mode installs an audit hook instead of the jail;
  3. forks: the child runs the code and then each test in the same globals, the parent waits (it is pid 1 of
     the pid namespace: when it exits the kernel kills every process left inside).
Results go to the result file descriptor, one JSON line per event, so partial results survive a later kill:
    {"event": "ready"}  {"event": "code", "ok": ..., "error": ...}
    {"event": "test", "index": i, "ok": ..., "error": ...}
stdout and stderr belong to the untrusted code.
"""
import ctypes
import json
import os
import resource
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_SET_DUMPABLE = 38, 24, 4
PIVOT_ROOT_SYSCALL = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217, "riscv64": 41}
DEVICES = ("null", "zero", "full", "random", "urandom")

_libc = ctypes.CDLL(None, use_errno=True)



JAIL_WORKDIR = "/sandbox"  # the private tmpfs inside the jail: working directory, HOME and TMPDIR

def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def _carried_flags(path: str) -> int:
    """Flags of the mount holding `path` that a bind remount must keep (locked ones in a user namespace)."""
    st = os.statvfs(path).f_flag
    flags = 0
    for st_bit, ms_bit in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
                           (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME),
                           (os.ST_RELATIME, MS_RELATIME)):
        if st & st_bit:
            flags |= ms_bit
    return flags


def _bind_ro(source: str, target: str, extra: int = MS_NOSUID) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    _mount(source, target, None, MS_BIND)
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra | _carried_flags(source))


def _pivot_root(new_root: str, put_old: str) -> None:
    import platform

    number = PIVOT_ROOT_SYSCALL.get(platform.machine())
    if number is not None:
        _check(_libc.syscall(ctypes.c_long(number), new_root.encode(), put_old.encode()), "pivot_root")
        return
    import subprocess  # an architecture without a known syscall number: util-linux's pivot_root

    subprocess.run(["pivot_root", new_root, put_old], check=True)


def build_jail(cfg: dict) -> None:
    """Make `cfg["root"]` (an empty host directory) the root of this mount namespace, holding only read-only binds."""
    root = cfg["root"]
    _mount(None, "/", None, MS_REC | MS_PRIVATE)                      # nothing we do propagates to the host
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    for path in cfg["ro_paths"]:                                       # parents before children, deduplicated
        if os.path.islink(path):
            os.makedirs(os.path.dirname(root + path), exist_ok=True)
            os.symlink(os.readlink(path), root + path)
        elif os.path.exists(path):
            _bind_ro(path, root + path)
    os.makedirs(root + "/dev", exist_ok=True)
    for dev in DEVICES:
        if os.path.exists("/dev/" + dev):
            _bind_ro("/dev/" + dev, f"{root}/dev/{dev}", extra=MS_NOSUID | MS_NOEXEC)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"{root}/dev/{name}")
    os.makedirs(root + "/dev/shm")
    _mount("tmpfs", root + "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           "size=1m,mode=1777")
    os.makedirs(root + "/proc")
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)   # this pid namespace's only
    os.makedirs(root + JAIL_WORKDIR)  # not /tmp: the interpreter itself may live under the host's /tmp
    owner = f",uid={cfg['uid']},gid={cfg['uid']}" if cfg.get("uid") is not None else ""
    _mount("tmpfs", root + JAIL_WORKDIR, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0700{owner}")
    if not os.path.lexists(root + "/tmp"):  # programs that hard-code /tmp write into the private tmpfs too
        os.symlink(JAIL_WORKDIR, root + "/tmp")
    os.makedirs(root + "/.old_root")
    _pivot_root(root, root + "/.old_root")
    os.chdir("/")
    _check(_libc.umount2(b"/.old_root", MNT_DETACH), "umount old root")
    os.rmdir("/.old_root")
    _mount(None, "/", None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)   # the skeleton itself is read-only


def set_limits(cfg: dict) -> None:
    limits = cfg["rlimits"]
    for name, value in limits.items():
        kind = getattr(resource, f"RLIMIT_{name.upper()}")
        hard = value + 1 if name == "cpu" else value   # soft CPU limit: SIGXCPU; hard: SIGKILL one second later
        resource.setrlimit(kind, (value, hard))


def drop_privileges(cfg: dict) -> None:
    """Root: switch to the sandbox uid/gid (clears every capability). User namespace: drop every capability."""
    cap_file = "/proc/sys/kernel/cap_last_cap"
    last_cap = int(open(cap_file).read()) if os.path.exists(cap_file) else 63
    if os.geteuid() == 0:
        for cap in range(last_cap + 1):            # no capability can come back through exec of a setuid file
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    uid = cfg.get("uid")
    if uid is not None and os.geteuid() == 0 and not cfg.get("userns"):
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    elif os.geteuid() == 0:                        # uid 0 of a user namespace: empty capability sets
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)            # _LINUX_CAPABILITY_VERSION_3, this process
        data = (ctypes.c_uint32 * 6)()
        _check(_libc.capset(header, data), "capset")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(no_new_privs)")
    _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)       # no ptrace and no /proc/<pid>/mem of the sandbox by itself


def install_audit_hook(workdir: str, readable: list) -> None:
    """Process mode only (no namespaces): a Python-level version of the jail.

    Refuses sockets, signals to other processes, new processes, ctypes/cffi, writes outside `workdir` and reads
    outside `workdir` plus the `readable` paths (the interpreter and system libraries, as bound in the jail).
    Native code can step around an audit hook, which is why namespace mode is preferred.
    """
    me = os.getpid()
    work = os.path.realpath(workdir)
    allowed = [work] + [os.path.realpath(p) for p in readable] + ["/dev/null", "/dev/zero", "/dev/urandom",
                                                                   "/dev/random", f"/proc/{me}", "/proc/self"]
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    changes = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2,
               "os.chmod": 1, "os.chown": 1, "os.truncate": 1, "os.utime": 1, "shutil.rmtree": 1}
    listings = ("os.listdir", "os.scandir", "os.chdir", "os.chroot")

    def under(path, roots) -> bool:
        if isinstance(path, int) or path is None:
            return True
        real = os.path.realpath(os.fsdecode(path))
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)

    def hook(event, args):
        if event.startswith("socket."):
            raise PermissionError(f"sandbox: network is disabled ({event})")
        if event in ("os.kill", "os.killpg") and args[0] not in (me, 0):
            raise PermissionError("sandbox: signals to other processes are disabled")
        if event in ("os.fork", "os.forkpty", "os.posix_spawn", "os.exec", "subprocess.Popen", "os.system"):
            raise PermissionError(f"sandbox: new processes are disabled in process mode ({event})")
        if event == "import" and args[0] in ("ctypes", "_ctypes", "cffi", "_posixsubprocess"):
            raise ImportError(f"sandbox: module {args[0]!r} is disabled")
        if event == "open":
            path, mode, flags = args
            writing = (flags or 0) & write_flags or (isinstance(mode, str) and set(mode) & set("wax+"))
            if not under(path, [work] if writing else allowed):
                raise PermissionError(f"sandbox: {'writing' if writing else 'reading'} {path!r} is disabled")
        if event in changes and not all(under(a, [work]) for a in args[: changes[event]]):
            raise PermissionError(f"sandbox: changing files outside the working directory is disabled ({event})")
        if event in listings and args and not under(args[0] if args[0] != "." else work, allowed):
            raise PermissionError(f"sandbox: {event} of {args[0]!r} is disabled")

    sys.addaudithook(hook)


def _report(fd: int, **event) -> None:
    try:
        os.write(fd, (json.dumps(event) + "\n").encode())
    except OSError:
        pass


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def run_untrusted(code: str, tests: list, fd: int) -> None:
    """The program, then each test, in one module namespace; every outcome reported as it happens."""
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    try:
        exec(compile(code, "<completion>", "exec"), namespace)
        _report(fd, event="code", ok=True, error="")
    except BaseException as e:  # noqa: BLE001  (SystemExit and KeyboardInterrupt too: the program's own fault)
        _report(fd, event="code", ok=False, error=_short(e))
        return
    for i, test in enumerate(tests):
        try:
            exec(compile(test, f"<test {i}>", "exec"), namespace)
            _report(fd, event="test", index=i, ok=True, error="")
        except BaseException as e:  # noqa: BLE001
            _report(fd, event="test", index=i, ok=False, error=_short(e))


def main() -> None:
    payload = json.loads(sys.stdin.buffer.read())
    cfg = payload["config"]
    fd = cfg["result_fd"]
    if cfg["mode"] == "namespaces":
        build_jail(cfg)
        os.chdir(JAIL_WORKDIR)
    else:
        os.chdir(cfg["root"])
    set_limits(cfg)
    drop_privileges(cfg)
    devnull = os.open("/dev/null", os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if cfg["mode"] != "namespaces":
        install_audit_hook(cfg["root"], cfg["ro_paths"])
    _report(fd, event="ready")
    sys.stdout.flush()
    try:
        pid = os.fork() if cfg["mode"] == "namespaces" else 0
    except OSError as e:
        _report(fd, event="code", ok=False, error=_short(e))
        os._exit(1)
    if pid == 0:
        status = 0
        try:
            run_untrusted(payload["code"], payload["tests"], fd)
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            status = 1
        os._exit(status)
    while True:  # pid 1 of the namespace: reap everything; leave (killing the rest) when the program is done
        try:
            done, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if done == pid:
            code = os.waitstatus_to_exitcode(status)
            _report(fd, event="exit", code=code)
            os._exit(code & 0xFF)


if __name__ == "__main__":
    main()
