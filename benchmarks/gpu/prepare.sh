#!/usr/bin/env bash
# Everything the GPU check carries, in .gpu/ (ignored by git; named in the device call's `carry`):
#   .gpu/wheels/        the wheels of benchmarks/gpu/wheels.txt for the GPU machine's CPython 3.12 (fetch_wheels.sh)
#   .gpu/data/ct.nii.gz the real CT, copied from ../shared/data/real_ct: the folder beside the checkout does not travel
# and prints what will travel: the working tree (tracked and untracked-not-ignored files) plus .gpu, 64 MiB at most.
set -euo pipefail
cd "$(dirname "$0")/../.."
benchmarks/gpu/fetch_wheels.sh
CT=../shared/data/real_ct/ct.nii.gz
mkdir -p .gpu/data
if [ -f "$CT" ]; then cp "$CT" .gpu/data/ct.nii.gz; else echo "no $CT: the real-CT rows will be missing" >&2; fi
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .gpu/wheels/*.whl .gpu/data/* 2>/dev/null | tail -1 | cut -f1)
echo "travels: working tree $((tree / 1024)) KiB + .gpu $((carried / 1024)) KiB = $(((tree + carried) / 1048576)) MiB (limit 64 MiB)"
if [ $((tree + carried)) -gt $((64 * 1048576)) ]; then echo "over the 64 MiB limit" >&2; exit 1; fi
echo 'device call: run(command="bash benchmarks/gpu/check.sh", carry=[".gpu/wheels", ".gpu/data"], timeout_s=600)'
