#!/usr/bin/env bash
# Everything only a GPU can show, in one script sized for a short GPU lease (~8 min on one H100/H200).
# After the set-up and a sandbox check, the parts named in PARTS, in that order:
#   tests      tests/test_cuda.py + the kernel tests with Triton compiled for real (not the
#              interpreter) + the sandbox's API tests (the machine's own container limits)
#   rollout    bench/bench_rollout.py --device cuda --size 0.5b  (eager and CUDA-graph decoding)
#   vstrl      bench/bench_vs_trl.py --device cuda  (rci_fast vs TRL's GRPOTrainer; needs trl)
#   trainstep  bench/bench_train_step.py --device cuda, fp32 and bf16 (training step vs transformers:
#              per-new-shape costs, kernel launches, top operators by device time)
#   logprob    bench/bench_logprob.py --gpu-only    (Qwen2.5-7B lm_head shapes, T = 4k and 16k)
#   train      the trainer under torchrun (NCCL, bf16 mixed precision): SFT on the smoke model and
#              on a 0.5B-sized one, then potential -> rl -> eval on the smoke model
#   rollout15  bench/bench_rollout.py --device cuda --size 1.5b
# Logs and JSON land in $OUT (default runs/gpu_check); the last lines printed are a summary.
#
# Usage, in the repository root of a machine with a CUDA GPU:
#     bash bench/gpu_check.sh                      # every part
#     PARTS="tests rollout" DEADLINE=300 bash bench/gpu_check.sh
# DEADLINE (seconds, default 560) bounds the whole script: a step gets at most the time left, and
# a step that would start with under 20 s left is skipped, so a lease's limit never cuts the summary.
# Python packages the machine lacks go in .whl/ first (bench/gpu_wheels.sh fetches them; carry
# .whl); they are installed into /tmp/site, which goes on PYTHONPATH (the machine is offline).
# The logs are many files: a lease that returns few should tar $OUT after this script.
set -u
OUT=${OUT:-runs/gpu_check}
PARTS=${PARTS-tests rollout vstrl trainstep logprob train rollout15}
DEADLINE=${DEADLINE:-560}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
# step NAME SECONDS CMD...: runs CMD with a time limit (at most what DEADLINE leaves), its output in
# $OUT/NAME.log
step() {
    local name=$1 limit=$2; shift 2
    local t=$(date +%s)
    local left=$(( DEADLINE - (t - T0) ))
    (( left < 20 )) && { note "[$name] skipped: ${left} s left of DEADLINE=$DEADLINE"; return 124; }
    (( limit > left )) && limit=$left
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    note "[$name] rc=$rc in $(( $(date +%s) - t )) s (at +$(( $(date +%s) - T0 )) s)"
    return $rc
}

uname -r | tee -a "$SUMMARY"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee -a "$SUMMARY"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$SUMMARY"
$PY -c "import flash_attn" 2>/dev/null && note "flash-attn: installed" || note "flash-attn: not installed (SDPA fallback)"

# -- set-up: missing packages, then rci_fast itself (builds the sandbox's C++ extension)
if ls .whl/* >/dev/null 2>&1; then
    step wheels 240 $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile \
        --target /tmp/site .whl/* && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
INSTALL=($PY -m pip install -q --no-deps --no-build-isolation --no-index -e .)
# A newer compiler may warn where ours does not: retry without -Werror rather than lose the lease.
step install 240 "${INSTALL[@]}" || { sed -i 's/"-Werror", //' setup.py; step install_no_werror 240 "${INSTALL[@]}"; } || {
    tail -20 "$OUT/install.log"; exit 1; }

# The sandbox first: the rollout tests and benchmarks need it, and a machine may refuse it.
step sandbox 60 $PY -c "from rci_fast.sandbox import Sandbox
with Sandbox(workers=1) as sb: print(sb.run('print(6 * 7)'))"
tail -4 "$OUT/sandbox.log" | tee -a "$SUMMARY"
# Which varlen kernel bf16 packed batches take (both False: the padded SDPA groups, several calls a layer)
$PY -c "from rci_fast.model import transformer as t; print('packed bf16 attention: flash-attn', t.flash_attn_varlen_func is not None, '| torch varlen_attn', t.torch_varlen_attn is not None)" 2>&1 | tail -1 | tee -a "$SUMMARY"

part_tests() {  # xdist: Triton compiles each test's kernels in parallel processes
    local xdist
    xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 4")
    step tests 240 $PY -m pytest -q -p no:cacheprovider $xdist tests/test_cuda.py tests/test_kernels.py \
        tests/test_policy_loss.py
    tail -3 "$OUT/tests.log" | tee -a "$SUMMARY"
    grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -20 | tee -a "$SUMMARY"
    # One at a time: some count the processes and folders a sandbox leaves behind.
    step tests_sandbox 120 $PY -m pytest -q -p no:cacheprovider tests/test_sandbox_api.py
    tail -3 "$OUT/tests_sandbox.log" | tee -a "$SUMMARY"
    grep -E "^(FAILED|ERROR)" "$OUT/tests_sandbox.log" | head -20 | tee -a "$SUMMARY"
}

rollout() {  # rollout SIZE
    step "bench_rollout_$1" 240 $PY bench/bench_rollout.py --device cuda --size "$1"
    grep -vE '^\{|attention mask|^\[transformers\]|^JSON' "$OUT/bench_rollout_$1.log" | tail -14 | tee -a "$SUMMARY"
    tail -1 "$OUT/bench_rollout_$1.log" > "$OUT/bench_rollout_$1.json"
}
part_rollout() { rollout 0.5b; }
part_rollout15() { rollout 1.5b; }

part_vstrl() {
    step bench_vs_trl 240 $PY bench/bench_vs_trl.py --device cuda
    grep -vE '^JSON' "$OUT/bench_vs_trl.log" | tail -30 | tee -a "$SUMMARY"
    grep '^JSON' "$OUT/bench_vs_trl.log" | cut -c6- > "$OUT/bench_vs_trl.json"
}

part_trainstep() {
    local dtype
    for dtype in fp32 bf16; do
        step "bench_train_step_$dtype" 120 $PY bench/bench_train_step.py --device cuda --dtype "$dtype"
        grep -vE '^\{|USDT|Loading|Writing' "$OUT/bench_train_step_$dtype.log" | tail -34 | tee -a "$SUMMARY"
        tail -1 "$OUT/bench_train_step_$dtype.log" > "$OUT/bench_train_step_$dtype.json"
    done
}

part_logprob() {
    step bench_logprob 200 $PY bench/bench_logprob.py --gpu-only --repeats 5
    grep -A14 "^GPU" "$OUT/bench_logprob.log" | tee -a "$SUMMARY"
    tail -1 "$OUT/bench_logprob.log" > "$OUT/bench_logprob.json"
}

# The last metrics row, and every step's time (a slow first step is compilation; all slow is not)
last_metrics() {
    tail -1 "$1/metrics.jsonl" | tee -a "$SUMMARY"
    $PY -c "import json, sys; t = [json.loads(l)['step_time_s'] for l in open(sys.argv[1])]
print('step_time_s per step:', ' '.join(f'{x:.3f}' for x in t))" "$1/metrics.jsonl" | tee -a "$SUMMARY"
}

part_train() {
    local run=$OUT/train f
    mkdir -p "$run"
    local trun=($PY -m torch.distributed.run --nproc_per_node 1 --master_port 29533 -m rci_fast)
    step gen_sft 120 $PY -m rci_fast gen-sft --teacher scripted --out "$run/sft.jsonl" --per-family 24
    step sft_smoke 180 "${trun[@]}" sft --config configs/smoke.yaml --device cuda "out_dir=$run/sft" \
        "data.train_file=$run/sft.jsonl" train.max_steps=30 && last_metrics "$run/sft"
    step sft_0.5b 180 "${trun[@]}" sft --config configs/smoke.yaml --device cuda "out_dir=$run/sft05" \
        "data.train_file=$run/sft.jsonl" train.max_steps=12 train.micro_batch_tokens=16384 train.batch_size=32 \
        model.tiny.vocab_size=8192 model.tiny.hidden_size=896 model.tiny.intermediate_size=4864 \
        model.tiny.num_hidden_layers=24 model.tiny.num_attention_heads=14 model.tiny.num_key_value_heads=2 \
        checkpoint.every=1000 checkpoint.export_at_end=false && last_metrics "$run/sft05"
    local common=(--config configs/smoke-rl.yaml --device cuda "out_dir=$run/rl" "model.path=$run/sft/hf")
    step potential 120 "${trun[@]}" potential "${common[@]}"
    step rl 180 "${trun[@]}" rl "${common[@]}" && last_metrics "$run/rl"
    # The same run with eager decoding (graphs are the default on a GPU) and the one-pass loss:
    # equal losses say the graphs sampled the same tokens.
    step rl_eager 180 "${trun[@]}" rl "${common[@]}" "out_dir=$run/rle" curriculum.mode=uniform \
        rollout.cuda_graphs=false algo.one_pass_loss=true && last_metrics "$run/rle"
    step eval 120 "${trun[@]}" eval "${common[@]}" && grep -E "mode\]|mean" "$OUT/eval.log" | head -6 | tee -a "$SUMMARY"
    for f in sft_smoke sft_0.5b potential rl rl_eager eval; do
        [ -f "$OUT/$f.log" ] && grep -qE "Error|Traceback" "$OUT/$f.log" && {
            note "--- $f.log (tail)"; tail -15 "$OUT/$f.log" | tee -a "$SUMMARY"; }
    done
}

for part in $PARTS; do
    declare -F "part_$part" >/dev/null || { note "unknown part '$part' (see the top of this script)"; continue; }
    "part_$part"
done
note "total $(( $(date +%s) - T0 )) s"
