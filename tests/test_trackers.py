"""Trackers: `logging.report_to: [wandb, tensorboard]` writes the run's metrics and its recipe as the run config.

W&B runs offline (WANDB_MODE=offline, no account, no network): its run file RUN_DIR/wandb/offline-run-*/run-*.wandb
is a LevelDB-style log of protobuf records (what `wandb sync` uploads), read back here record by record.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import read_metrics, sft_raw

wandb = pytest.importorskip("wandb")


def wandb_records(path: Path):
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic, version), then 32 KiB blocks of
    chunks `crc32 (4) | length (2) | type (1) | payload`, type 1 = a whole record, 2/3/4 = its first/middle/last
    part."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} does not start with the W&B header: {data[:8]!r}"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or kind == 0:                                    # block trailer / zero padding
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


@pytest.mark.slow
def test_wandb_offline_and_tensorboard_get_metrics_and_the_recipe(tiny_model_dir, tmp_path):
    raw = sft_raw(tiny_model_dir, tmp_path / "run", steps=3)
    raw["logging"] = {"report_to": ["wandb", "tensorboard"], "project": "eco-test", "progress_bar": False}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wbc"),
           "WANDB_CACHE_DIR": str(tmp_path / "wbc"), "WANDB_DATA_DIR": str(tmp_path / "wbc")}
    proc = subprocess.run([sys.executable, "-m", "posttrain", "train", str(tmp_path / "recipe.yaml")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "wandb").exists()                        # under the run directory, not the cwd
    (run_file,) = (tmp_path / "run/wandb").glob("offline-run-*/run-*.wandb")

    history, config, project = {}, {}, None
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row["_step"]] = row
        elif kind == "config":
            config |= {item.key or ".".join(item.nested_key): json.loads(item.value_json)
                       for item in record.config.update}
        elif kind == "run":
            project = record.run.project
    assert project == "eco-test"
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:                                                   # every logged step, with its values
        assert history[r["step"]]["loss"] == pytest.approx(r["loss"]) and history[r["step"]]["lr"] == r["lr"]
    assert config["stages.0.optim.lr"] == 1e-3 and config["model.path"] == str(tiny_model_dir)
    assert config["objectives.sft.aggregation"] == "token_mean" and config["logging.report_to.0"] == "wandb"

    (hparams,) = (tmp_path / "run/eco-test").glob("*/hparams.yml")    # TensorBoard: RUN_DIR/<project>/
    assert yaml.safe_load(hparams.read_text())["stages.0.train.steps"] == 3
