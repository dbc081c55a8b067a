"""Checkpoints: accelerate's state (model, optimizer, RNG of every process) plus the trainer's own state.

Layout of RUN_DIR/checkpoints/step-000120/:
  model.safetensors, optimizer.bin, random_states_<rank>.pkl   (accelerator.save_state)
  trainer_state.json   stage index and name, step in stage (= data position), global step, scheduler, extras
  manifest.json        every other file's size and sha256, written last

Writing: everything goes into `.tmp-step-000120/`; the manifest is written (and every file synced to disk) once all
files are complete, then the directory is renamed to `step-000120` in one step. Old checkpoints beyond `keep` are
renamed to a `.tmp-` name before they are deleted. So a kill at any moment leaves only complete `step-*`
checkpoints, plus `.tmp-*` directories that the next run removes (`remove_temporaries`). A write that fails (disk
full, read-only) raises a CheckpointError naming the checkpoint and the cause; the earlier checkpoints are untouched.
The final export (RUN_DIR/final) is written the same way, into RUN_DIR/.tmp-final, then renamed.

Reading: `resolve` checks a checkpoint against its manifest (`problems`: a missing file, a size or sha256 that
differs, named by file) before anything is loaded. `--resume DIR` stops on a damaged checkpoint; `--resume auto`
takes the newest usable one and says on stderr which newer ones it skipped and why.

Test hook: with POSTTRAIN_CHECKPOINT_WRITE_DELAY=<seconds> every phase of a write (directory created, accelerate's
files written, manifest written, renamed) is followed by that pause, so a test can kill the run mid-write: a write
is in progress while a `.tmp-step-*` directory exists.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from posttrain.configlib import ConfigError

STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
FINAL_TMP = ".tmp-final"     # RUN_DIR/final is written here, then renamed (a kill never leaves a partial final/)
WRITE_DELAY_ENV = "POSTTRAIN_CHECKPOINT_WRITE_DELAY"
_NAME = re.compile(r"step-\d+")
LOW_SPACE = 16 << 20        # bytes free below which a failed write is reported as a full disk
_INTACT: set[tuple] = set()  # (checkpoint, manifest mtime, manifest size) found intact by this process


class CheckpointError(RuntimeError):
    """A checkpoint could not be written."""


@dataclass
class RunState:
    stage: int = 0            # index of the stage being run
    stage_name: str = ""
    step: int = 0             # optimizer steps done in this stage; the data position is step * batch_size
    global_step: int = 0      # optimizer steps done in the whole run
    scheduler: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)   # e.g. mixer / controller state of later objectives


# ------------------------------------------------------------------------------------------------ writing
def save(accelerator, run_dir: Path, state: RunState, keep: int) -> Path:
    """Write checkpoint `step-<global step>` of the run (every process calls this; see the module docstring)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.global_step:06d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    main = accelerator.is_main_process
    if main:
        with _writing(final, tmp):
            remove_temporaries(run_dir)
            tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    _pause()
    with _writing(final, tmp if main else None):
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    _pause()
    if main:
        with _writing(final, tmp):
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            _write_manifest(tmp)
            _pause()
            replace_directory(tmp, final)
        _pause()
        for old in list_checkpoints(run_dir)[:-keep]:
            try:
                _delete(old)
            except OSError as e:
                print(f"posttrain: warning: could not delete old checkpoint {old}: {_cause(e, old)}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def _writing(final: Path, tmp: Path | None):
    """Any failure inside is a CheckpointError naming the checkpoint and the cause; `tmp` is removed then."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (any failure to write is this checkpoint's, named with its cause)
        cause = _cause(e, final.parent)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final}: {cause}; the run's earlier checkpoints are "
                              "untouched (`--resume auto` continues from the newest)") from e


def remove_temporaries(run_dir: Path) -> list[Path]:
    """Delete the `.tmp-*` directories a killed run left in RUN_DIR and RUN_DIR/checkpoints (main process only)."""
    stale = [path for root in (Path(run_dir), Path(run_dir) / "checkpoints") if root.is_dir()
             for path in sorted(root.glob(f"{TMP_PREFIX}*"))]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _write_manifest(directory: Path) -> None:
    """manifest.json: size and sha256 of every file in `directory` (each synced to disk first), then the manifest."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        files[path.relative_to(directory).as_posix()] = {"size": path.stat().st_size,
                                                         "sha256": _sha256(path, sync=True)}
    manifest = directory / MANIFEST
    with manifest.open("w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _sync_dir(directory)


def replace_directory(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; an existing `final` (the same step or export written again) is moved aside first."""
    if final.exists():
        aside = final.with_name(f"{TMP_PREFIX}old-{final.name}")
        shutil.rmtree(aside, ignore_errors=True)
        final.rename(aside)
        tmp.rename(final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        tmp.rename(final)
    _sync_dir(final.parent)


def _delete(path: Path) -> None:
    """Remove a checkpoint so that no partial `step-*` directory is ever visible: rename first, then delete."""
    aside = path.with_name(f"{TMP_PREFIX}del-{path.name}")
    path.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def _pause() -> None:
    delay = float(os.environ.get(WRITE_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _cause(e: BaseException, directory: Path) -> str:
    """The OS error, or for writers that hide it (torch.save: "unexpected pos ...") what the filesystem says."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    raised = f"{type(e).__name__}: {e}"
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        fs = os.statvfs(directory)
    except OSError:
        return raised
    if fs.f_flag & os.ST_RDONLY:
        return f"Read-only file system: {directory} ({raised})"
    free = fs.f_bavail * fs.f_frsize
    if free < LOW_SPACE:
        return f"No space left on device: {free} bytes free on the filesystem of {directory} ({raised})"
    return raised


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------ reading
def list_checkpoints(run_dir: Path) -> list[Path]:
    """The run's `step-*` checkpoint directories, oldest first (complete or not: see `problems`)."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name)) if root.is_dir() else []


def problems(path: Path) -> list[str]:
    """What is wrong with checkpoint `path` against its manifest, one line per file; [] = complete and intact.
    A checkpoint found intact is not read again by this process (the preflight and the trainer both ask)."""
    path = Path(path)
    try:
        stamp = (path / MANIFEST).stat()
    except OSError:
        stamp = None
    key = (str(path.resolve()), stamp.st_mtime_ns, stamp.st_size) if stamp is not None else None
    if key in _INTACT:
        return []
    found = _problems(path)
    if not found and key is not None:
        _INTACT.add(key)
    return found


def _problems(path: Path) -> list[str]:
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"{MANIFEST}: missing (an unfinished checkpoint, or one written before posttrain wrote manifests)"]
    except (ValueError, KeyError, TypeError):
        return [f"{MANIFEST}: not a valid manifest"]
    found = []
    for name, want in files.items():
        file = path / name
        if not file.is_file():
            found.append(f"{name}: missing")
        elif file.stat().st_size != want["size"]:
            found.append(f"{name}: {file.stat().st_size} bytes, {want['size']} when written (truncated or changed)")
        elif _sha256(file) != want["sha256"]:
            found.append(f"{name}: its contents changed since it was written (sha256 differs)")
    if STATE_FILE not in files:
        found.append(f"{STATE_FILE}: not in the manifest")
    return found


def resolve(run_dir: Path, resume: str, report: bool = True) -> Path | None:
    """The checkpoint to resume from: `auto` = the newest usable one of the run (skipped newer ones reported on
    stderr when `report`), or None when the run has no checkpoint yet (start from the beginning: a job script can pass
    `--resume auto` on every launch); else the directory `resume`, which must be usable. ConfigError otherwise."""
    if resume == "auto":
        if not list_checkpoints(run_dir):
            if report:
                print(f"posttrain: --resume auto: no checkpoint under {Path(run_dir) / 'checkpoints'} yet; starting "
                      "from the beginning", file=sys.stderr, flush=True)
            return None
        skipped = []
        for path in reversed(list_checkpoints(run_dir)):
            found = problems(path)
            if not found:
                if skipped and report:
                    print(f"posttrain: --resume auto: resuming from {path.name}; skipped newer checkpoint(s): "
                          + "; ".join(skipped), file=sys.stderr, flush=True)
                return path
            skipped.append(f"{path.name} ({', '.join(found)})")
        where = Path(run_dir) / "checkpoints"
        raise ConfigError(f"--resume auto: no usable checkpoint under {where}" + (": " + "; ".join(skipped) if skipped
                                                                                   else ""))
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"--resume {resume}: no such checkpoint directory")
    if not (path / STATE_FILE).is_file() and not (path / MANIFEST).is_file():
        raise ConfigError(f"--resume {resume}: not a posttrain checkpoint (no {STATE_FILE} or {MANIFEST} in it)")
    found = problems(path)
    if found:
        raise ConfigError(f"--resume {resume}: the checkpoint is damaged: {'; '.join(found)}; resume from another "
                          "one (`--resume auto` takes the newest usable one)")
    return path


def read_state(path: Path) -> RunState:
    return RunState(**json.loads((Path(path) / STATE_FILE).read_text()))
