#!/usr/bin/env bash
# `make demo-mri`: the demo's chain on real MRI, warped subjects of the MNI152 2009 template with grey /
# white-matter labels (benchmarks/make_mni_dataset.py; the template comes from the nilearn wheel, fetched
# once with pip into ~/.cache/iac_lth). Scaled down for a CPU like `make demo`; the flags say how.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
D=${DEMO_DIR:-demo_runs}/mri
EP=${DEMO_EPOCHS:-30}          # stage I / III epochs (paper: 200)
SE=${DEMO_SEARCH_EPOCHS:-24}   # search epochs / cap (paper: 200)
WU=${DEMO_WARMUP:-4}           # warm-up epochs (paper: 15)
COMMON="--batch_size 16 --seed 0 --workers 0"
SEARCH="--epochs $SE --warmup $WU --batch_size 32 --seed 0 --workers 0"
DATA="--data $D/data/slices.h5 --splits $D/data/splits.json"
mkdir -p "$D"
echo "== IAC-LTH on real MRI: 36 warped MNI152 subjects (20 test), 3 mm, 64x64 crops, width-8 U-Nets,"
echo "   $EP training epochs, $SE search epochs with $WU warm-up. Outputs: $D/"
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "1/5 subjects from the MNI152 template (nnU-Net raw layout) and preprocessing"
[ -d "$D/raw" ] || $PY benchmarks/make_mni_dataset.py --out "$D/raw" --spacing 3 --slab 48
$PY 01_preprocess.py --dataset nnunet --raw "$D/raw" --out "$D/data" --crop 64 64 --split_file "$D/raw/split.json" \
    --overwrite

step "2/5 stage I: base U-Net with ref / att / nested skips"
for SK in ref att nested; do
  $PY 02_pretrain.py $DATA --encoder base --width 8 --skip $SK --epochs $EP $COMMON --out "$D/base_$SK" --overwrite
done

step "3/5 stage II: --mode full and --mode lth on the frozen base U-Net"
for M in full lth; do
  $PY 03_search.py --backbone "$D/base_ref/ckpt_best.pt" $DATA --mode $M $SEARCH --out "$D/search_$M" --overwrite
done

step "4/5 stage III: IAC (fresh) and IAC-LTH (theta0)"
$PY 04_finetune.py --backbone "$D/base_ref/ckpt_best.pt" --genotype "$D/search_full/genotype.json" $DATA \
    --epochs $EP $COMMON --out "$D/base_iac" --overwrite
$PY 04_finetune.py --backbone "$D/base_ref/ckpt_best.pt" --genotype "$D/search_lth/genotype.json" $DATA \
    --epochs $EP $COMMON --out "$D/base_iac_lth" --overwrite

step "5/5 evaluation on the 20 test subjects (NSD at 1 mm, a third of the 3 mm voxel)"
$PY 05_evaluate.py $DATA --run ref="$D/base_ref" --run att="$D/base_att" --run nested="$D/base_nested" \
    --run iac="$D/base_iac" --run iac_lth="$D/base_iac_lth" --reference ref --compare iac:iac_lth \
    --search full="$D/search_full" --search lth="$D/search_lth" --nsd_tolerance 1 --out "$D/eval"
echo "done in $(( $(date +%s) - t0 ))s; tables: $D/eval/summary.md, $D/eval/paired.md, $D/eval/search_cost.md"
