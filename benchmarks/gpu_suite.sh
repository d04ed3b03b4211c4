#!/usr/bin/env bash
# The GPU rows of benchmarks/RESULTS.md in one call of about 8 minutes on one GPU (benchmarks/README.md, "GPU").
#
#   benchmarks/gpu_suite.sh --prepare    # here, with the network: fills .gpu/ (git-ignored, ~20 MB)
#   benchmarks/gpu_suite.sh              # there, through the device tool: run(command=..., carry=[".gpu"])
#
# What it measures, each row bounded by its own timeout so one slow row cannot take the others' time:
#   1. GRPO, LoRA r=16 on all linear layers, on a Llama-3.2-1B-shaped random-initialised model (no hub there),
#      posttrain (bf16, hf engine) against TRL's GRPOTrainer (bf16) on the same prompts, G, forced lengths:
#      s/step and peak GPU memory (bench_grpo.py --device cuda --arch llama-3.2-1b).
#   2. The CUDA path check and LoRA SFT throughput of the Llama-3.2-1B and -3.1-8B shapes (gpu_check.py).
# Not measured there: vLLM colocated (posttrain-vllm, TRL use_vllm=True). The GPU image has no vLLM, nothing can
# be installed from a registry there, and a CUDA vLLM wheel (~400 MB) is past the 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU=.gpu

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p $GPU/whl $GPU/tokenizer
    grep -qx "/$GPU/" .git/info/exclude 2>/dev/null || echo "/$GPU/" >> .git/info/exclude
    # What posttrain and TRL import that the image lacks (its package list: device tool, KINDS.md), for its
    # Python 3.12; the image's own torch, transformers, peft and accelerate are used as they are.
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d $GPU/whl pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        gguf==0.19.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19  # posttrain's and TRL's locks
    .venv/bin/python - <<'EOF'
from posttrain.models import load_tokenizer, resolve_model_path
load_tokenizer(resolve_model_path(None)).save_pretrained(".gpu/tokenizer")
EOF
    head -n 64 ../shared/data/gsm8k/train.jsonl > $GPU/gsm8k.jsonl
    du -sh $GPU
    exit 0
fi

OUT=${OUT:-/tmp/gpu-suite}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $GPU/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

timeout 330 python3 benchmarks/bench_grpo.py --device cuda --arch llama-3.2-1b --tokenizer $GPU/tokenizer \
    --data $GPU/gsm8k.jsonl --configs posttrain-auto,trl-bf16 --prompts 32 --group 8 --per-step 4 --max-new 256 \
    --micro-batch 16 --warmup 1 --steps 3 --rounds 1 --json "$OUT/grpo_1b.json" 2>&1 | tee "$OUT/grpo_1b.log" || true
timeout 150 python3 benchmarks/gpu_check.py --tokenizer $GPU/tokenizer --out "$OUT/gpu_check.json" 2>&1 \
    | tee "$OUT/gpu_check.log" || true
