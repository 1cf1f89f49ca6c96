#!/usr/bin/env bash
# The test command: ruff (lint and format), the import-layer contract, then the test suite
# under every supported TransformerLens line, each in its own virtualenv (.venv-tl<version>,
# made on first use and reused):
#   TL 3.9 (HookedTransformer and TransformerBridge) and TL 4.3 (TransformerBridge), with
#   torch $TORCH_SPEC (default: the CPU wheel torch==2.13.0);
#   TL 2.16 (HookedTransformer) with the oldest torch, datasets and transformers the
#   package claims (the floors in pyproject.toml are the versions tested here).
# The virtualenvs are made in the background while earlier lines test, and each suite runs
# in two pytest workers (pytest-xdist), one torch thread each.
# Arguments are passed to pytest (e.g. -k splice).
set -uo pipefail
cd "$(dirname "$0")/.."
torch_spec="${TORCH_SPEC:-torch==2.13.0}"
lines=("3.9.0" "4.3.0" "2.16.0")
declare -A extra=(
  ["3.9.0"]="$torch_spec transformer-lens==3.9.0"
  ["4.3.0"]="$torch_spec transformer-lens==4.3.0"
  ["2.16.0"]="torch==2.6.0 transformer-lens==2.16.0 datasets==2.19.0 transformers<5 numpy<2 pyarrow<20 beartype==0.14.1"
)
check="import tl_transcoders, pytest, xdist, nbclient, ipykernel, gguf, plotly, websocket"

make_venv() {  # make_venv VERSION LOG: install the package and its test extras for one TL line
  local tl=$1 venv=".venv-tl$1"
  if "$venv/bin/python" -c "$check" 2>/dev/null; then return 0; fi
  rm -rf "$venv"
  python3 -m venv "$venv" &&
    "$venv/bin/pip" install -q --disable-pip-version-check ${extra[$tl]%% *} &&
    "$venv/bin/pip" install -q --disable-pip-version-check -e ".[test]" ${extra[$tl]#* }
}

# The graph viewer's browser test drives headless Chromium: the Debian package, installed
# here when it is missing and this user can (root with apt-get), alongside the virtualenvs;
# where it cannot be, that one test is skipped and says so.
chromium_maker=""
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium ||
    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }; } > .chromium.log 2>&1 &
  chromium_maker=$!
fi

declare -A maker
for tl in "${lines[@]}"; do
  make_venv "$tl" > ".venv-tl$tl.log" 2>&1 &
  maker[$tl]=$!
  wait "${maker[${lines[0]}]}" 2>/dev/null || true  # the first line is needed first: make it alone
done

if [ -n "$chromium_maker" ] && ! wait "$chromium_maker"; then
  echo "Chromium could not be installed (see .chromium.log): the viewer's browser test will be skipped"
fi

status=0
first=1
for tl in "${lines[@]}"; do
  venv=".venv-tl$tl"
  if ! wait "${maker[$tl]}" 2>/dev/null && ! "$venv/bin/python" -c "$check" 2>/dev/null; then
    echo "failed to set up $venv:"; tail -20 "$venv.log"; exit 1
  fi
  if [ $first = 1 ]; then
    echo "== ruff and the import contract"
    "$venv/bin/ruff" check . && "$venv/bin/ruff" format --check . && "$venv/bin/lint-imports" --no-cache || status=1
    first=0
  fi
  echo "== tests with transformer-lens $tl"
  OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider -n 2 "$@" || status=1
done
exit $status
