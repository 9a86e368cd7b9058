#!/usr/bin/env bash
# The pre-training study of docs/studies.md ("The pre-training study"): on the demo's data (its pool of
# 8 crops, its CPU settings), pre-trains each recipe variant and probes every export with desd_probe against 3 random
# initialisations of the same network.
#
#   bash scripts/pretraining_study.sh WORKDIR [SEEDS]      (SEEDS: pre-training seeds of the default recipe and of
#                                                           the deepest-stage-only run, default 3)
#
# Variants (each on the demo's CPU settings, one seed unless said):
#   small-batch           the default recipe, SEEDS seeds
#   deepest-only          the default recipe distilling the deepest stage only (DINO), SEEDS seeds, same compute
#   official              --recipe official (DeSD's published recipe) with K 4096: the demo before this recipe
#   with-batch-norm       the default with --head-norm batch
#   with-centring         the default with --sinkhorn-queue 0 (DeSD's centre)
#   with-official-temp    the default with the official teacher temperature 0.04 -> 0.07
#   with-official-momentum the default with --teacher-momentum 0.996
#   with-K-4096           the default with --out-dim 4096 (the old demo K)
#   with-teacher-temp-0.04 the default with a teacher temperature of 0.04
# Writes WORKDIR/study/probe.{md,csv,png} and WORKDIR/study/losses.md (loss of the last epoch against ln K per run).
# About 25 minutes on 2 CPU cores with SEEDS=3.
set -euo pipefail
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "usage: $0 WORKDIR [SEEDS]" >&2; exit 2; }
WORK=$(mkdir -p "$1" && cd "$1" && pwd)
SEEDS=${2:-3}
[[ "$SEEDS" =~ ^[1-9][0-9]*$ ]] || { echo "$0: SEEDS must be a positive integer, got '$SEEDS'" >&2; exit 2; }
cd "$(dirname "$0")/.."
export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_def_n_proc=1
OUT="$WORK/study"
mkdir -p "$OUT"
# the demo's datasets, written and planned by the demo's own functions (python -c: nnU-Net's worker processes
# re-import the main module, which must not be stdin)
python -c 'import sys; from nnunetv2_desd.cli.demo import LABELLED_ID, POOL_ID, _plan_labelled_dataset, _use_workdir
from nnunetv2_desd.data.sources import write_chest_ct_datasets
folders = _use_workdir(sys.argv[1]); write_chest_ct_datasets(folders["nnUNet_raw"], POOL_ID, LABELLED_ID)
_plan_labelled_dataset()' "$WORK"
read -r -a CPU <<<"$(python -c 'from nnunetv2_desd.cli.demo import CPU_LR, CPU_SETTINGS; print(*CPU_SETTINGS, *CPU_LR["desd"])')"
EXPORTS=()
LABELS=()
pretrain() {  # pretrain LABEL SEED [extra options]: one run in its own nnUNet_results
    local label=$1 seed=$2; shift 2
    local results="$WORK/study_runs/${label}_seed${seed}"
    nnUNet_results="$results" desd_pretrain -d 500 --plans-from 501 "${CPU[@]}" --seed "$seed" "$@" \
        >"$results.log" 2>&1 || { echo "pre-training $label (seed $seed) failed: $results.log" >&2; exit 1; }
    EXPORTS+=("$results/Dataset500_ChestCTUnlabelled/desd__nnUNetPlans_from501__3d_fullres/pretrained_export.pth")
    LABELS+=("$label")
    echo "pre-trained $label seed $seed"
}
mkdir -p "$WORK/study_runs"
for seed in $(seq 1 "$SEEDS"); do
    pretrain small-batch "$seed"
    pretrain deepest-only "$seed" --stages -1
done
pretrain official 1 --recipe official --out-dim 4096
pretrain with-batch-norm 1 --head-norm batch
pretrain with-centring 1 --sinkhorn-queue 0
pretrain with-official-temp 1 --teacher-temp 0.07 --warmup-teacher-temp 0.04
pretrain with-official-momentum 1 --teacher-momentum 0.996
pretrain with-K-4096 1 --out-dim 4096
pretrain with-teacher-temp-0.04 1 --teacher-temp 0.04 --warmup-teacher-temp 0.04
python - "$OUT/losses.md" "${EXPORTS[@]}" <<'PY'
import math, os, sys
from nnunetv2_desd.common.checkpoint import load_checkpoint
lines = ['| run | K | loss, first epoch | loss, last epoch | last / ln K | teacher entropy, last | KL, last |',
         '|---|---|---|---|---|---|---|']
for export in sys.argv[2:]:
    ckpt = load_checkpoint(os.path.join(os.path.dirname(export), 'checkpoint_final.pth'))
    history, k = ckpt['progress'], ckpt['config']['out_dim']
    loss = history['loss']['value']
    run = os.path.basename(export.split('/Dataset500')[0])
    lines.append(f'| {run} | {k} | {loss[0]:.3f} | {loss[-1]:.3f} | {loss[-1] / math.log(k):.3f} | '
                 f'{history["teacher_entropy"]["value"][-1]:.3f} | {history["kl_teacher_student"]["value"][-1]:.3f} |')
open(sys.argv[1], 'w').write('\n'.join(lines) + '\n')
print('\n'.join(lines))
PY
nnUNet_results="$WORK/study_runs" desd_probe -d 501 -w "${EXPORTS[@]}" --labels "${LABELS[@]}" -device cpu \
    --voxels-per-class 1000 -o "$OUT"
