#!/usr/bin/env bash
# One check-and-benchmark pass on the GPU machine (device tool): tests, server load, kvpage bench.
# Usage (from the repository root, on the device):  bash benchmarks/device_pass.sh STAGE
# Stages, each under the device's 10-minute limit per command:
#   tests | bench | swap (= tests + the preemption-mode bench): the engine, server and kvpage bench;
#   gpu: the Triton kernels and CUDA runner (issue #3): kernel and CUDA-engine tests, kvpage's offline
#        throughput with and without CUDA graphs, host overhead, decode-attention bandwidth (no FlexAttention);
#   baselines: transformers' generate_batch (whole workload) and generate (32 requests, extrapolated), and
#        decode attention against FlexAttention (its partial-block mask);
#   final: the fused-kernel and CUDA-engine tests, kvpage's throughput and host overhead, and
#        hf-generate with batches capped at 256 new tokens;
#   core: the scheduling core (issue #14) on the GPU: the kernel, async and CUDA-engine tests, then kvpage's
#        offline throughput and host overhead against the commit before, carried as .base/kvpage (alternated);
#   replay: the planner's speed on the host's CPU cores, all at once, one core a run: the 100,000-request
#        replay three times for this tree and for .base (the commit before #14, kvpage and benchmarks), the
#        default planner command for this tree and for .prev (an earlier checkout, kvpage and benchmarks);
#   tp: issue #18 on one GPU: the CUDA-engine, async, kernel and tensor-parallel tests (gloo ranks on the
#        host's CPUs; NCCL needs two GPUs), then kvpage's offline throughput at tp = 1 against .base (the
#        commit before tensor parallelism, kvpage and benchmarks), alternated, two rounds;
#   real: issue #15 on the GPU: a GGUF file (.gpu/smollm2-4l.gguf, the first layers of SmolLM2's, made by
#        benchmarks/small_gguf.py) against transformers, the prompt-logprob, sampling, kernel, async and CUDA
#        tests, and host overhead against .base (the commit before, kvpage and benchmarks), alternated.
#   fp8: issue #17: the FP8 KV tests (kernels compiled), the kernel, fused, async and CUDA-engine tests, then
#        benchmarks/fp8_kv.py (decode attention bf16 against FP8 pages, and end to end at a binding KV budget);
#   fp8-sweep: the FP8 KV tests on the GPU, then the decode kernel's tunings (tiles, warps, stages, FMA products)
#        on bf16 and FP8 pages; fp8-decode: the kernel and CUDA-engine tests, then the decode table and one e2e round.
# Wheels for what the device lacks (pytest, hypothesis, fastapi stack, openai) come from .whl/.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; python -c "import torch, transformers, sys; \
print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  > "$OUT/versions.txt" 2>&1
STAGE=${1:-tests}
# against_base ROUNDS [host]: kvpage's offline throughput (and host overhead) for this tree and .base, alternated.
against_base() {
  for round in $(seq "$1"); do
    for tree in "$PWD" "$PWD/.base"; do
      name=$([ "$tree" = "$PWD" ] && echo this || echo base)
      PYTHONPATH=/tmp/site:$tree timeout 90 python benchmarks/offline_throughput.py --systems kvpage \
        --model-dir /tmp/qwen3 >> "$OUT/log.txt" 2>&1
      echo "offline $name $round rc=$?" >> "$OUT/log.txt"
      if [ "${2:-}" = host ]; then
        PYTHONPATH=/tmp/site:$tree timeout 60 python benchmarks/host_overhead.py --model-dir /tmp/qwen3 \
          >> "$OUT/log.txt" 2>&1
        echo "host $name $round rc=$?" >> "$OUT/log.txt"
      fi
    done
  done
}
if [ "$STAGE" = fp8 ]; then
timeout 230 python -m pytest -q -p no:cacheprovider tests/test_fp8_kv.py tests/test_fp8_engine.py \
  tests/test_triton_kernels.py tests/test_fused_kernels.py tests/test_async_scheduling.py tests/gpu \
  > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
timeout 330 python benchmarks/fp8_kv.py --rounds 1 --json "$OUT/fp8_kv.json" > "$OUT/fp8_kv.txt" 2>&1
echo "fp8_kv rc=$?" >> "$OUT/fp8_kv.txt"
fi
if [ "$STAGE" = fp8-sweep ]; then
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_fp8_kv.py tests/gpu/test_cuda_engine.py -k "fp8 or 8_bit \
  or tuning or scale or round_trip" > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
timeout 360 python benchmarks/fp8_kv.py --parts sweep --json "$OUT/fp8_sweep.json" > "$OUT/fp8_sweep.txt" 2>&1
echo "fp8_sweep rc=$?" >> "$OUT/fp8_sweep.txt"
fi
if [ "$STAGE" = fp8-decode ]; then
timeout 200 python -m pytest -q -p no:cacheprovider tests/test_fp8_kv.py tests/test_triton_kernels.py \
  tests/gpu/test_cuda_engine.py > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
timeout 300 python benchmarks/fp8_kv.py --parts decode,e2e --rounds 1 --json "$OUT/fp8_decode.json" \
  > "$OUT/fp8_decode.txt" 2>&1
echo "fp8_decode rc=$?" >> "$OUT/fp8_decode.txt"
fi
if [ "$STAGE" = tests ] || [ "$STAGE" = swap ]; then
timeout 300 python -m pytest -q -x -p no:cacheprovider > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
fi
if [ "$STAGE" = swap ]; then
timeout 240 python -m kvpage.cli bench --device cuda --layouts paged --preemption-modes swap,auto --sharing-n "" --beam-widths "" \
  --out /tmp/bench-swap > "$OUT/bench-swap.txt" 2>&1
cp /tmp/bench-swap/report.json "$OUT/bench-swap.json"
fi
if [ "$STAGE" = tests ]; then
timeout 120 python benchmarks/serve_load.py --launch --num-prompts 400 --json "$OUT/serve_load_inf.json" \
  -- --device cuda > "$OUT/serve_load_inf.txt" 2>&1
timeout 120 python benchmarks/serve_load.py --launch --num-prompts 400 --request-rate 50 \
  --json "$OUT/serve_load_r50.json" -- --device cuda > "$OUT/serve_load_r50.txt" 2>&1
fi
if [ "$STAGE" = bench ]; then
timeout 300 python -m kvpage.cli bench --device cuda --out /tmp/bench-demo > "$OUT/bench-demo.txt" 2>&1
cp /tmp/bench-demo/report.json "$OUT/bench-demo.json"
python - <<'PY' > "$OUT/long-model.txt" 2>&1
from dataclasses import replace
from pathlib import Path
from kvpage.model.random_model import RANDOM_MODEL_SPEC, build_random_model
spec = replace(RANDOM_MODEL_SPEC, name="random-4k", max_position_embeddings=4096)
Path("/tmp/random-4k").mkdir(exist_ok=True)
build_random_model(Path("/tmp/random-4k"), spec)
print("built /tmp/random-4k")
PY
timeout 270 python -m kvpage.cli bench --device cuda --model /tmp/random-4k --max-model-len 2048 \
  --workloads sharegpt,alpaca,long-single --kv-tokens 16384 --num-requests 128 --sharing-n "" --preemption-modes "" \
  --out /tmp/bench-2k > "$OUT/bench-2k.txt" 2>&1
cp /tmp/bench-2k/report.json "$OUT/bench-2k.json"
fi
if [ "$STAGE" = gpu ]; then
  export KVPAGE_REPORT_DIR="$OUT" PYTHONUNBUFFERED=1
  timeout 170 python -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_fused_kernels.py \
    tests/test_async_scheduling.py tests/gpu > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
  timeout 100 python benchmarks/offline_throughput.py --systems kvpage,kvpage-eager --model-dir /tmp/qwen3 \
    --json "$OUT/offline_kvpage.json" > "$OUT/log.txt" 2>&1; echo "offline rc=$?" >> "$OUT/log.txt"
  timeout 60 python benchmarks/host_overhead.py --model-dir /tmp/qwen3 --json "$OUT/host_overhead.json" \
    >> "$OUT/log.txt" 2>&1; echo "host rc=$?" >> "$OUT/log.txt"
  timeout 50 python benchmarks/decode_attention.py --no-flex --json "$OUT/decode_attention.json" \
    >> "$OUT/log.txt" 2>&1; echo "decode rc=$?" >> "$OUT/log.txt"
fi
if [ "$STAGE" = baselines ]; then
  export PYTHONUNBUFFERED=1
  timeout 300 python benchmarks/offline_throughput.py --systems hf-batch --model-dir /tmp/qwen3 \
    --json "$OUT/offline_hf_batch.json" > "$OUT/log.txt" 2>&1; echo "hf-batch rc=$?" >> "$OUT/log.txt"
  timeout 100 python benchmarks/offline_throughput.py --systems hf-generate --hf-generate-requests 32 \
    --hf-generate-batch 32 --model-dir /tmp/qwen3 --json "$OUT/offline_hf_generate.json" >> "$OUT/log.txt" 2>&1
  echo "hf-generate rc=$?" >> "$OUT/log.txt"
  timeout 180 python benchmarks/decode_attention.py --flex-masks partial --json "$OUT/decode_flex.json" \
    >> "$OUT/log.txt" 2>&1; echo "decode rc=$?" >> "$OUT/log.txt"
fi
if [ "$STAGE" = final ]; then  # after changes: their tests on the GPU, kvpage's figures, capped hf-generate
  export KVPAGE_REPORT_DIR="$OUT" PYTHONUNBUFFERED=1
  timeout 100 python -m pytest -q -p no:cacheprovider tests/test_fused_kernels.py \
    "tests/gpu/test_cuda_engine.py::test_gpu_memory_utilization_bounds_the_peak" \
    "tests/gpu/test_cuda_engine.py::test_float32_on_cuda_matches_transformers" > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest.txt"
  timeout 80 python benchmarks/offline_throughput.py --systems kvpage --model-dir /tmp/qwen3 \
    --json "$OUT/offline_kvpage.json" > "$OUT/log.txt" 2>&1; echo "offline rc=$?" >> "$OUT/log.txt"
  timeout 60 python benchmarks/host_overhead.py --model-dir /tmp/qwen3 --json "$OUT/host_overhead.json" \
    >> "$OUT/log.txt" 2>&1; echo "host rc=$?" >> "$OUT/log.txt"
  timeout 120 python benchmarks/offline_throughput.py --systems hf-generate --hf-generate-max-new 256 \
    --model-dir /tmp/qwen3 --json "$OUT/offline_hf_generate.json" >> "$OUT/log.txt" 2>&1
  echo "hf-generate rc=$?" >> "$OUT/log.txt"
fi
if [ "$STAGE" = core ]; then  # three files come back: versions.txt, pytest.txt, log.txt
  export PYTHONUNBUFFERED=1
  timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu tests/test_async_scheduling.py tests/test_triton_kernels.py \
    tests/test_fused_kernels.py tests/test_engine_triton.py tests/test_step_loop.py > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest.txt"
  against_base 2 host
fi
if [ "$STAGE" = tp ]; then  # versions.txt, pytest.txt, log.txt
  export PYTHONUNBUFFERED=1
  timeout 200 python -m pytest -q -p no:cacheprovider tests/gpu tests/test_async_scheduling.py \
    tests/test_tensor_parallel.py > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$?" >> "$OUT/pytest.txt"
  against_base 2
fi
if [ "$STAGE" = replay ]; then  # one file a run, plus versions.txt
  export PYTHONUNBUFFERED=1
  for round in 1 2 3; do
    PYTHONPATH=$PWD/.base taskset -c "$round" timeout 300 python .base/benchmarks/plan_speed.py --num 100000 \
      > "$OUT/plan_speed_base_$round.txt" 2>&1 &
    PYTHONPATH=$PWD taskset -c "$((round + 3))" timeout 300 python benchmarks/plan_speed.py --num 100000 \
      > "$OUT/plan_speed_this_$round.txt" 2>&1 &
  done
  PYTHONPATH=$PWD taskset -c 8 python benchmarks/plan_default.py --num 5000 20000 --timeout 300 \
    > "$OUT/plan_default_this.txt" 2>&1 &
  PYTHONPATH=$PWD taskset -c 12 python benchmarks/plan_default.py --num 100000 --timeout 320 \
    > "$OUT/plan_default_this_100k.txt" 2>&1 &
  PYTHONPATH=$PWD/.prev taskset -c 9 python .prev/benchmarks/plan_default.py --code "$PWD/.prev" --num 5000 20000 \
    --timeout 300 > "$OUT/plan_default_prev.txt" 2>&1 &
  PYTHONPATH=$PWD taskset -c 10 python benchmarks/plan_default.py --num 5000 --timeout 300 -- --kv-tokens 8192 \
    > "$OUT/plan_default_this_tight.txt" 2>&1 &
  PYTHONPATH=$PWD/.prev taskset -c 11 python .prev/benchmarks/plan_default.py --code "$PWD/.prev" --num 5000 \
    --timeout 300 -- --kv-tokens 8192 > "$OUT/plan_default_prev_tight.txt" 2>&1 &
  wait
fi
if [ "$STAGE" = real ]; then  # issue #15 on the GPU: GGUF, prompt logprobs, sampling; host overhead vs .base
  export PYTHONUNBUFFERED=1 KVPAGE_TEST_GGUF=$PWD/.gpu/smollm2-4l.gguf
  timeout 280 python benchmarks/gguf_gpu_check.py "$KVPAGE_TEST_GGUF" --json "$OUT/gguf_gpu.json" \
    > "$OUT/log.txt" 2>&1; echo "gguf rc=$?" >> "$OUT/log.txt"
  timeout 230 python -m pytest -q -p no:cacheprovider -rs tests/test_prompt_logprobs.py tests/test_sampling.py \
    tests/test_sampling_distributions.py tests/test_sampling_exact.py tests/test_sampling_kernel.py \
    tests/test_engine_triton.py tests/test_async_scheduling.py tests/gpu tests/test_fused_kernels.py \
    > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest.txt"
  for round in 1 2; do
    for tree in "$PWD" "$PWD/.base"; do
      name=$([ "$tree" = "$PWD" ] && echo this || echo base)
      PYTHONPATH=/tmp/site:$tree timeout 90 python "$tree/benchmarks/host_overhead.py" --model-dir /tmp/qwen3 \
        --json "$OUT/host_${name}_$round.json" >> "$OUT/log.txt" 2>&1
      echo "host $name $round rc=$?" >> "$OUT/log.txt"
    done
  done
fi
echo "$STAGE done" >> "$OUT/log.txt"
