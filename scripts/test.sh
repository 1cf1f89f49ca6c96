#!/usr/bin/env bash
# Run the test suite under every supported TransformerLens line:
#   TL 3.9 (HookedTransformer and TransformerBridge) and TL 4.3 (TransformerBridge).
# Each gets its own virtualenv (.venv-tl<version>), created on first use and reused.
# TORCH_SPEC picks the torch build installed first (default: the CPU wheel torch==2.13.0).
set -uo pipefail
cd "$(dirname "$0")/.."
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
status=0
for tl in 3.9.0 4.3.0; do
  venv=".venv-tl$tl"
  if ! "$venv/bin/python" -c "import tl_transcoders, pytest, nbclient, ipykernel, gguf, plotly" 2>/dev/null; then
    echo "== creating $venv (transformer-lens==$tl)"
    python3 -m venv "$venv" &&
      "$venv/bin/pip" install -q --disable-pip-version-check "$torch_spec" &&
      "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]" "transformer-lens==$tl" ||
      { echo "failed to set up $venv"; exit 1; }
  fi
  echo "== tests with transformer-lens $tl"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" || status=1
done
exit $status
