#!/usr/bin/env bash
# One-shot check of flowalign on a CUDA machine, in under 8 minutes: the GPU tests and the full-size benches.
#
#   bash bench/gpu_check.sh            # from anywhere; logs go to $OUT/gpu_check (if $OUT is set) or a temp folder
#
# Stages, each under `timeout` (the whole script stays inside GPU_CHECK_BUDGET_S, default 450 s) and each run even
# when an earlier one failed:
#   1. install: wheels from .whl/ (if present: packages the machine lacks, e.g. diffusers, omegaconf) into
#      /tmp/flowalign-site on PYTHONPATH, then `pip install -e . --no-deps` so that flowalign (and its
#      flowalign.rewards / flowalign.pipelines mapping) imports; no network is needed.
#   2. pytest -m gpu: the tests marked gpu (CUDA vs CPU agreement, bf16 smoke tests).
#   3. bench/models.py at full size (SD3.5-medium, FLUX.1-dev, Wan2.1-1.3B): rollout samples/s, LoRA train step, memory.
#   4. bench/models.py --fsdp at 1 process, full size: FSDP2 train step, full fine-tuning and LoRA, memory.
#   5. fsdp_launch: `accelerate launch --config_file configs/accelerate/fsdp_1x8.yaml --num_processes 1` of 2
#      quickstart iterations on the GPU (accelerate's FSDP launch path, NCCL, CUDA checkpoint and final/).
#   6. dllm_cuda: 3 iterations of the dLLM quickstart on the GPU (per-group random streams on a CUDA device).
# bench/rollout.py is not run: it times the CPU quickstart only (it has no CUDA mode).
# At the end one table: stage | status | seconds | result; then the benches' own tables.
# On a machine without CUDA it says so and exits 0 at once. Exit status: 0 if every stage passed, 1 otherwise.
# GPU_CHECK_STAGES="pytest_gpu bench_models_fsdp" runs only the named stages (install always runs);
# GPU_CHECK_ALLOW_CPU=1 runs the stages without CUDA (reduced-size benches; to check this script itself).
set -u
cd "$(dirname "$0")/.." || exit 1
REPO=$(pwd)
PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)

STAGES=${GPU_CHECK_STAGES:-pytest_gpu fsdp_launch dllm_cuda bench_models bench_models_fsdp}
if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
    echo "gpu_check: no CUDA ($PY cannot import torch or torch.cuda.is_available() is False): nothing to check"
    exit 0
fi

LOGDIR=${OUT:+$OUT/gpu_check}
LOGDIR=${LOGDIR:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$LOGDIR"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
SUMMARY=()
FAILED=0

# run NAME LIMIT_S CMD...: run CMD under timeout (capped by what is left of the budget), log to $LOGDIR/NAME.log,
# and add a summary row whose result is the log's last line matching $RESULT_PATTERN (or its last line).
run() {
    local name=$1 limit=$2
    shift 2
    if [ "$name" != install ] && [[ " $STAGES " != *" $name "* ]]; then
        return
    fi
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -lt 20 ]; then
        SUMMARY+=("$name|SKIPPED|0|budget of ${BUDGET_S}s spent")
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local t0 rc status result
    t0=$(date +%s)
    echo "== $name (limit ${limit}s): $*"
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$LOGDIR/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="TIMEOUT(${limit}s)"; FAILED=1 ;;
        *) status="FAIL(rc=$rc)"; FAILED=1 ;;
    esac
    result=$(grep -E "${RESULT_PATTERN:-.}" "$LOGDIR/$name.log" | tail -n 1 | cut -c1-90)
    [ -z "$result" ] && result=$(tail -n 1 "$LOGDIR/$name.log" | cut -c1-90)
    SUMMARY+=("$name|$status|$(($(date +%s) - t0))|$result")
    echo "   -> $status"
}

install_flowalign() {
    set -e
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/flowalign-site .whl/*.whl
        echo "installed from .whl: $(cd .whl && ls *.whl | tr '\n' ' ')"
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    "$PY" -c "import flowalign.rewards, flowalign.pipelines, diffusers, omegaconf, peft, torch; \
print('flowalign imports; torch', torch.__version__, 'diffusers', diffusers.__version__, 'peft', peft.__version__, \
'GPU', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
}
export -f install_flowalign  # `timeout` runs programs: the function runs in a child bash
export PY PYTHONPATH="/tmp/flowalign-site${PYTHONPATH:+:$PYTHONPATH}"

RESULT_PATTERN="flowalign imports|Error" run install 90 bash -c install_flowalign
RESULT_PATTERN="passed|failed|error|no tests ran" run pytest_gpu 120 \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests
RESULT_PATTERN="reward  |accuracy  |Error" run fsdp_launch 75 \
    "$PY" -m accelerate.commands.launch --config_file configs/accelerate/fsdp_1x8.yaml --num_processes 1 -m flowalign \
    train configs/quickstart.yaml train.iterations=2 eval.every=0 train.checkpoint_every=1 \
    output_dir=/tmp/gpu_check_runs/fsdp_run
RESULT_PATTERN="accuracy  |Error" run dllm_cuda 60 \
    "$PY" -m flowalign train configs/dllm/quickstart.yaml train.iterations=3 eval.every=0 output_dir=/tmp/gpu_check_runs/dllm_run
RESULT_PATTERN="Error|OOM" run bench_models 120 \
    "$PY" bench/models.py --batch-sizes 1 2 --steps 4 --repeats 2
RESULT_PATTERN="Error|OOM" run bench_models_fsdp 200 \
    "$PY" bench/models.py --fsdp --fsdp-processes 1 --repeats 1 --fsdp-timeout 60

echo
echo "gpu_check: $("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA', \
'| torch', torch.__version__)" 2>/dev/null)" \
     "| $(($(date +%s) - START)) s in all | logs: $LOGDIR"
{
    echo "stage|status|seconds|result"
    echo "---|---|---|---"
    printf '%s\n' "${SUMMARY[@]}"
    echo "bench_rollout|skipped|0|bench/rollout.py has no CUDA mode (CPU quickstart timing only)"
} | (column -t -s '|' 2>/dev/null || tr '|' '\t')
for name in bench_models bench_models_fsdp; do
    if [ -f "$LOGDIR/$name.log" ]; then
        echo
        echo "-- $name --"
        grep -vE "^\s+\S+ .*: done$|Warning|warn\(" "$LOGDIR/$name.log" | tail -n 25
    fi
done
exit $FAILED
