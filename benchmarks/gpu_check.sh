#!/usr/bin/env bash
# The one prepared GPU check, about 11.5 minutes: first benchmarks/gpu_smoke.sh (2 minutes: the stages with their CUDA
# defaults, a mid-epoch resume on CUDA, the nnU-Net search trainer), then the lean search step against the edge-by-edge one at the paper's scale
# (bench_lean_step.py: step time and peak memory, every edge checkpointed; then VGG-16's LTH step with the plans for
# a 24 GB card, its peak beside bench_step_memory.py's estimate), whole epochs of 02
# and 03 full / lth on an ACDC-like phantom with the projected ACDC search (bench_epochs.py, #21), then the test suite
# on CUDA (stage scripts pick the GPU through --device auto, with bf16 autocast and channels_last), and bench_gpu.py
# only when BENCH_S is given (measured before: RESULTS.md "GPU check"). Written for a machine that cannot install
# packages: it uses the python3 there, plus wheels in .whl/ when present (nibabel, monai:
# `pip download --no-deps -d .whl nibabel monai`). Logs, junit.xml and RESULTS.md go to $OUT.
#   OUT=gpu_out SMOKE_S=150 LEAN_S=120 PLAN_S=100 EPOCH_S=270 TEST_S=90 [BENCH_S=240] bash benchmarks/gpu_check.sh
# (TESTS: pytest targets, default tests; PLAN_ENCODERS: default vgg16; EPOCH_ENCODERS, EPOCH_PATIENTS:
# bench_epochs.py's --encoders, --patients; BENCH_ARGS: e.g. "--skip precision pruning")
set -u
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi -L
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'torchvision',
torchvision.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/versions.txt"

OUT="$OUT" timeout "${SMOKE_S:-150}" bash benchmarks/gpu_smoke.sh
echo "gpu_smoke exit $?"

timeout "${LEAN_S:-120}" python3 benchmarks/bench_lean_step.py --encoders ${LEAN_ENCODERS:-base resnet50} --width 32 \
    --batch 128 --size 256 --checkpoint on --reps 2 --record > "$OUT/bench_lean.log" 2>&1
echo "bench_lean_step exit $?"; tail -12 "$OUT/bench_lean.log"
# the LTH step of the backbone that needs most, with the plan --checkpoint_edges auto picks for a 24 GB card: its peak
# against the estimate (bench_step_memory.py's table is a meta-device count, the same on any machine)
timeout "${PLAN_S:-100}" python3 benchmarks/bench_lean_step.py --encoders ${PLAN_ENCODERS:-vgg16} --width 32 \
    --batch 128 --size 256 --budget_gib 21.6 --modes lth --reps 2 --record > "$OUT/bench_plan.log" 2>&1
echo "bench_lean_step (24 GB plans) exit $?"; tail -6 "$OUT/bench_plan.log"

timeout "${EPOCH_S:-270}" python3 benchmarks/bench_epochs.py --encoders ${EPOCH_ENCODERS:-base mobilenet_v3_large resnet50} \
    --patients "${EPOCH_PATIENTS:-80}" --phantom_size 128 --out /tmp/bench_epochs --record > "$OUT/bench_epochs.log" 2>&1
echo "bench_epochs exit $?"; tail -12 "$OUT/bench_epochs.log"

workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-8}")
timeout "${TEST_S:-90}" python3 -m pytest -q $workers -p no:cacheprovider --durations=8 \
    --junitxml="$OUT/junit.xml" ${TESTS:-tests} > "$OUT/tests.log" 2>&1
echo "pytest exit $?"; tail -40 "$OUT/tests.log"

if [ -n "${BENCH_S:-}" ]; then
    timeout "$BENCH_S" python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} > "$OUT/bench_gpu.log" 2>&1
    echo "bench_gpu exit $?"; tail -60 "$OUT/bench_gpu.log"
fi
cp benchmarks/RESULTS.md "$OUT/"
