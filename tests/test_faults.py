"""Faults: a run stopped after a checkpoint resumes with metrics.jsonl holding each row once; damaged, stale and
unwritable checkpoints."""
from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import checkpoint as ckpt
from posttrain.cli import main
from posttrain.metrics import MetricsLog
from posttrain.trainer import train

from conftest import REPO, read_metrics, sft_recipe, sft_recipe_raw, train_on_two_processes

TWO_STAGES = ["train.save_every=3", "train.keep_checkpoints=5",
              "stages=[{name: a, objectives: {sft: 1.0}, train: {steps: 4}},"
              " {name: b, objectives: {sft: 1.0}, train: {steps: 4}}]"]


class Stop(Exception):
    """Stands for the process dying right after a metrics row was written."""


def _crash_after(monkeypatch, step: int) -> None:
    """Make the run die right after it logs global step `step` (the row is in metrics.jsonl, nothing after it)."""
    log = MetricsLog.log

    def log_then_die(self, metrics, at):
        log(self, metrics, at)
        if at == step and "loss" in metrics:
            raise Stop(f"killed after step {step}")

    monkeypatch.setattr(MetricsLog, "log", log_then_die)


def _shape(rows: list[dict]) -> list[tuple]:
    """What must not depend on interruptions: each row's stage, step and kind (header or step)."""
    return [(r["stage"], r["step"], "world_size" in r) for r in rows]


@pytest.mark.parametrize("crash_after,resumes_from", [(6, 4), (8, 7)])
def test_resumed_metrics_hold_each_row_once(tiny_model_dir, tmp_path, monkeypatch, crash_after, resumes_from):
    """Stopped after checkpoint `resumes_from` with later steps already logged (crash after 6: the last checkpoint
    ends stage a, so stage b's header row is logged after it too; after 8: mid stage b), then `--resume auto`: the
    file equals the uninterrupted run's, row for row (stage, step, kind; the same losses)."""
    train(sft_recipe(tiny_model_dir, tmp_path / "full", overrides=TWO_STAGES))
    full = read_metrics(tmp_path / "full")
    assert _shape(full) == [(0, 0, True), (0, 1, False), (0, 2, False), (0, 3, False), (0, 4, False),
                            (1, 4, True), (1, 5, False), (1, 6, False), (1, 7, False), (1, 8, False)]

    recipe = sft_recipe(tiny_model_dir, tmp_path / "run", overrides=TWO_STAGES)
    with monkeypatch.context() as m:
        _crash_after(m, crash_after)
        with pytest.raises(Stop):
            train(recipe)
    logged = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert logged == list(range(1, crash_after + 1))                          # steps past the checkpoint were logged
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())[-1] == f"step-{resumes_from:06d}"
    with (tmp_path / "run/metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "los')                                            # a row cut short by the kill

    train(recipe, resume="auto")
    rows = read_metrics(tmp_path / "run")
    assert _shape(rows) == _shape(full)
    assert [r.get("loss") for r in rows] == pytest.approx([r.get("loss") for r in full], abs=1e-6)


def test_resume_into_a_fresh_directory_logs_the_stage_header(tiny_model_dir, tmp_path):
    """Resuming another run's checkpoint into a new output_dir: its metrics.jsonl starts with the resumed stage's
    header at the checkpoint's step, then the remaining steps."""
    train(sft_recipe(tiny_model_dir, tmp_path / "full", steps=5, overrides=["train.save_every=3"]))
    train(sft_recipe(tiny_model_dir, tmp_path / "other", steps=5),
          resume=str(tmp_path / "full/checkpoints/step-000003"))
    assert _shape(read_metrics(tmp_path / "other")) == [(0, 3, True), (0, 4, False), (0, 5, False)]


# ----------------------------------------------------------------------------------------------- checkpoints
def _recipe_file(tmp_path: Path, model_dir: Path, out: Path, steps: int = 4) -> Path:
    """The conftest SFT recipe as a YAML file (for the command line), checkpointing every 2 steps."""
    raw = sft_recipe_raw(model_dir, out, steps, ["train.save_every=2", "train.keep_checkpoints=5"])
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final/model.safetensors"))


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4 (copied by the tests, never changed)."""
    tmp = tmp_path_factory.mktemp("reference")
    assert main(["train", str(_recipe_file(tmp, tiny_model_dir, tmp / "run"))]) == 0
    return tmp / "run"


def _copy_run(reference_run: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the reference run (in `tmp_path/run`) and its recipe file pointing at the copy."""
    run = tmp_path / "run"
    shutil.copytree(reference_run, run)
    recipe = yaml.safe_load((reference_run.parent / "run.yaml").read_text())
    recipe["output_dir"] = str(run)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(recipe))
    return run, tmp_path / "run.yaml"


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "model.safetensors truncated": ("model.safetensors", _truncate, "model.safetensors: .* bytes, .* when written"),
    "optimizer.bin missing": ("optimizer.bin", Path.unlink, "optimizer.bin: missing"),
    "random_states_0.pkl missing": ("random_states_0.pkl", Path.unlink, "random_states_0.pkl: missing"),
    "optimizer.bin changed": ("optimizer.bin", _flip_a_byte, r"optimizer.bin: its contents changed .*sha256"),
    "trainer_state.json truncated": ("trainer_state.json", _truncate, "trainer_state.json: .* bytes"),
    "manifest.json missing": ("manifest.json", Path.unlink, "manifest.json: missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_named_on_resume(reference_run, tmp_path, capsys, damage):
    name, spoil, message = DAMAGE[damage]
    run, recipe = _copy_run(reference_run, tmp_path)
    spoil(run / "checkpoints/step-000004" / name)
    metrics_before = (run / "metrics.jsonl").read_text()
    assert main(["train", str(recipe), "--resume", str(run / "checkpoints/step-000004")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(f"posttrain: error: --resume {run}/checkpoints/step-000004: the checkpoint is damaged: "
                        f"{message}.*\n", err), err                       # checked before any weights load
    assert (run / "metrics.jsonl").read_text() == metrics_before            # nothing was written


def test_resume_auto_falls_back_to_the_previous_complete_checkpoint(reference_run, tmp_path, capsys):
    """The newest checkpoint is damaged: `--resume auto` says so, resumes from the one before, and ends where the
    uninterrupted run ended (bitwise); a killed run's temporary directories are removed."""
    run, recipe = _copy_run(reference_run, tmp_path)
    _truncate(run / "checkpoints/step-000004/optimizer.bin")
    shutil.rmtree(run / "final")
    stale = [run / "checkpoints/.tmp-step-000006", run / "checkpoints/.tmp-del-step-000002"]
    for path in stale:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")
    assert main(["train", str(recipe), "--resume", "auto"]) == 0
    err = capsys.readouterr().err
    assert ("posttrain: --resume auto: resuming from step-000002; skipped newer checkpoint(s): step-000004 "
            "(optimizer.bin: ") in err
    assert not any(path.exists() for path in stale)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert ckpt.problems(run / "checkpoints/step-000004") == []                # written again, complete
    want, got = _final_weights(reference_run), _final_weights(run)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_resume_auto_with_no_usable_checkpoint_lists_what_is_wrong(reference_run, tmp_path, capsys):
    run, recipe = _copy_run(reference_run, tmp_path)
    for step in (2, 4):
        (run / f"checkpoints/step-{step:06d}/model.safetensors").unlink()
    assert main(["train", str(recipe), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert (f"posttrain: error: --resume auto: no usable checkpoint under {run}/checkpoints: "
                          "step-000004 (model.safetensors: missing); step-000002 (model.safetensors: missing)\n") \
        == err, err


def _failing_writer(monkeypatch, error: int, on_file: str) -> None:
    """torch.save writes half of `on_file` and then fails with OSError `error` (as a full or read-only disk does)."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(on_file) and "step-000004" in str(f):
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(error, os.strerror(error), str(f))
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS])
def test_a_failed_checkpoint_write_stops_the_run_and_keeps_the_previous_one(reference_run, tiny_model_dir, tmp_path,
                                                                          capsys, monkeypatch, error):
    recipe = _recipe_file(tmp_path, tiny_model_dir, tmp_path / "run")
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _failing_writer(m, error, "optimizer.bin")
        assert main(["train", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"posttrain: error: could not write checkpoint {run}/checkpoints/step-000004: {os.strerror(error)}: "
                   f"{run}/checkpoints/.tmp-step-000004/optimizer.bin; the run's earlier checkpoints are untouched "
                   "(`--resume auto` continues from the newest)"), err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert ckpt.problems(run / "checkpoints/step-000002") == []
    assert main(["train", str(recipe), "--resume", "auto"]) == 0
    want, got = _final_weights(reference_run), _final_weights(run)
    assert all(torch.equal(want[k], got[k]) for k in want)


def _in_mount_namespace(tmp_path: Path, script: str) -> None:
    """Run `script` (sh) as root of a fresh user + mount namespace, where it may mount a tmpfs or remount read-only."""
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, text=True) \
        if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        why = probe.stderr.strip() if probe is not None else "no unshare command"
        if os.environ.get("POSTTRAIN_REQUIRE_NAMESPACES") == "1":
            pytest.fail(f"mount namespaces are required here but unavailable: {why}")
        pytest.skip(f"mount namespaces unavailable: {why}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


def _checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(reference_run, tiny_model_dir, tmp_path):
    """The run directory on a real tmpfs with room for one checkpoint: the second fails with ENOSPC, the run stops
    with exit 1 naming it, and the first stays complete and resumable (to the uninterrupted run's weights)."""
    size_kb = _checkpoint_bytes(reference_run / "checkpoints/step-000002") * 3 // 2 // 1024
    disk = tmp_path / "disk"
    disk.mkdir()
    recipe = _recipe_file(tmp_path, tiny_model_dir, disk / "run")
    _in_mount_namespace(tmp_path, f"""
        mount -t tmpfs -o size={size_kb}k tmpfs {disk}
        {sys.executable} -m posttrain train {recipe} > out.txt 2> err.txt
        echo $? > rc.txt
        cp -a {disk}/run {tmp_path}/after   # the tmpfs ends with the namespace
    """)
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "1", err
    assert err.strip().splitlines()[-1].startswith(
        f"posttrain: error: could not write checkpoint {disk}/run/checkpoints/step-000004: No space left on "
        "device"), err
    run = tmp_path / "after"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert ckpt.problems(run / "checkpoints/step-000002") == []
    recipe_after = yaml.safe_load(recipe.read_text()) | {"output_dir": str(run)}
    (tmp_path / "after.yaml").write_text(yaml.safe_dump(recipe_after))
    assert main(["train", str(tmp_path / "after.yaml"), "--resume", "auto"]) == 0
    want, got = _final_weights(reference_run), _final_weights(run)
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
def test_read_only_checkpoints_directory_keeps_the_previous_checkpoint(reference_run, tmp_path):
    """Resumed from step 2 with RUN_DIR/checkpoints bind-mounted read-only: the save at step 4 fails with EROFS,
    the run stops naming it, and step 2 stays complete and resumable."""
    run, recipe = _copy_run(reference_run, tmp_path)
    shutil.rmtree(run / "checkpoints/step-000004")
    shutil.rmtree(run / "final")
    checkpoints = run / "checkpoints"
    _in_mount_namespace(tmp_path, f"""
        mount --bind {checkpoints} {checkpoints} && mount -o remount,bind,ro {checkpoints}
        {sys.executable} -m posttrain train {recipe} --resume auto > out.txt 2> err.txt
        echo $? > rc.txt
    """)
    err = (tmp_path / "err.txt").read_text()
    assert (tmp_path / "rc.txt").read_text().strip() == "1", err
    assert err.strip().splitlines()[-1].startswith(
        f"posttrain: error: could not write checkpoint {checkpoints}/step-000004: Read-only file system"), err
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]
    assert ckpt.problems(checkpoints / "step-000002") == []
    assert main(["train", str(recipe), "--resume", "auto"]) == 0
    want, got = _final_weights(reference_run), _final_weights(run)
    assert all(torch.equal(want[k], got[k]) for k in want)


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["model.safetensors", "manifest.json"])
def test_kill_during_a_checkpoint_write_resumes_from_the_previous_one(reference_run, tiny_model_dir, tmp_path,
                                                                     kill_when):
    """SIGKILL while step 4's checkpoint is being written (the test hook POSTTRAIN_CHECKPOINT_WRITE_DELAY holds each
    phase open: accelerate's files written; manifest written, not yet renamed): `--resume auto` takes step 2, the
    temporary directory is removed, and the run ends with the uninterrupted run's weights."""
    recipe = _recipe_file(tmp_path, tiny_model_dir, tmp_path / "run")
    run = tmp_path / "run"
    env = {**os.environ, ckpt.WRITE_DELAY_ENV: "1.0"}
    proc = subprocess.Popen([sys.executable, "-m", "posttrain", "train", str(recipe)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = run / "checkpoints/.tmp-step-000004" / kill_when
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), f"the write of step 4 was not caught (exit code {proc.poll()})"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [".tmp-step-000004", "step-000002"]
    assert main(["train", str(recipe), "--resume", "auto"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    want, got = _final_weights(reference_run), _final_weights(run)
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------------------------- one rank fails
FAIL_ON_RANK_1 = '''
import os

if os.environ.get("RANK") == "1":          # test hook: rank 1 (of an accelerate launch) fails at its 2nd call
    where = os.environ["POSTTRAIN_TEST_FAIL"]
    module, name = {"data": ("posttrain.data", "collate_demos"), "step": ("posttrain.policy", "forward")}[where]
    module = __import__(module, fromlist=[name])
    real, calls = getattr(module, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError(f"injected failure in the {where} on rank 1")
        return real(*args, **kwargs)

    setattr(module, name, failing)
'''

RANK_1_REWARD = '''
import os


def flaky(prompts, completions, **kwargs):
    if os.environ.get("RANK") == "1":
        raise ValueError("injected failure in the reward on rank 1")
    return [float(len(c) % 2) for c in completions]
'''


def _two_processes(tmp_path: Path, raw: dict, env: dict) -> subprocess.CompletedProcess:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    cmd = train_on_two_processes(recipe)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1", **env}
    # A hang in a collective would last gloo's 30-minute timeout: the bound below tells it from a prompt exit.
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["reward", "data", "step"])
def test_one_rank_failing_ends_both_with_its_error_printed_once(tiny_model_dir, tmp_path, where):
    """With 2 processes, an exception on rank 1 (in a reward function, in the data, in the step) ends both: rank 1
    prints its error once, as one line naming its rank; rank 0, whose collective then fails, says only that it
    stopped; the launch exits non-zero instead of hanging."""
    env = {}
    if where == "reward":
        (tmp_path / "rank_reward.py").write_text(RANK_1_REWARD)
        raw = rl_recipe_raw(tiny_model_dir, tmp_path / "run", f"{tmp_path / 'rank_reward.py'}:flaky")
    else:
        (tmp_path / "hook").mkdir()
        (tmp_path / "hook/sitecustomize.py").write_text(FAIL_ON_RANK_1)
        env = {"PYTHONPATH": str(tmp_path / "hook"), "POSTTRAIN_TEST_FAIL": where}
        raw = sft_recipe_raw(tiny_model_dir, tmp_path / "run", steps=4, overrides=["train.micro_batch_size=4"])
    proc = _two_processes(tmp_path, raw, env)
    assert proc.returncode != 0
    err = proc.stderr
    message = f"injected failure in the {where} on rank 1"
    assert err.count(message) == 1, err[-3000:]
    line = next(x for x in err.splitlines() if message in x)
    assert line.startswith("posttrain: error: rank 1 of 2: "), line
    assert f'File "{REPO / "posttrain"}' not in err, err[-3000:]             # no traceback from posttrain's processes
    peer = [x for x in err.splitlines() if x.startswith("posttrain: rank 0 of 2")]
    assert all(x.startswith("posttrain: rank 0 of 2: stopped: another process stopped") for x in peer), peer
    assert not (tmp_path / "run/final").exists()


def rl_recipe_raw(model_dir: Path, out: Path, reward: str) -> dict:
    """A small GRPO recipe on 1-digit arithmetic (2 prompts per process and step, 4 completions each)."""
    return {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model_dir)},
        "data": {"source": "task:arithmetic", "max_length": 48,
                 "task": {"digits": 1, "num_ops": 1, "ops": "+-", "num_examples": 64}},
        "objectives": {"grpo": {}},
        "train": {"batch_size": 16, "micro_batch_size": 8, "log_every": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
        "rollout": {"sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 8}, "prompts_per_step": 4},
        "rewards": [{"name": reward}],
        "logging": {"report_to": [], "progress_bar": False},
        "stages": [{"name": "rl", "objectives": {"grpo": 1.0}, "train": {"steps": 3}}],
    }


def _raised(exc: Exception) -> Exception:
    try:
        raise exc
    except Exception as e:  # noqa: BLE001
        return e


def test_failure_report_is_one_line_naming_the_rank(monkeypatch, capsys):
    from posttrain.cli import report_failure

    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2")
    assert report_failure(_raised(ValueError("bad row")), debug=False) == 1
    err = capsys.readouterr().err
    assert re.fullmatch(r"posttrain: error: rank 1 of 2: ValueError: bad row \(at .*test_faults.py:\d+ in _raised\) "
                        r"\(--debug prints the traceback\)\n", err), err
    assert report_failure(_raised(ValueError("bad row")), debug=True) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and err.count("bad row") == 2   # traceback + line
    peer = _raised(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1234"))
    assert report_failure(peer, debug=False) == 1
    assert capsys.readouterr().err == ("posttrain: rank 1 of 2: stopped: another process stopped (its error is printed "
                                       "above), so a collective operation failed (--debug prints the traceback)\n")
    from posttrain.configlib import ConfigError  # bad input: every process sees it; local rank 0 prints it

    assert report_failure(ConfigError("recipe.yaml: optim.lr: expected a number"), debug=False) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert report_failure(ConfigError("recipe.yaml: optim.lr: expected a number"), debug=False) == 2
    assert capsys.readouterr().err == "posttrain: error: recipe.yaml: optim.lr: expected a number\n"


def test_a_launch_that_sets_world_size_without_a_process_group_stops(tiny_model_dir, tmp_path):
    """WORLD_SIZE=2 but no process group for accelerate (no LOCAL_RANK: a hand-rolled srun line): each process would
    train alone on all the data into the same run directory. It stops before the model loads, saying how to launch."""
    recipe = _recipe_file(tmp_path, tiny_model_dir, tmp_path / "run")
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "posttrain", "train", str(recipe)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "posttrain: error: WORLD_SIZE is 2 but LOCAL_RANK is not set, so the processes would not form a group" \
        in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "run/checkpoints").exists() and not (tmp_path / "run/final").exists()
