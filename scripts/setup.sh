#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtualenv in .venv with the CPU build of torch and
# mlaunch installed; with --test also the test extras and the Debian packages the SSH tests need.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if [[ $want_test == 1 && -f .ci/apt-packages.txt ]]; then
  missing=()
  while read -r pkg; do
    [[ -z "$pkg" || "$pkg" == \#* ]] && continue
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done < .ci/apt-packages.txt
  if (( ${#missing[@]} )); then
    SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

PY=${PYTHON:-python3}
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
# torch first, pinned: an unpinned `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
if [[ $want_test == 1 ]]; then pip install -e ".[test]"; else pip install -e .; fi
