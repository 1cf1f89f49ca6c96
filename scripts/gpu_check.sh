#!/usr/bin/env bash
# The GPU check: the `cuda` tests, then benchmarks/gpu.py, on a machine with an NVIDIA GPU
# and no internet access whose Python already has torch, transformers, einops, jaxtyping,
# safetensors and tokenizers (and the usual numpy / pandas / pyarrow / pyyaml / tqdm).
#
#   bash scripts/gpu_check.sh --download   # on a machine with PyPI: fill .whl/ with the
#                                          # wheels the GPU machine lacks (about 3 MB)
#   bash scripts/gpu_check.sh              # on the GPU machine, from the repository root
#
# The second installs .whl/ into a private folder (--target, nothing else is touched),
# runs `pytest -m cuda`, then the benchmark, which writes benchmarks/results/gpu_check.json
# (or $GPU_CHECK_OUT). Everything within 8 minutes on an H200.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU machine's image lacks: TransformerLens and beartype, datasets and the
# small packages they import that the image does not hold. Pure-Python wheels.
# (datasets 5.2 needs pyarrow >= 24 and huggingface-hub >= 1.31, which the image has.)
WHEELS=(
  "transformer-lens==3.9.0" "beartype==0.23.1" "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
  "better-abc==0.0.3" "fancy-einsum==0.0.3" "typeguard==4.6.1" "transformers-stream-generator==0.0.5"
)

if [[ "${1:-}" == "--download" ]]; then
  mkdir -p .whl
  python3 -m pip download --quiet --no-deps --dest .whl "${WHEELS[@]}"
  ls .whl
  exit 0
fi

python=${PYTHON:-python3}
site=${GPU_CHECK_SITE:-/tmp/tl-transcoders-site}
if ! ls .whl/*.whl >/dev/null 2>&1 && ! ls .whl/*.tar.gz >/dev/null 2>&1; then
  echo "no wheels in .whl/: run 'bash scripts/gpu_check.sh --download' on a machine with PyPI first" >&2
  exit 1
fi
"$python" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*
export PYTHONPATH="$PWD:$PWD/benchmarks:$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
"$python" -c "import torch, transformer_lens, tl_transcoders; print('torch', torch.__version__, '| CUDA', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

start=$SECONDS
"$python" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
echo "== cuda tests: $((SECONDS - start)) s"
"$python" benchmarks/gpu.py --out "${GPU_CHECK_OUT:-benchmarks/results/gpu_check.json}" "$@"
echo "== gpu check done in $((SECONDS - start)) s"
