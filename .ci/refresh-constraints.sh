#!/usr/bin/env bash
# Regenerate .ci/constraints.txt, the tested set of versions README's Quickstart commands install (`pip install -c`).
#
#   bash .ci/refresh-constraints.sh       # ~3 min: a fresh venv, README's install without constraints, pip freeze
#
# Then run the suite with the new set on a fresh clone (README's second Quickstart command) and commit the file only
# if it passes. pyproject.toml keeps its ranges for library users; this file pins what CI tested. torch is left out:
# README's commands pin it themselves (GPU users bring their own CUDA build), and so is posttrain itself.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/.ci/constraints.txt"
torch_pin=$(grep -o 'torch==[0-9][0-9.]*[0-9]' "$REPO/README.md" | head -n 1)
[[ -n "$torch_pin" ]] || { echo "refresh-constraints: no torch==X pin found in README.md" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -m venv "$tmp/venv"
"$tmp/venv/bin/pip" install -q --disable-pip-version-check "$torch_pin" -e "$REPO[test]"
{
    echo "# The versions README's Quickstart commands install and CI tests: \`pip install -c .ci/constraints.txt ...\`."
    echo "# Written by .ci/refresh-constraints.sh on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" -V) and $torch_pin"
    echo "# (pinned on README's command lines, so not here). Regenerate with that script; do not edit by hand."
    "$tmp/venv/bin/pip" freeze --exclude-editable --disable-pip-version-check | grep -v -i -e '^torch==' -e '^posttrain'
} > "$tmp/constraints.txt"
mv "$tmp/constraints.txt" "$OUT"
echo "refresh-constraints: wrote $OUT ($(grep -vc '^#' "$OUT") packages); now run the suite with it on a fresh clone"
