#!/usr/bin/env bash
# The first thing to run on a GPU (#34 item 6), about 2 minutes: the stages with their CUDA defaults (--amp auto and
# --channels_last auto: bf16 autocast and channels_last; the lean step; --checkpoint_edges auto) on a small ACDC
# phantom: 02, 03 lth and full (each stopped by SIGUSR1 inside an epoch and resumed from its mid-epoch checkpoint:
# the RNG state read back on CUDA), 04 and 05; then, where nnunetv2 is importable, the nnU-Net search trainer for a
# few iterations on CUDA. Every step prints its exit code; logs go to $OUT/smoke. benchmarks/gpu_check.sh runs it first.
#   OUT=gpu_out [SMOKE_PATIENTS=10 SMOKE_SIZE=64] bash benchmarks/gpu_smoke.sh
set -u
OUT=${OUT:-gpu_check_out}/smoke
mkdir -p "$OUT"
W=$(mktemp -d)
D="--data $W/data/slices.h5 --splits $W/data/splits.json"
step() {                                   # step NAME COMMAND...: run it, log it, say its exit code
    local name=$1; shift
    "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "smoke $name exit $rc"; [ $rc -eq 0 ] || tail -15 "$OUT/$name.log"
    return $rc
}
P=${SMOKE_PATIENTS:-10} S=${SMOKE_SIZE:-64}
step phantom python3 01_preprocess.py --make_phantom "$W/raw" --layout acdc --patients $P --phantom_size $S
step preprocess python3 01_preprocess.py --dataset acdc --raw "$W/raw" --out "$W/data" --crop $S $S
step pretrain python3 02_pretrain.py $D --width 16 --epochs 2 --batch_size 16 --out "$W/ref"
for mode in lth full; do                  # batch 4: many steps per epoch, so the stop lands inside one
    args="--backbone $W/ref/ckpt_best.pt $D --mode $mode --epochs 4 --warmup 1 --batch_size 4 --ckpt_every_steps 1"
    python3 03_search.py $args --out "$W/$mode" > "$OUT/search_$mode.log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do grep -q "^epoch 2/" "$OUT/search_$mode.log" 2>/dev/null && break; sleep 0.1; done
    t=$(stat -c %.9Y "$W/$mode/ckpt_last.pt" 2>/dev/null)
    for _ in $(seq 600); do                  # the first mid-epoch checkpoint of epoch 3, then the stop signal
        [ "$(stat -c %.9Y "$W/$mode/ckpt_last.pt" 2>/dev/null)" != "$t" ] && break; sleep 0.05
    done
    kill -USR1 $pid 2>/dev/null; wait $pid
    echo "smoke search_$mode (SIGUSR1 inside epoch 3) exit $? (75: stopped by the signal)"
    grep -E "device:|checkpointing per cell level|warning" "$OUT/search_$mode.log"
    step "search_${mode}_resume" python3 03_search.py $args --out "$W/$mode" --resume
    grep -E "resuming at|genotype after" "$OUT/search_${mode}_resume.log"
    grep -q "resuming at epoch 3, after step" "$OUT/search_${mode}_resume.log" \
        && echo "smoke search_$mode: mid-epoch resume on this device tested" \
        || echo "smoke search_$mode: the stop did not land inside epoch 3; mid-epoch resume NOT tested"
done
step finetune python3 04_finetune.py --backbone "$W/ref/ckpt_best.pt" $D --genotype "$W/lth/genotype.json" \
    --epochs 1 --batch_size 16 --out "$W/iac_lth"
step evaluate python3 05_evaluate.py $D --run "ref=$W/ref" --run "iac_lth=$W/iac_lth" --search "lth=$W/lth" \
    --search "full=$W/full" --n_boot 99 --out "$W/eval"
grep -E "peak_gpu_mib" "$W/lth/log.jsonl" | tail -1 | tee "$OUT/peak.txt"

if python3 -c "import nnunetv2" 2>/dev/null; then
    export nnUNet_raw=$W/nn_raw nnUNet_preprocessed=$W/nn_pre nnUNet_results=$W/nn_res
    export nnUNet_extTrainer=$PWD/nnunet_iac nnUNet_compile=f IAC_EPOCHS=3 IAC_ITERS=4 IAC_VAL_ITERS=1
    export IAC_FINAL_VALIDATION=0 IAC_WARMUP=1 IAC_TAU0=10
    step nnunet_convert python3 scripts/convert_to_nnunet.py --dataset acdc --raw "$W/raw" \
        --out "$W/nn_raw/Dataset501_Phantom"
    step nnunet_plan nnUNetv2_plan_and_preprocess -d 501 -c 2d -np 2
    step nnunet_ref nnUNetv2_train 501 2d 0 -tr nnUNetTrainerIACRef -device cuda
    for t in nnUNetTrainerIACSearchLTH nnUNetTrainerIACSearchFull; do
        step "nnunet_$t" nnUNetv2_train 501 2d 0 -tr $t -device cuda
        grep -h "bf16 autocast\|genotype:" "$W"/nn_res/Dataset501_Phantom/${t}__*/fold_0/training_log*.txt
    done
else
    echo "smoke nnunet skipped: nnunetv2 is not importable here"
fi
rm -rf "$W"
