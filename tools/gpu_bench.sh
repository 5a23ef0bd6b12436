#!/usr/bin/env bash
# The GPU section of BENCHMARKS.md as one script for a lent GPU machine (no network there):
#   1. installs, from the one folder .whl/ at the repository root, the wheels the machine's
#      image lacks (see "Wheels" below);
#   2. check: `python3 -m maskrcnn.check --config=8x4` (maskrcnn-check, 150 s at most): every
#      fast path against its reference at the recipe's sizes (NMS and proposals by the Triton
#      kernel, the static PyTorch loop and torchvision's shifted call; the Triton ROIAlign
#      forward and backward against the gather op; the Triton matching against the tiled
#      path; mask paste), the whole model against the CPU, the host synchronisations of one
#      training step and one inference forward (none allowed), and 8 steps replayed as a CUDA
#      graph against the same steps run eagerly; table in $OUT/check.log, JSON in
#      $OUT/check.json. A failure is reported and the benchmarks still run;
#   3. maskrcnn-benchmark of the COCO recipe (config 8x4: R50-FPN, 800x1344 canvas, BF16,
#      channels_last, Triton NMS, ROIAlign and matching), against torchvision in one process:
#      m8 and m12 (8 and 12 images) with the step replayed as a CUDA graph (the config's
#      default; m8 with the per-stage breakdown and the op micro-benchmarks), m8_eager and
#      m12_eager without the graph, m8_compile and m12_compile compiled and graphed;
#      m8_gather: m8 with the gather ROIAlign and the tiled matching (PyTorch ops), to see
#      what the Triton kernels give;
#   4. the CPU test suite under the machine's Python and torch, if time is left.
# Wheels: the image (Python 3.12, torch 2.11, torchvision, Triton 3.6, numpy, Pillow) lacks
# some of what maskrcnn imports. Put these in .whl/ (built for cp312 manylinux x86_64, e.g.
# `pip download --only-binary=:all: --python-version 3.12 --no-deps -d .whl pycocotools
# tensorboardX "protobuf>=5.26.1" absl-py tqdm`); each is installed only when its import fails
# (protobuf also when older than 5.26, which config_pb2.py needs):
#   pycocotools (COCO evaluation), tensorboardX (event files), protobuf (configs),
#   absl-py (flags), tqdm (progress bar); for stage 4 also pytest, pluggy, iniconfig,
#   pytest-xdist, execnet and pyyaml.
# Stages run in the order below while time is left. Logs and JSON reports go to $OUT (default
# runs/gpu). Every stage has its own time limit, so that one hang cannot eat the lease. A CPU
# dry run: DEVICE=cpu BENCH_SET='...' STEPS=1; STAGES='m8 m12' runs those stages only.
set -u
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-3}
BENCH_SET=${BENCH_SET:-}
BUDGET_S=${BUDGET_S:-470}  # the whole script; later stages only start when time is left
mkdir -p "$OUT"
start=$SECONDS
log() { echo "[$((SECONDS - start)) s] $*"; }
left() { echo $((BUDGET_S - (SECONDS - start))); }
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

wheel_for() {  # wheel_for PATTERN MODULE: the wheel when MODULE cannot be imported
  python3 -c "import $2" 2>/dev/null || ls .whl/$1 2>/dev/null | head -1
}
if [ -d .whl ]; then
  wheels=()
  for spec in "pycocotools-*.whl pycocotools" "tensorboard[xX]-*.whl tensorboardX" \
      "absl_py-*.whl absl" "tqdm-*.whl tqdm" "pytest-*.whl pytest" "pluggy-*.whl pluggy" \
      "iniconfig-*.whl iniconfig" "pytest_xdist-*.whl xdist" "execnet-*.whl execnet" \
      "PyYAML-*.whl yaml" "pyyaml-*.whl yaml"; do
    w=$(wheel_for $spec) && [ -n "$w" ] && wheels+=("$w")
  done
  python3 -c "import google.protobuf as p, sys; sys.exit(tuple(map(int, p.__version__.split('.')[:2])) < (5, 26))" \
    2>/dev/null || wheels+=(.whl/protobuf-*.whl)
  [ ${#wheels[@]} -gt 0 ] && python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
log "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
python3 -c "import sys, torch, torchvision, google.protobuf as p; print('python', sys.version.split()[0], 'torch', torch.__version__, 'torchvision', torchvision.__version__, 'protobuf', p.__version__)"
git log -1 --format='commit %H' 2>/dev/null

STAGES=${STAGES:-check m8 m8_eager m12 m8_compile m12_eager m12_compile m8_gather tests}
has() { [[ " $STAGES " == *" $1 "* ]]; }
if has check; then
  log "check (limit 150 s)"
  timeout 150 python3 -m maskrcnn.check --config=8x4 --device="$DEVICE" \
    --json_out="$OUT/check.json" 2>&1 | grep -v Warning | tee "$OUT/check.log"
  log "check exit status ${PIPESTATUS[0]} (0 passed, 1 a check failed, 124 timed out)"
fi

bench() {  # bench NAME LIMIT_S SET [FLAGS...]
  local name=$1 limit=$2 set=$3
  shift 3
  has "$name" || return 0
  if [ "$(left)" -lt 40 ]; then log "skipped $name: no time left"; return; fi
  [ "$limit" -gt "$(left)" ] && limit=$(left)
  log "benchmark $name (limit ${limit} s)"
  timeout "$limit" python3 -m maskrcnn.benchmark --config=8x4 --set="$set" \
    ${BENCH_SET:+--set="$BENCH_SET"} --device="$DEVICE" --steps="$STEPS" --warmup="$WARMUP" --json_out="$OUT/$name.json" "$@" \
    2>&1 | grep -v Warning | tee "$OUT/$name.log"
}
tv=--baseline=torchvision
bench m8 150 "run { images_per_gpu: 8 }" $tv
bench m8_eager 70 "run { images_per_gpu: 8 cuda_graph: false }" $tv --nobreakdown --noops
bench m12 80 "run { images_per_gpu: 12 }" $tv --nobreakdown --noops
bench m8_compile 150 "run { images_per_gpu: 8 compile: true }" --nobreakdown --noops
bench m12_eager 80 "run { images_per_gpu: 12 cuda_graph: false }" $tv --nobreakdown --noops
bench m12_compile 150 "run { images_per_gpu: 12 compile: true }" --nobreakdown --noops
bench m8_gather 70 "run { images_per_gpu: 8 }" --roi_align=torch --match=torch --nobreakdown \
  --noops

if has tests && [ "$(left)" -gt 40 ]; then
  log "test suite (limit $(left) s)"
  timeout "$(left)" python3 -m pytest -q -p no:cacheprovider -n 12 tests \
    --ignore=tests/test_main_job.py 2>&1 | tail -40 | tee "$OUT/pytest.log"
fi
log "done"
