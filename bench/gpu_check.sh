#!/usr/bin/env bash
# The first check on a GPU machine: one script, at most 8 minutes on one H100 (the sum of its steps' limits, the
# wheels' install not counted), every result under $OUT.
#
#   bash bench/gpu_check.sh           on the GPU machine (its Python, with the wheels of `make gpu-wheels` in .whl/)
#   bash bench/gpu_check.sh --smoke   the same steps on this machine's CPU at toy sizes (make test-slow runs it)
#
# Steps, each with its own time limit, its log in $OUT/<step>.log and one line in $OUT/summary.txt:
#   env       Python, torch, CUDA and the GPU (nvidia-smi)
#   gpu       bench/gpu.py: the joint and UNet-only images/s at 256² in bf16, peak memory, with and without
#             torch.compile, gradient checkpointing, channels_last and cached latents
#   fsdp      train.py trainer=fsdp on one GPU (bf16-mixed, sharded checkpoint) for a few steps, a resume from that
#             checkpoint, then evaluate.py and capdiff.export from it
#   fullsize  bench/fullsize.py: experiment=joint_ddim at the published sizes, trained, resumed, evaluated, exported
# A failing step does not stop the others; the script exits 1 if any failed.
set -uo pipefail

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
OUT=${OUT:-$(mktemp -d)}
WORK=${GPU_CHECK_WORK:-$(mktemp -d)}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1

# The GPU machines have torch, Lightning, transformers, peft and torchmetrics but not the rest of capdiff's
# dependencies: `make gpu-wheels` fetches those here into .whl/, which travels with the run. capdiff itself is
# read from src/ (no install).
if [[ $SMOKE == 0 && -d .whl ]]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/capdiff-site \
        .whl/*.whl || { echo "installing .whl/ failed" | tee -a "$OUT/summary.txt"; exit 1; }
    export PYTHONPATH=/tmp/capdiff-site:${PYTHONPATH:-}
fi
export PYTHONPATH=$REPO/src:$REPO:${PYTHONPATH:-}

GPU_ARGS=(--batch 32 --steps 10)  # without a GPU, bench/gpu.py checks them and prints SKIP (its --allow-cpu
                                  # would train the SD-size model on the CPU: many minutes)
if [[ $SMOKE == 1 ]]; then
    # Lightning runs FSDP on CUDA only; the CPU stand-in of the tests wraps the same way on gloo
    FSDP=(trainer=fsdp trainer.accelerator=cpu trainer.devices=1 trainer.precision=32-true
          trainer.strategy._target_=tests.fsdp_cpu.fsdp)
    FULLSIZE_ARGS=(--quick --work "$WORK/fullsize")
    SCALE=6  # the time limits below are the GPU's; two CPU cores take longer over the toy sizes
else
    FSDP=(trainer=fsdp trainer.devices=1)
    FULLSIZE_ARGS=(--steps 3 --device cuda --work "$WORK/fullsize")
    SCALE=1
fi

FAILED=0
step() {  # step NAME SECONDS COMMAND...: run it with a time limit, log it, record its exit status and time
    local name=$1 limit=$(( $2 * SCALE )) start rc
    shift 2
    start=$(date +%s)
    echo "\$ $*" > "$OUT/$name.log"
    if declare -F "$1" > /dev/null; then  # a function of this script: `timeout` runs programs, so a new bash
        # gets the function and the variables it reads
        timeout --kill-after=10 "$limit" bash -c "$(declare -f "$1"); $(declare -p PY WORK FSDP); $*" \
            >> "$OUT/$name.log" 2>&1
    else
        timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    fi
    rc=$?
    [[ $rc == 0 ]] || FAILED=1
    printf '%-9s rc=%-3s %4ss  (limit %ss)\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" | tee -a "$OUT/summary.txt"
    grep -h "RATIO\|peak\|img/s" "$OUT/$name.log" | tail -n 20 >> "$OUT/summary.txt" || true
}

env_report() {
    "$PY" -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda,
"available", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
    "$PY" -c 'import diffusers, hydra, omegaconf, webdataset, kornia, lightning_fabric, transformers, peft, torchmetrics as t
for m in (diffusers, hydra, omegaconf, webdataset, kornia, lightning_fabric, transformers, peft, t):
    print(m.__name__, getattr(m, "__version__", "?"))'
    command -v nvidia-smi > /dev/null && nvidia-smi
    return 0
}
step env 20 env_report

step gpu 180 "$PY" bench/gpu.py "${GPU_ARGS[@]}" --data-dir "$WORK/data"

fsdp_round_trip() {
    local run=$WORK/fsdp common=(extras.print_config=false "paths.data_dir=$WORK/data" experiment=smoke
                                 callbacks.periodic_eval.every_n_steps=2)
    "$PY" train.py "${common[@]}" "${FSDP[@]}" trainer.max_epochs=1 "hydra.run.dir=$run" || return 1
    "$PY" train.py "${common[@]}" "${FSDP[@]}" trainer.max_epochs=2 "hydra.run.dir=$run" \
        "ckpt_path=$run/checkpoints/last.ckpt" || return 1
    "$PY" evaluate.py extras.print_config=false "hydra.run.dir=$WORK/eval" "ckpt_path=$run/checkpoints/last.ckpt" \
        "paths.data_dir=$WORK/data" eval.num_samples=8 eval.steps=4 || return 1
    "$PY" -m capdiff.export "$run/checkpoints/last.ckpt" "$WORK/export" || return 1
    "$PY" -c "import sys; from capdiff.pipeline import Pipeline
pipe = Pipeline.from_pretrained(sys.argv[1]); print('exported pipeline captions:', pipe.caption(pipe.generate(['a red circle'], steps=2)))" \
        "$WORK/export"
}
step fsdp 90 fsdp_round_trip

step fullsize 190 "$PY" bench/fullsize.py "${FULLSIZE_ARGS[@]}"

cat "$OUT/summary.txt"
exit $FAILED
