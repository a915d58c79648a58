#!/usr/bin/env bash
# The accelerator suite, in one command, under 10 minutes on one H100/H200; JSON to $OUT.
#
#   bash benchmarks/gpu.sh            # on the device machine, from the repo root, with .whl carried
#   SUITE=quick bash benchmarks/gpu.sh  # only the LLM step's chunked/dense and cuDNN/XLA paths
#
# Needs the wheels of ../shared/device/prepare-wheels.sh in .whl/ (datasets, grain, ...; the
# machine's image has jax, flax, optax, torch and transformers 5, which our own models need
# only for configs and tokenizers).  Every run has its own time limit so one slow piece
# cannot eat the others; a failure is logged and the rest go on.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_suite.log"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$LOG"; exit 1; }
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # JAX and PyTorch share the GPU in torch_reference.py
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PY:-python3}

run() {  # run <seconds> <name> <command...>
  local limit=$1 name=$2; shift 2
  echo "=== $name: $* (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  echo "=== $name: rc=$? in $((SECONDS - start))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; $PY -c 'import jax; print(jax.devices())'; } >>"$LOG" 2>&1

# The LLM step on its three paths (issue 18): chunked logit terms (hidden states + heads, the
# default) with cuDNN attention, chunked with XLA attention, and the dense [B, T, V] logits
# with XLA attention (what the step was before).
llm_paths() {
  run 90 step_llama1b_chunked_cudnn $PY benchmarks/step.py --preset llama-1b --modes jit --dtypes bfloat16 \
    --remat dots --attention cudnn --steps 10 --warmup 2 --out "$OUT/step_llama1b_chunked_cudnn.json"
  run 90 step_llama1b_chunked_xla $PY benchmarks/step.py --preset llama-1b --modes jit --dtypes bfloat16 \
    --remat dots --attention xla --steps 10 --warmup 2 --out "$OUT/step_llama1b_chunked_xla.json"
  run 90 step_llama1b_dense_xla $PY benchmarks/step.py --preset llama-1b --modes jit --dtypes bfloat16 \
    --remat dots --attention xla --chunk-size 0 --steps 10 --warmup 2 --out "$OUT/step_llama1b_dense_xla.json"
}
if [ "${SUITE:-full}" = quick ]; then  # SUITE=quick: only the LLM paths (about 4 minutes)
  llm_paths
  grep -h '^|' "$LOG" > "$OUT/tables.md" || true
  echo "quick suite done in ${SECONDS}s; results in $OUT" | tee -a "$LOG"
  exit 0
fi

run 90 step_bert  $PY benchmarks/step.py --preset bert-base --modes jit,sharded,pmap --dtypes float32,bfloat16 \
  --steps 20 --warmup 3 --out "$OUT/step_bert.json"
run 120 step_gpt2  $PY benchmarks/step.py --preset gpt2 --modes jit,sharded,pmap --dtypes float32,bfloat16 \
  --steps 20 --warmup 3 --out "$OUT/step_gpt2.json"
llm_paths
run 60 compile_depth $PY benchmarks/step.py --preset gpt2 --teacher-layers 6,24 --modes jit --dtypes bfloat16 \
  --steps 3 --warmup 1 --out "$OUT/compile_depth.json"
run 55 torch_bert_f32  $PY benchmarks/torch_reference.py --preset bert-base --dtype float32 --steps 20 --warmup 3 \
  --out "$OUT/torch_bert_f32.json"
run 55 torch_bert_bf16 $PY benchmarks/torch_reference.py --preset bert-base --dtype bfloat16 --steps 20 --warmup 3 \
  --out "$OUT/torch_bert_bf16.json"
run 65 torch_gpt2_bf16 $PY benchmarks/torch_reference.py --preset gpt2 --dtype bfloat16 --steps 20 --warmup 3 \
  --out "$OUT/torch_gpt2_bf16.json"
if [ -f benchmarks/vocab_kl.py ]; then
  # vocab 128k at 8k tokens, d=2048; the script's own flags (see its docstring).
  run 60 vocab_kl $PY benchmarks/vocab_kl.py ${VOCAB_KL_ARGS:---vocab 131072 --tokens 8192 --hidden 2048} \
    --out "$OUT/vocab_kl.json"
fi
grep -h '^|' "$LOG" > "$OUT/tables.md" || true
echo "suite done in ${SECONDS}s; results in $OUT" | tee -a "$LOG"
