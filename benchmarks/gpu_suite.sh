#!/usr/bin/env bash
# Every GPU measurement the open issues ask for, in one call: GPU time is lent in short leases, so one prepared
# run writes every result file. Each step has a time cap and the whole run a deadline; a step that hits its cap
# keeps what it wrote (the scripts write results incrementally) and the next step starts.
#
#   bash benchmarks/gpu_suite.sh RESULTS_DIR [SECONDS]
#
# The first lease (2026-11-30, 15 minutes) ran out before the compiled, SDXL keep 0.6/0.4, stack and the
# 500-prompt wall-time steps finished: with one lease, run STEPS="..." subsets in priority order.
# RESULTS_DIR receives the JSON files (copy them to benchmarks/results/ and run benchmarks/render_readme.py)
# and a log per step. SECONDS (default 560) is the whole run's deadline. STEPS="name ..." runs only those steps;
# WALL_PROMPTS sets calibration_wall's prompt count (default 500) for a shorter lease.
set -u
results=${1:?usage: gpu_suite.sh RESULTS_DIR [SECONDS]}
deadline=$(( $(date +%s) + ${2:-560} ))
mkdir -p "$results"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

step() {  # step NAME CAP_SECONDS python args...
    local name=$1 cap=$2; shift 2
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then return; fi
    local left=$(( deadline - $(date +%s) - 5 ))
    (( left < cap )) && cap=$left
    if (( cap < 20 )); then echo "== $name: skipped (deadline)"; return; fi
    echo "== $name (cap ${cap}s): $*"
    local t0; t0=$(date +%s)
    timeout --signal=INT --kill-after=15 "$cap" "${PYTHON:-python3}" "$@" >"$results/$name.log" 2>&1
    echo "   exit $? after $(( $(date +%s) - t0 ))s; last lines:"; tail -n 3 "$results/$name.log" | cut -c1-300
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# fail fast (seconds, not the lease) when the environment is not what the steps need
"${PYTHON:-python3}" -c "import torch, diffusers, slimdiff_diffusers; assert torch.cuda.is_available(); \
print('torch', torch.__version__, 'diffusers', diffusers.__version__)" || exit 3

# issue 9: a user's pipe.slim() on the SD1.5 configuration, 500 prompts x 25 steps, wall time and peak memory
# (bf16: random weights overflow fp16's range inside the calibration; the timing is the same class). The cap
# leaves room for it: 64 prompts took 46 s of calibration on an H200 (2026-11-30), so 500 take ~6 min; the
# first lease's 330 s cap would have cut it.
step calibration_wall 480 benchmarks/calibration_wall.py --device cuda --dtype bfloat16 --prompts ${WALL_PROMPTS:-500} --steps 25 \
    --out "$results/calibration_wall_cuda.json"
# issue 13 (3): fp16 speed tables, batch 1 and 4, eager
step speed_sd15 60 benchmarks/speed.py --arch sd15 --device cuda --dtype float16 --resolution 512 --batch 1 4 16 \
    --budget flops --keep 0.8 0.6 0.4 --remove --repeats 10 --loop-resolution 512 --loop-batch 1 4 \
    --out "$results/speed_sd15_cuda_flops.json"
step speed_sdxl 80 benchmarks/speed.py --arch sdxl --device cuda --dtype float16 --resolution 1024 --batch 1 4 \
    --budget flops --keep 0.8 0.6 0.4 --remove --repeats 5 --loop-resolution 1024 --loop-batch 1 \
    --out "$results/speed_sdxl_cuda_flops.json"
# issue 13 (3): the same with torch.compile at the stack table's FLOP budget 0.6; CUDA graphs (reduce-overhead)
# take the launch cost out, which bounds eager SD1.5 at 512 px (22 ms at batch 1 and 4 alike, 2026-11-30)
step speed_sd15_compile 150 benchmarks/speed.py --arch sd15 --device cuda --dtype float16 --resolution 512 \
    --batch 1 4 --budget flops --keep 0.6 --remove --repeats 10 --compile --compile-mode reduce-overhead \
    --out "$results/speed_sd15_cuda_flops_compile_reduce_overhead.json"
# issue 13 (2, 3): the stack table on the GPU
step stack_sd15 120 benchmarks/stack.py --device cuda --dtype bfloat16 --model sd15 --resolution 512 --steps 25 \
    --compile off --repeats 3 --eval-prompts 8 --eval-seeds 1 \
    --out "$results/stack_sd15_cuda.json"
step speed_sdxl_compile 150 benchmarks/speed.py --arch sdxl --device cuda --dtype float16 --resolution 1024 \
    --batch 1 4 --budget flops --keep 0.6 --remove --repeats 5 --compile \
    --out "$results/speed_sdxl_cuda_flops_compile.json"
echo "== done; files:"; ls -la "$results"
