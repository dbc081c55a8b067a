"""Every file in launch/, run as written on this CPU: the same global batch gives the same loss curve as 1 process.

Each config is launched with `accelerate launch --config_file launch/<file>`, overriding only the process count and
the CPU switch (and a free port, since other runs share this machine):
    ddp.yaml                       --num_processes 2, ACCELERATE_USE_CPU=1 (`--cpu` would silently start ONE process,
                                   and `use_cpu: true` in a config file two uncoordinated ones: accelerate 1.15 exports
                                   the CPU switch to the processes only from the environment)
    zero2 / zero3 / zero3_offload  --num_processes 2, DS_ACCELERATOR=cpu (DeepSpeed over gloo; `use_cpu` would make
                                   accelerate skip DeepSpeed)
    slurm.sbatch + multinode.yaml  the template's srun line through stub `srun` / `scontrol` that start both nodes on
                                   this machine, with ACCELERATE_CONFIG=launch/multinode.yaml: two "machines" on
                                   127.0.0.1, one process each (--num_machines 2 --machine_rank 0/1 --main_process_ip)
The recipe's model.precision (fp32 here) decides mixed precision, whatever the launch file says.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, read_metrics

STEPS = 2
LAUNCH = REPO / "launch"
SRUN = """#!/bin/bash
# stub srun: the command once per node of the allocation, all on this machine, each with its SLURM_NODEID
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
"""
SCONTROL = """#!/bin/bash
# stub scontrol: `scontrol show hostnames LIST` -> one line per node, all this machine
[[ "$1 $2" == "show hostnames" ]] || { echo "stub scontrol: only 'show hostnames'" >&2; exit 1; }
for ((i = 0; i < SLURM_NNODES; i++)); do echo 127.0.0.1; done
"""


def _recipe(model_dir: Path, out: Path) -> dict:
    return {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model_dir)},
        "data": {"source": "task:arithmetic", "max_length": 48,
                 "task": {"digits": 1, "num_ops": 1, "ops": "+", "num_examples": 256}},
        "objectives": {"sft": {}},
        "train": {"batch_size": 8, "micro_batch_size": 4, "log_every": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
        "logging": {"report_to": [], "progress_bar": False},
        "stages": [{"name": "sft", "objectives": {"sft": 1.0}, "train": {"steps": STEPS}}],
    }


def _free_port() -> int:
    with socket.socket() as s:                # other test runs on this machine may hold the default port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"     # this venv's accelerate
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache/posttrain/torch_extensions"))  # DeepSpeed JIT
    return env


def _write(tmp_path: Path, model_dir: Path) -> tuple[Path, Path]:
    out = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_recipe(model_dir, out)))
    return path, out


def _check(procs: list[subprocess.CompletedProcess], out: Path) -> list[dict]:
    for proc in procs:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(out)


def _accelerate(config: str, port: int, recipe: Path, *flags: str) -> list[str]:
    return ["accelerate", "launch", "--config_file", str(LAUNCH / config), *flags, "--main_process_port", str(port),
            "-m", "posttrain", "train", str(recipe)]


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, tmp_path_factory) -> list[dict]:
    recipe, out = _write(tmp_path_factory.mktemp("single"), tiny_model_dir)
    proc = subprocess.run([sys.executable, "-m", "posttrain", "train", str(recipe)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    rows = _check([proc], out)
    assert rows[0]["world_size"] == 1
    return [r for r in rows if "loss" in r]


def _same_curve(one: list[dict], rows: list[dict]) -> None:
    assert rows[0]["world_size"] == 2                                  # two real processes, not one
    two = [r for r in rows if "loss" in r]
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert one[-1]["loss"] < one[0]["loss"]


CPU_SWITCH = {"ddp.yaml": {"ACCELERATE_USE_CPU": "1"}, "zero2.yaml": {"DS_ACCELERATOR": "cpu"},
              "zero3.yaml": {"DS_ACCELERATOR": "cpu"}, "zero3_offload.yaml": {"DS_ACCELERATOR": "cpu"}}


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CPU_SWITCH))
def test_launch_config_two_processes_match_one(config, one_process, tiny_model_dir, tmp_path):
    recipe, out = _write(tmp_path, tiny_model_dir)
    proc = subprocess.run(_accelerate(config, _free_port(), recipe, "--num_processes", "2"), cwd=REPO,
                          env=_env(**CPU_SWITCH[config]),
                          capture_output=True, text=True, timeout=900)
    _same_curve(one_process, _check([proc], out))
    if config.startswith("zero"):                  # really DeepSpeed, with the file's ZeRO stage and offload
        import torch

        written = yaml.safe_load((LAUNCH / config).read_text())["deepspeed_config"]
        (states, *_) = sorted((out / f"checkpoints/step-{STEPS:06d}/pytorch_model").glob("*model_states.pt"))
        zero = torch.load(states, map_location="cpu", weights_only=False)["ds_config"]["zero_optimization"]
        assert zero["stage"] == written["zero_stage"]
        for key in ("offload_optimizer", "offload_param"):
            assert zero.get(key, {}).get("device", "none") == written[f"{key}_device"], (key, zero)


@pytest.mark.slow
def test_slurm_template_and_multinode_config_as_two_machines(one_process, tiny_model_dir, tmp_path):
    """sbatch's srun line, once per node, runs `accelerate launch --config_file launch/multinode.yaml --num_machines 2
    --num_processes 2 --machine_rank $SLURM_NODEID --main_process_ip 127.0.0.1`: two machines, one process each."""
    recipe, out = _write(tmp_path, tiny_model_dir)
    stubs = tmp_path / "bin"
    stubs.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    env = _env(ACCELERATE_USE_CPU="1", SLURM_JOB_NODELIST="node[0-1]", SLURM_NNODES="2", GPUS_PER_NODE="1",
               MASTER_PORT=str(_free_port()), ACCELERATE_CONFIG="launch/multinode.yaml")
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), str(recipe)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    _same_curve(one_process, _check([proc], out))
    assert proc.stdout.count("done: ") == 1                          # one summary line, from the main process


def test_every_launch_file_is_tested():
    assert sorted(p.name for p in LAUNCH.iterdir()) == sorted([*CPU_SWITCH, "multinode.yaml", "slurm.sbatch"])
