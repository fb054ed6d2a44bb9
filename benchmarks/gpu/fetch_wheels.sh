#!/usr/bin/env bash
# Download exactly the wheels the GPU check carries (benchmarks/gpu/wheels.txt) for the GPU machine's CPython 3.12 on
# manylinux x86_64 into .gpu/wheels (ignored by git), check that they complete the device's packages
# (benchmarks/gpu/device_packages.txt), and print each wheel's size and the total.
#
#   benchmarks/gpu/fetch_wheels.sh [--python-version 3.11 --dest DIR]   # another Python: the CPU test's host set
#
# pip runs with its own configuration (its indexes and find-links): no registry is named here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m benchmarks.gpu.wheelset fetch "$@"
