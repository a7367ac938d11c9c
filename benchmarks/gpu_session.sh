#!/usr/bin/env bash
# Everything the speed issue needs from one GPU lease, most important first, in one device call.
#
# A task is lent 15 minutes of device time in all, the machine's start included, and one call runs
# 10 minutes at most: so this is one call. Each stage adds its output to $OUT/FILE.md; a stage runs
# for at most its own limit and never past the deadline (BUDGET_S seconds from the start), and what
# was cut short or skipped is said in $OUT/session.md. Eight files at most come back from $OUT: this
# writes seven (the compiled stages share one, and so do the last two) and session.md.
#
#     BUDGET_S=540 bash benchmarks/gpu_session.sh        # on the GPU machine, from the repo root
#     STAGES="tests jpeg" BUDGET_S=200 bash benchmarks/gpu_session.sh   # a second call, for what was left
#
# The machine lacks kornia: carry its wheels in .whl (docs/performance.md says how to fetch them).
set -u
OUT=${OUT:-gpu-session}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${BUDGET_S:-540} ))
summary="$OUT/session.md"
export PYTHONUNBUFFERED=1

if ls .whl/*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "could not install the carried wheels" >> "$summary"; exit 1; }
fi
export PYTHONPATH=/tmp/site:src
{
    echo "# GPU session, $(date -u +%F)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
    echo "cores: $(nproc)"
} >> "$summary" 2>&1

# stage NAME FILE LIMIT_S COMMAND...: the command's output added to $OUT/FILE.md, its fate in session.md.
# STAGES="tests jpeg" runs only the stages named (a second call, when the first left some undone).
stage() {
    local name=$1 file=$2 limit=$3 left
    shift 3
    if [[ -n "${STAGES:-}" && " $STAGES " != *" $name "* ]]; then
        return
    fi
    left=$(( deadline - $(date +%s) ))
    if (( left < 20 )); then
        echo "- $name: skipped, the budget was spent" >> "$summary"
        return
    fi
    (( limit > left )) && limit=$left
    local start=$(date +%s)
    echo "## $name" >> "$OUT/$file.md"
    timeout "$limit" "$@" >> "$OUT/$file.md" 2>&1
    local code=$? seconds=$(( $(date +%s) - start ))
    case $code in
        0) echo "- $name: done in ${seconds} s" >> "$summary" ;;
        124) echo "- $name: cut short at its ${limit} s limit" >> "$summary" ;;
        *) echo "- $name: exit code $code after ${seconds} s" >> "$summary" ;;
    esac
}

# The first session (2026-12-04) measured every workload uncompiled and ran the tests; its compiled stages ran
# out of time while compiling. So the compiled rows come first now, one process and one limit per workload (a
# fresh `residual train`'s warm-up, start-up included), and each prints residual's figure before the peer
# compiles, so a row cut short still has it. First, a minute that answers why bf16 inference ran at 0.83x.
stage breakdown breakdown 60 python3 benchmarks/inference_breakdown.py --device cuda
# The small nets compiled (CUDA graphs, chosen for their 32 px inputs): the 70,000 and 100,000 goals.
stage compiled-resnet56 compiled 110 python3 benchmarks/gpu.py --compiled-only --only "resnet56"
stage compiled-resnet18 compiled 100 python3 benchmarks/gpu.py --compiled-only --only "CIFAR-style"
# ResNet-50 compiled: the 8,000 and 32,000 goals, and after how many steps compiling repays itself.
stage compiled-resnet50-train compiled 140 python3 benchmarks/gpu.py --compiled-only --only "resnet50 train, batch"
stage compiled-resnet50-inference compiled 120 \
    python3 benchmarks/gpu.py --compiled-only --only "resnet50 inference, batch"
# Is the GPU path right? CUDA tests, torchvision parity, nvjpeg decoding (the demo model trains once).
stage tests tests 110 python3 -m pytest -q -p no:cacheprovider -k "cuda or torchvision or device" \
    tests/test_bench.py tests/test_data.py tests/test_device_decode.py tests/test_torchvision_parity.py \
    tests/test_serve.py
# The JPEG rows, with both decoders (cut short in the first session).
stage jpeg jpeg 100 python3 benchmarks/gpu.py --no-compile --only "JPEG"
# The same accuracy on shapes: the demo recipe in fp32, bf16 and compiled, two seeds.
stage accuracy accuracy 120 python3 benchmarks/fast_path_accuracy.py --device cuda --data /tmp/shapes-32
# The waits left in a real run: synchronising calls over one epoch of two presets, and where.
stage sync sync 60 python3 benchmarks/sync_waits.py
# The training rows with the augmentation `residual train` would choose.
stage augment last 90 python3 benchmarks/gpu.py --no-compile --augment auto --only train
# `residual serve` under load on the GPU: dynamic batching against a batch-of-one loop (never measured there).
stage serve last 120 python3 benchmarks/serve_load.py --device cuda --rounds 1
# --grad-checkpointing on the GPU: peak allocated memory and speed of a ResNet-50 step with and without it.
stage checkpointing last 60 python3 benchmarks/grad_checkpointing.py --device cuda --amp --batch 256 --steps 10

cat "$summary"
grep -hE '^\||repays|: residual [0-9,]+ images/s' "$OUT/breakdown.md" "$OUT/compiled.md" "$OUT/jpeg.md" 2>/dev/null
