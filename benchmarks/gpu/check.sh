#!/usr/bin/env bash
# The GPU check: one command, under 8 minutes on the GPU machine, everything it measures in one folder.
#
#   bash benchmarks/gpu/check.sh [--results DIR] [--budget-s 450] [--only STEP,STEP]   # on the GPU machine
#                                                            (--only: a rerun of some steps into the same folder)
#   bash benchmarks/gpu/check.sh --cpu-dry-run [--results DIR]                         # here: the plumbing, on CPU
#
# Before: benchmarks/gpu/prepare.sh here (the wheels in .gpu/wheels, the real CT in .gpu/data), then one device call
# carrying .gpu/wheels and .gpu/data. After: python -m benchmarks.gpu.report --results DIR writes the `inference-gpu`
# and `training-gpu` sections of docs/benchmarks.md from the folder (or from $OUT/gpu_check.tar.gz brought back).
#
# Steps, in order of what matters most, each time-boxed (its own limit and what is left of --budget-s), so that one
# failure or hang costs that step alone; STEP.log holds its output and steps.tsv its exit code and seconds:
#   install         the carried wheels into a private folder (pip --no-index --no-deps --target), first on PYTHONPATH
#   environment     env.json: date, GPU, driver, CUDA, torch, Python, CPU
#   gpu_tests       the gpu-marked tests of benchmarks/gpu/gpu_tests.txt (gpu_tests.xml)
#   commands        seg3d synth, seg3d train --tracking-uri none (tiny) and seg3d infer, as a user types them
#   inference_demo  benchmarks/inference.py: seg3d infer vs the MONAI tutorial pipeline, demo network (trained here
#                   briefly), 512 x 512 x 200 phantom, the real CT and the phantom test set
#   training        benchmarks/gpu/training.py: iterations/s and peak memory (training.json)
#   variants_demo   benchmarks/gpu/variants.py: the demo network's inference with one setting changed at a time
#   inference_full  benchmarks/inference.py with configs/attention_unet.yaml, untrained (timings only)
#   variants_full   benchmarks/gpu/variants.py on that network
# Where $OUT is set (the device tool), DIR is packed into $OUT/gpu_check.tar.gz after every step: what a killed run
# had done still comes back.
#
# --cpu-dry-run: every step tiny, on the CPU, and with the device's software emulated: the host-Python build of the
# same wheels (.gpu/wheels-host), the packages the device has linked in from .venv (benchmarks/gpu/wheelset.py
# standin), and `python -S`, so nothing else of .venv is seen by the steps themselves (processes they start see it
# after those, as they run without -S).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
DRY=0
RESULTS=""
BUDGET=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-dry-run) DRY=1 ;;
        --results) RESULTS=$2; shift ;;
        --budget-s) BUDGET=$2; shift ;;
        --only) ONLY=",$2," ; shift ;;
        *) echo "check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
# On the CPU every limit is SCALE times longer: the dry run is about plumbing, on 2 shared cores.
if [ $DRY = 1 ]; then RESULTS=${RESULTS:-.gpu/results-dry} SCALE=8; else RESULTS=${RESULTS:-.gpu/results} SCALE=1; fi
BUDGET=${BUDGET:-$((450 * SCALE))}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
[ -n "$ONLY" ] || rm -f "$RESULTS"/*
WORK=$(mktemp -d /tmp/seg3d-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
export PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true

if [ $DRY = 1 ]; then
    WHEELS=.gpu/wheels-host
    PIP=(.venv/bin/python -m pip)
    PY=(.venv/bin/python -S)
    host=$(.venv/bin/python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || benchmarks/gpu/fetch_wheels.sh --python-version "$host" --dest "$WHEELS"
    .venv/bin/python -m benchmarks.gpu.wheelset standin "$WORK/standin" >/dev/null
    export PYTHONPATH=$SITE:$WORK/standin:$REPO CUDA_VISIBLE_DEVICES=""
    INFER=(--quick --device cpu --repeats 1)
    TRAIN=(--tiny)
    # The real CT cropped to 48 x 48 x 16 voxels: its rows on 2 CPU cores would take many minutes, and the point
    # here is that a real CT file goes through the same path.
    CT=$WORK/ct_crop.nii.gz
    .venv/bin/python -c "import sys, nibabel as n; i = n.load(sys.argv[1]); n.save(i.slicer[37:85, 26:74, 48:64], sys.argv[2])" \
        .gpu/data/ct.nii.gz "$CT" || echo "no .gpu/data/ct.nii.gz (benchmarks/gpu/prepare.sh): no real-CT rows" >&2
else
    WHEELS=.gpu/wheels
    PIP=(python3 -m pip)
    PY=(python3)
    export PYTHONPATH=$SITE:$REPO
    INFER=(--device cuda --repeats 2 --iterations 300)
    TRAIN=()
    CT=.gpu/data/ct.nii.gz
fi
DATA=$([ $DRY = 1 ] && echo .bench/inference_quick || echo .bench/inference)
START=$(date +%s)
[ -n "$ONLY" ] && [ -f "$RESULTS/steps.tsv" ] || printf "step\texit\tseconds\n" > "$RESULTS/steps.tsv"

pack() {
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then tar czf "$OUT/gpu_check.tar.gz" -C "$RESULTS" . ; fi
}

# step NAME LIMIT_S COMMAND...: run it with at most LIMIT_S seconds, fewer if less of the budget is left.
step() {
    local name=$1 limit=$(($2 * SCALE))
    shift 2
    # --only skips the others, except install and environment, which every step needs or describes.
    if [ -n "$ONLY" ] && [[ "$ONLY,install,environment," != *",$name,"* ]]; then return; fi
    local left=$((BUDGET - ($(date +%s) - START)))
    [ "$limit" -lt "$left" ] || limit=$left
    if [ "$limit" -lt 10 ]; then
        printf "%s\tnot run\t0\n" "$name" >> "$RESULTS/steps.tsv"
        echo "[check] $name: not run, the budget is spent"
        return
    fi
    local t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$? secs=$(($(date +%s) - t0))
    printf "%s\t%s\t%s\n" "$name" "$rc" "$secs" >> "$RESULTS/steps.tsv"
    echo "[check] $name: exit $rc in ${secs} s (limit $limit s)$([ $rc = 124 ] && echo ', timed out')"
    [ $rc = 0 ] || tail -n 5 "$RESULTS/$name.log" | sed 's/^/    /'
    pack
}

step install 60 "${PIP[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
step environment 30 bash -c "${PY[*]} -m benchmarks.gpu.environment > '$RESULTS/env.json'"
mapfile -t TESTS < <(grep -v '^#' benchmarks/gpu/gpu_tests.txt | grep .)
step gpu_tests 150 "${PY[@]}" -m pytest -q -m gpu -p no:cacheprovider --junitxml="$RESULTS/gpu_tests.xml" "${TESTS[@]}"
# The commands as a user types them (through pipeline.cli's main: the console script is not installed there):
# seg3d synth, seg3d train --tracking-uri none (tiny, one epoch, device auto), seg3d infer on what it trained.
cat > "$WORK/commands.sh" <<EOF
set -e
seg3d() { ${PY[*]} -c 'import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))' "\$@"; }
seg3d synth --out "$WORK/synth" --cases 4 --test-cases 1
seg3d train --config configs/demo.yaml --data "$WORK/synth" --output "$WORK/run" --tracking-uri none \\
    'model.channels=[4,8,16]' 'model.strides=[2,2]' 'data.patch_size=[32,32,16]' 'data.target_spacing=[2,2,4]' \\
    data.num_workers=0 train.epochs=1 train.iterations_per_epoch=5 train.folds=2 inference.sw_batch_size=2
seg3d infer --model "$WORK/run/bundle" --input "$WORK/synth/imagesTs" --output "$WORK/infer"
EOF
step commands 60 bash "$WORK/commands.sh"
step inference_demo 150 "${PY[@]}" -m benchmarks.inference "${INFER[@]}" --real-ct "$CT" --results "$RESULTS"
step training 100 "${PY[@]}" -m benchmarks.gpu.training "${TRAIN[@]}" --budget-s $((90 * SCALE)) --results "$RESULTS"
step variants_demo 70 "${PY[@]}" -m benchmarks.gpu.variants --bundle "$DATA/models/bundle" \
    --image "$DATA/big/big_phantom.nii.gz" --label demo --budget-s $((60 * SCALE)) --results "$RESULTS"
FULL=(--config configs/attention_unet.yaml --untrained)
step inference_full 60 "${PY[@]}" -m benchmarks.inference "${INFER[@]}" "${FULL[@]}" --results "$RESULTS"
step variants_full 40 "${PY[@]}" -m benchmarks.gpu.variants --bundle "$DATA/attention_unet/models/bundle" \
    --image "$DATA/big/big_phantom.nii.gz" --label attention_unet --budget-s $((35 * SCALE)) --results "$RESULTS"
# What report.py makes of the folder, beside it: proves the folder reads before it travels back.
step report 20 "${PY[@]}" -m benchmarks.gpu.report --results "$RESULTS" --docs "$RESULTS/benchmarks_preview.md"
echo "[check] done in $(($(date +%s) - START)) s; results in $RESULTS$([ -n "${OUT:-}" ] && echo " and \$OUT/gpu_check.tar.gz")"
