"""The code sandbox against hostile completions: the test process survives, the reward is 0, nothing outside the
sandbox changes, nothing leaks in, nothing is left running, and the wall time stays bounded.

Every hostile program ends with `def f(): return 1` and is scored with the test `assert f() == 1`: it earns 1.0
only if its hostile first part ran to completion (the control test shows that scaffold earning 1.0), so a reward
of 0.0 shows the hostile part was stopped. Network tests only ever address 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from posttrain import rewards
from posttrain.rewards import sandbox
from posttrain.rewards.sandbox import SandboxError, SandboxLimits, run_python

# Every test here checks that no sandbox-uid process outlives its run, machine-wide: under pytest-xdist they share one
# worker with the other tests that start sandboxes (README's test command uses --dist loadgroup).
pytestmark = pytest.mark.xdist_group("sandbox")

REPO = Path(__file__).resolve().parents[1]
LIMITS = dict(timeout=3.0, cpu_seconds=2, memory_mb=512, max_processes=16)
WALL_MARGIN = 6.0           # seconds beyond the timeout allowed for start-up and teardown on a busy machine
SCAFFOLD = "\ndef f():\n    return 1\n"
TESTS = ["assert f() == 1"]


def namespaces_or_skip():
    ok, why = sandbox.namespaces_available()
    if not ok and os.environ.get("POSTTRAIN_REQUIRE_NAMESPACES") == "1":  # CI: a broken jail must fail, not skip
        pytest.fail(f"namespace isolation is required here but did not start: {why}")
    if not ok:
        pytest.skip(f"namespace isolation is not available on this machine: {why}")


def score(program: str, isolation: str) -> tuple[float, float]:
    """(reward of the `code` reward, wall seconds) for one hostile program followed by the scaffold."""
    start = time.monotonic()
    value = rewards.code(["p"], [program + SCAFFOLD], tests=[TESTS], isolation=isolation, **LIMITS)[0]
    return value, time.monotonic() - start


def sandbox_uid_processes(uids: set[int] | None = None) -> list[int]:
    """Live processes owned by a sandbox uid (rewards/sandbox.py draws them from _UID_BASE + 24 bits), or by one of
    `uids` (the ones this test's runs were given: other tests' sandboxes may be running in parallel)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            uid_line = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("Uid:"))
        except (OSError, StopIteration):
            continue
        uid = int(uid_line.split()[1])
        if uid in uids if uids is not None else sandbox._UID_BASE <= uid < sandbox._UID_BASE + (1 << 24):
            found.append(int(entry.name))
    return found


def wait_until_no_sandbox_processes(seconds: float = 3.0, uids: set[int] | None = None) -> list[int]:
    deadline = time.monotonic() + seconds
    while (left := sandbox_uid_processes(uids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Things a hostile program goes after: a canary file and a secret file that file permissions do NOT protect (a
    world-writable directory under /tmp, a world-writable canary, a world-readable secret: only the sandbox stands
    in the way), an env secret, a TCP and a UDP server on 127.0.0.1, a sibling process, and the directory where
    sandboxes make their temporary directories."""
    exposed = Path(tempfile.mkdtemp(prefix="posttrain-test-exposed-", dir="/tmp"))
    exposed.chmod(0o777)
    canary = exposed / "canary.txt"
    canary.write_text("original")
    canary.chmod(0o666)
    secret = exposed / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o644)
    (tmp_path / "private.txt").write_text("private")
    monkeypatch.setenv("POSTTRAIN_TEST_SECRET", "hunter2")
    sandbox_tmp = tmp_path / "sandbox-tmp"
    sandbox_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(sandbox_tmp))
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)       # a connection or datagram would be queued by the kernel: no need to wait at the end
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    sibling = subprocess.Popen(["sleep", "120"])
    before = sorted(p.name for p in tmp_path.iterdir()), sorted(p.name for p in exposed.iterdir())
    env = {"canary": str(canary), "secret": str(secret), "dir": str(exposed), "tcp": tcp.getsockname()[1],
           "udp": udp.getsockname()[1], "pid": os.getpid(), "pgid": os.getpgid(0), "sibling": sibling.pid,
           "host_tmp_file": f"/tmp/posttrain-canary-{uuid.uuid4().hex}"}
    yield env
    try:
        assert canary.read_text() == "original", "a sandboxed program changed a file outside its directory"
        after = sorted(p.name for p in tmp_path.iterdir()), sorted(p.name for p in exposed.iterdir())
        assert after == before, "files appeared or vanished outside the sandbox"
        assert list(sandbox_tmp.iterdir()) == [], "the sandbox left its temporary directory behind"
        assert not os.path.exists(env["host_tmp_file"]), "a sandboxed program wrote into the host's /tmp"
        assert sibling.poll() is None, "a sandboxed program killed a process of the trainer's"
        with pytest.raises(BlockingIOError):
            tcp.accept()                                     # nobody reached the TCP server
        with pytest.raises(BlockingIOError):
            udp.recvfrom(100)                                # nobody reached the UDP server
    finally:
        shutil.rmtree(exposed, ignore_errors=True)
        sibling.kill()
        sibling.wait()
        tcp.close()
        udp.close()


HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "sleep_forever": "import time\ntime.sleep(3600)",
    "fork_bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "fork_then_exit_early": "import os, time\nfor _ in range(8):\n    if os.fork() == 0:\n        os.setsid()\n"
                            "        time.sleep(3600)\nos._exit(0)",
    "memory_bomb_one_block": "x = bytearray(8 << 30)",
    "memory_bomb_growing": "x = []\nwhile True:\n    x.append(bytearray(1 << 24))",
    "print_bomb": "while True:\n    print('x' * 10000)",
    "write_canary": "open({canary!r}, 'w').write('pwned')",
    "append_canary": "open({canary!r}, 'a').write('pwned')",
    "delete_canary": "import os\nos.remove({canary!r})",
    "delete_directory": "import shutil\nshutil.rmtree({dir!r})",
    "create_file_beside_canary": "open({dir!r} + '/new.txt', 'w').write('x')",
    "write_etc": "open('/etc/posttrain-pwned', 'w').write('x')",
    "write_project": "open({project!r}, 'a').write('# pwned')",
    "read_env_secret": "import os\nsecret = os.environ['POSTTRAIN_TEST_SECRET']",
    "read_parent_environ": "secret = open('/proc/{pid}/environ').read()",
    "read_secret_file": "secret = open({secret!r}).read()",
    "read_root_home": "import os\nsecret = os.listdir('/root/.config')",
    "tcp_connect_localhost": "import socket\nsocket.create_connection(('127.0.0.1', {tcp}), timeout=1)",
    "udp_send_localhost": "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                          "s.sendto(b'x', ('127.0.0.1', {udp}))",
    "kill_parent": "import os, signal\nos.kill({pid}, signal.SIGKILL)",
    "kill_parent_group": "import os, signal\nos.killpg({pgid}, signal.SIGKILL)",
    "kill_sibling": "import os, signal\nos.kill({sibling}, signal.SIGKILL)",
    "kill_everything": "import os, signal\nos.kill(-1, signal.SIGKILL)",
    "become_root": "import os\nos.setuid(0)",
    "mount_over_tmp": "import ctypes\nassert ctypes.CDLL(None).mount(b'none', b'/sandbox', b'tmpfs', 0, None) == 0",
    "chroot": "import os\nos.chroot('/sandbox')",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_in_namespace_sandbox(name, world, monkeypatch):
    namespaces_or_skip()
    given, draw = set(), sandbox._sandbox_uid

    def recorded(mode):                                   # the uids this test's runs get
        given.add(uid := draw(mode))
        return uid

    monkeypatch.setattr(sandbox, "_sandbox_uid", recorded)
    program = HOSTILE[name].format(project=str(REPO / "rewards" / "__init__.py"), **world)
    value, seconds = score(program, "namespaces")
    assert value == 0.0, f"{name}: the hostile part ran to completion"
    assert seconds < LIMITS["timeout"] + WALL_MARGIN, f"{name}: took {seconds:.1f}s"
    assert given and wait_until_no_sandbox_processes(uids=given) == [], f"{name}: sandbox processes outlived the run"


def test_control_scaffold_earns_full_reward(world):
    """The scaffold alone passes, so the hostile tests' 0.0 comes from the hostile part."""
    namespaces_or_skip()
    assert score("x = 1", "namespaces")[0] == 1.0
    assert score("x = 1", "process")[0] == 1.0


def test_namespace_sandbox_sees_a_clean_small_world(world):
    namespaces_or_skip()
    probe = ("import os, json\nprint(json.dumps({'uid': os.getuid(), 'cwd': os.getcwd(), 'env': dict(os.environ),"
             " 'root': sorted(os.listdir('/')), 'tmp': os.listdir('/sandbox'), 'pids': sorted(int(p) for p in"
             " os.listdir('/proc') if p.isdigit()), 'lo': open('/sys/class/net/lo/operstate').read().strip()"
             " if os.path.exists('/sys/class/net/lo/operstate') else None}))")
    res = run_python(probe, limits=SandboxLimits(**LIMITS), isolation="namespaces")
    seen = json.loads(res.stdout)
    assert res.isolation == "namespaces"
    assert seen["cwd"] == "/sandbox" and seen["tmp"] == []
    assert set(seen["env"]) == {"PATH", "HOME", "TMPDIR", "LANG"}
    assert "hunter2" not in res.stdout
    assert seen["pids"] == [1, 2]                              # its own init and itself: no host process visible
    allowed_top = {p.split("/")[1] for p in sandbox._ro_paths()} | {"sandbox", "tmp", "proc", "dev"}
    assert set(seen["root"]) <= allowed_top                  # only the read-only binds: no home, /var, /run, project
    assert "home" not in seen["root"] and "var" not in seen["root"] and "run" not in seen["root"]
    if os.geteuid() == 0:
        assert sandbox._UID_BASE <= seen["uid"] < sandbox._UID_BASE + (1 << 24)


def test_writes_inside_the_sandbox_stay_inside(world):
    namespaces_or_skip()
    program = (f"try:\n    open({world['host_tmp_file']!r}, 'w').write('x')\nexcept OSError:\n    pass\n"
               "open('notes.txt', 'w').write('kept')\n"
               "def f():\n    return open('notes.txt').read()\n")
    assert rewards.code(["p"], [program], tests=[["assert f() == 'kept'"]], isolation="namespaces", **LIMITS) == [1.0]


def test_disk_is_bounded(world):
    namespaces_or_skip()
    res = run_python("open('big', 'wb').write(b'x' * (64 << 20))", limits=SandboxLimits(**LIMITS, disk_mb=8),
                     isolation="namespaces")
    assert not res.code_ok and ("No space left" in res.code_error or "File too large" in res.code_error
                                or "SIGXFSZ" in res.code_error)


def test_numpy_is_importable_inside(world):
    namespaces_or_skip()
    pytest.importorskip("numpy")
    res = run_python("import numpy as np\nprint(int(np.arange(5).sum()))", limits=SandboxLimits(**LIMITS),
                     isolation="namespaces")
    assert res.stdout.strip() == "10"


def test_partial_results_survive_a_timeout(world):
    """Results are streamed per test: the ones that ran before a hang still count."""
    namespaces_or_skip()
    hang = "import time\nwhile True: time.sleep(0.1)"  # wall-clock hang: the CPU limit must not end it first
    res = run_python("x = 1", ["assert x == 1", hang, "assert x == 1"], limits=SandboxLimits(**LIMITS),
                     isolation="namespaces")
    assert res.timed_out and res.tests_passed == [True, False, False] and res.fraction_passed == pytest.approx(1 / 3)


def test_limits_are_reported(world):
    namespaces_or_skip()
    res = run_python("while True:\n    pass", limits=SandboxLimits(timeout=30, cpu_seconds=1), isolation="namespaces")
    assert not res.timed_out and "SIGXCPU" in res.code_error
    res = run_python("import os\nn = 0\nwhile n < 100:\n    try:\n        pid = os.fork()\n    except OSError:\n"
                     "        break\n    if pid == 0:\n        import time\n        time.sleep(60)\n"
                     "    n += 1\nprint(n)",
                     limits=SandboxLimits(timeout=20, max_processes=8), isolation="namespaces")
    assert int(res.stdout) <= 8
    res = run_python("while True:\n    print('y' * 1000)", limits=SandboxLimits(timeout=1, max_output_bytes=5000),
                     isolation="namespaces")
    assert res.timed_out and 0 < len(res.stdout) <= 5000


def test_concurrent_sandboxes(world):
    namespaces_or_skip()
    completions = [f"def f():\n    return {i}" for i in range(4)]
    got = rewards.code(["p"] * 4, completions, tests=[["assert f() == 2"]] * 4, isolation="namespaces", max_workers=4,
                       **LIMITS)
    assert got == [0.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------------------------------ process mode (fallback)
PROCESS_HOSTILE = ["infinite_loop", "memory_bomb_one_block", "write_canary", "delete_canary", "delete_directory",
                   "write_etc", "read_env_secret", "read_secret_file", "read_root_home", "tcp_connect_localhost",
                   "udp_send_localhost", "kill_parent", "kill_parent_group", "kill_sibling", "mount_over_tmp",
                   "fork_once", "subprocess"]
PROCESS_ONLY = {"fork_once": "import os\nos.fork()",                 # allowed (and contained) in namespace mode
                "subprocess": "import subprocess\nsubprocess.run(['true'])"}


@pytest.mark.parametrize("name", PROCESS_HOSTILE)
def test_hostile_program_in_process_sandbox(name, world):
    """The weaker fallback (no namespaces) still stops these; see rewards/sandbox.py for what it cannot stop."""
    program = {**HOSTILE, **PROCESS_ONLY}[name].format(project=str(REPO / "rewards" / "__init__.py"), **world)
    value, seconds = score(program, "process")
    assert value == 0.0, f"{name}: the hostile part ran to completion"
    assert seconds < LIMITS["timeout"] + WALL_MARGIN


def test_process_sandbox_working_directory(world):
    program = "open('notes.txt', 'w').write('kept')\ndef f():\n    return open('notes.txt').read()\n"
    assert rewards.code(["p"], [program], tests=[["assert f() == 'kept'"]], isolation="process", **LIMITS) == [1.0]


# ------------------------------------------------------------------------------------------ non-root (user namespace)
NONROOT_SCRIPT = """
import importlib.util, json, sys

spec = importlib.util.spec_from_file_location("sbx", sys.argv[1])
sbx = importlib.util.module_from_spec(spec); sys.modules["sbx"] = sbx; spec.loader.exec_module(sbx)
L = sbx.SandboxLimits(timeout=5, max_processes=8)
out = {}
for name, code in {
    "whoami": "import os; print(sorted(os.listdir('/')))",
    "net": "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)",
    "etc": "open('/etc/posttrain-pwned', 'w')",
    "caps": "print([l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1])",
    "forks": "import os, time\\nn = 0\\nwhile n < 100:\\n    try:\\n        pid = os.fork()\\n    except OSError:\\n"
             "        break\\n    if pid == 0:\\n        time.sleep(30)\\n    n += 1\\nprint(n)",
}.items():
    r = sbx.run_python(code, limits=L, isolation="namespaces")
    out[name] = [r.isolation, r.code_ok, r.code_error, r.stdout.strip()]
print(json.dumps(out))
"""


def test_non_root_user_namespace_sandbox():
    """As an unprivileged user (the usual cluster case) the sandbox uses a user namespace; run it as nobody."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.access(python, os.X_OK):
        pytest.skip("needs root (to become nobody), util-linux setpriv and a system python3 readable by nobody")
    module = REPO / "rewards" / "sandbox.py"
    if not all(p.stat().st_mode & 0o001 for p in module.parents) or not module.stat().st_mode & 0o004:
        pytest.skip(f"the checkout is not readable by nobody (a parent of {module} is not world-searchable)")
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c", NONROOT_SCRIPT,
           str(REPO / "rewards" / "sandbox.py")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd="/")
    if proc.returncode != 0 and "namespace isolation is not available" in proc.stderr:
        pytest.skip(f"unprivileged user namespaces are not available here: {proc.stderr.strip()[-200:]}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    assert all(v[0] == "namespaces" for v in out.values())
    assert "work" not in out["whoami"][3] and "home" not in out["whoami"][3]
    assert not out["net"][1] and "unreachable" in out["net"][2]
    assert not out["etc"][1] and "Read-only" in out["etc"][2]
    assert int(out["caps"][3], 16) == 0
    assert int(out["forks"][3]) <= 8


# ------------------------------------------------------------------------------------------ API edges
def test_settings_are_checked():
    with pytest.raises(ValueError, match="isolation must be one of auto, namespaces, process"):
        sandbox.resolve_isolation("docker")
    with pytest.raises(ValueError, match="SandboxLimits.timeout must be > 0"):
        SandboxLimits(timeout=0)


def test_a_sandbox_that_cannot_start_is_an_error_not_a_zero(monkeypatch):
    monkeypatch.setattr(sandbox, "_command", lambda mode: [sys.executable, "-c", "import sys; sys.exit(7)"])
    with pytest.raises(SandboxError, match=r"did not start \(exit code 7\)"):
        run_python("x = 1", isolation="process")
    with pytest.raises(SandboxError):
        rewards.code(["p"], ["x = 1"], tests=[["assert x == 1"]], isolation="process")


def test_survivor_check_is_real():
    """sandbox_uid_processes() finds a process running under a sandbox uid (so the leftover checks can fail)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process under another uid")
    uid = sandbox._UID_BASE + 12345
    proc = subprocess.Popen(["sleep", "30"], user=uid, group=uid, extra_groups=[])
    try:
        deadline = time.monotonic() + 5
        while proc.pid not in sandbox_uid_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.pid in sandbox_uid_processes()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
