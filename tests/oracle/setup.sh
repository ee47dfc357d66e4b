#!/usr/bin/env bash
# Creates the test oracle: the official qwen-tts package in its own virtualenv (.venv-oracle).
# It pins transformers 4.57.3, so it never shares an environment with the project.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${ORACLE_VENV:-.venv-oracle}
PY=${PYTHON:-python3}
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import qwen_tts, transformers; assert transformers.__version__ == '4.57.3'" 2>/dev/null; then
  echo "oracle venv ready: $VENV"; exit 0
fi
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q torch==2.13.0
# --no-deps: the package also requires gradio, onnxruntime, sox and torchaudio, used only by its demo and 25Hz codec.
"$VENV/bin/pip" install -q --no-deps qwen-tts==0.1.1
"$VENV/bin/pip" install -q transformers==4.57.3 accelerate==1.12.0 librosa soundfile einops safetensors numpy
echo "oracle venv ready: $VENV"
