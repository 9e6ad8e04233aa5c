#!/usr/bin/env bash
# `make demo`: the paper's comparison on a synthetic ACDC-layout phantom, scaled down for a laptop CPU.
# Every command is the paper's protocol with smaller epoch counts and image size given as flags.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
D=${DEMO_DIR:-demo_runs}
EP=${DEMO_EPOCHS:-16}          # stage I / III epochs (paper: 200)
SE=${DEMO_SEARCH_EPOCHS:-24}   # search epochs / cap (paper: 200)
WU=${DEMO_WARMUP:-3}           # warm-up epochs (paper: 15)
BS=16                          # training batch (paper: 128)
SBS=32                         # search batch (paper: 128)
COMMON="--batch_size $BS --seed 0"
SEARCH="--epochs $SE --warmup $WU --batch_size $SBS --seed 0"
GAMMA=${DEMO_GAMMA:-1.5}       # JS threshold growth (paper schedule: 1.1 over a 200-epoch cap; faster for a 24-epoch cap)
DATA="--data $D/data/slices.h5 --splits $D/data/splits.json"
mkdir -p "$D"
echo "== IAC-LTH demo: scaled down for CPU (64x64 crops, $EP training epochs, $SE search epochs with $WU warm-up,"
echo "   batch $BS/$SBS, width-8 U-Nets). The same commands with default flags are the paper's protocol. Outputs: $D/"
t0=$(date +%s)
step() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

step "1/7 phantom (ACDC layout) and preprocessing"
[ -d "$D/raw" ] || $PY 01_preprocess.py --make_phantom "$D/raw" --layout acdc --patients 16 --seed 0
$PY 01_preprocess.py --dataset acdc --raw "$D/raw" --out "$D/data" --crop 64 64 --processes 2 --overwrite

step "2/7 stage I: base U-Net with ref / att / nested / resatt skips, and a MobileNetV3-Large U-Net"
for SK in ref att nested resatt; do
  $PY 02_pretrain.py $DATA --encoder base --width 8 --skip $SK --epochs $EP $COMMON --out "$D/base_$SK" --overwrite
done
$PY 02_pretrain.py $DATA --encoder mobilenet_v3_large --width 8 --skip ref --epochs $EP $COMMON \
    --out "$D/mobilenet_ref" --overwrite

step "3/7 stage II: IAC search, --mode full and --mode lth, on the frozen base U-Net"
$PY 03_search.py --backbone "$D/base_ref/ckpt_best.pt" $DATA --mode full $SEARCH --out "$D/search_full" --overwrite
$PY 03_search.py --backbone "$D/base_ref/ckpt_best.pt" $DATA --mode lth $SEARCH --gamma $GAMMA --out "$D/search_lth" \
    --overwrite

step "4/7 stage III: IAC (fresh init) and IAC-LTH (reset to theta0) in the frozen backbone"
$PY 04_finetune.py --backbone "$D/base_ref/ckpt_best.pt" --genotype "$D/search_full/genotype.json" $DATA \
    --epochs $EP $COMMON --out "$D/base_iac" --overwrite
$PY 04_finetune.py --backbone "$D/base_ref/ckpt_best.pt" --genotype "$D/search_lth/genotype.json" $DATA \
    --epochs $EP $COMMON --out "$D/base_iac_lth" --overwrite

step "5/7 evaluation on the test patients"
$PY 05_evaluate.py $DATA --run ref="$D/base_ref" --run att="$D/base_att" --run nested="$D/base_nested" \
    --run resatt="$D/base_resatt" --run iac="$D/base_iac" --run iac_lth="$D/base_iac_lth" \
    --run ref_mobilenet="$D/mobilenet_ref" --reference ref --compare iac:iac_lth \
    --search full="$D/search_full" --search lth="$D/search_lth" --out "$D/eval" --save_nifti "$D/eval/nifti"

step "6/7 predict: the IAC-LTH run segments raw NIfTI images (here the phantom's own) into label maps"
$PY predict.py --run "$D/base_iac_lth" --input "$D/raw" --out "$D/predictions"

step "7/7 done in $(( $(date +%s) - t0 ))s"
echo "tables: $D/eval/summary.md, $D/eval/paired.md, $D/eval/inference_cost.md, $D/eval/search_cost.md"
echo "figures: $D/eval/overlay.png and $D/eval/dynamics/; label maps: $D/predictions/"
