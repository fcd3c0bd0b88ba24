#!/usr/bin/env bash
# The test command (README and CI run exactly this):   bash tests/run.sh [latest|axolotl|all]
#
# Builds a virtualenv per environment and runs the CPU suite in it:
#   latest   newest transformers / peft / trl / lightning / bitsandbytes, no axolotl
#   axolotl  axolotl 0.19 with the older transformers / peft / trl it pins
#   all      both, one after the other (default)
# Virtualenvs live in .venv-<env> (reused when present; SLOTH_VENV_DIR moves them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
which=${1:-all}
venv_dir=${SLOTH_VENV_DIR:-$PWD}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       DO_NOT_TRACK=1 AXOLOTL_DO_NOT_TRACK=1 WANDB_MODE=disabled UNSLOTH_DISABLE_STATISTICS=1 \
       PIP_DISABLE_PIP_VERSION_CHECK=1 DS_BUILD_OPS=0

setup() {
  local env=$1 venv="$venv_dir/.venv-$1"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q -c tests/constraints-cpu.txt torch==2.13.0
  case $env in
    # studio + selenium + Chromium: sloth studio's tests (tests/studio; without them the app/browser tests skip)
    # deepspeed: its pure-Python install (DS_BUILD_OPS=0, set below); tests/test_deepspeed.py runs it on its
    # CPU accelerator over gloo and builds its one small C++ op on first use
    latest)  "$venv/bin/pip" install -q -c tests/constraints-cpu.txt -e ".[hf,lightning,qlora,dev,studio,deepspeed]" "selenium>=4.20"
             browser ;;
    # deepspeed here too: Axolotl's `deepspeed:` key with the plugin (tests/test_deepspeed.py, ~4 min of CPU)
    axolotl) "$venv/bin/pip" install -q -c tests/constraints-cpu.txt -e ".[axolotl,lightning,dev,deepspeed]" ;;
  esac
}

# tests/studio/test_browser.py drives headless Chromium (Debian's package); without it that test skips.
browser() {
  command -v chromium >/dev/null && command -v chromedriver >/dev/null && return
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || echo "=== chromium not installed: the browser test skips"
  else
    echo "=== no chromium (apt-get install chromium chromium-driver): the browser test skips"
  fi
}

run_env() {
  local env=$1 venv="$venv_dir/.venv-$1" t0=$SECONDS
  echo "=== [$env] installing into $venv"
  setup "$env"
  # -P: never put the repo root (our kernels/ folder) on sys.path
  "$venv/bin/python" -P -c "import torch, transformers, peft, trl; print('[$env] torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'trl', trl.__version__)"
  if [ "$env" = latest ]; then
    echo "=== [$env] ruff (pyproject.toml [tool.ruff])"
    "$venv/bin/ruff" check .
  fi
  echo "=== [$env] pytest (installed in $((SECONDS - t0)) s)"
  # never `python -m pytest`: it puts the repo root (our kernels/ folder) on sys.path
  "$venv/bin/pytest" -m "not gpu" -q -p no:randomly tests
}

case $which in
  latest|axolotl) run_env "$which" ;;
  all) run_env latest; run_env axolotl ;;
  *) echo "usage: bash tests/run.sh [latest|axolotl|all]" >&2; exit 2 ;;
esac
