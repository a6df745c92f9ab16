#!/usr/bin/env bash
# The GPU figures issues 5 and 7 ask for, in stages that each fit one 10-minute command on a lent
# GPU machine. Such a machine starts bare and is given back 30 s after a call, so each stage
# trains what it measures. Everything a stage prints also goes to $OUT (which the device tool
# brings back), or to runs/gpu/ without it.
#
#   bash benchmarks/gpu.sh wheels                # here, once per session: the packages the GPU image lacks, into .whl/
#   bash benchmarks/gpu.sh small                 # configs/small.yaml: step time, tokens/s, MFU at MTP depths 0-2
#   bash benchmarks/gpu.sh experts               # lax.ragged_dot against the blocked experts CPUs use
#   bash benchmarks/gpu.sh speculative KIND [ARGS]  # tiny runs of KIND (sequential|parallel), depths 1-4; then decode
#
# With the device tool: run(command="bash benchmarks/gpu.sh small", carry=[".whl"]). ARGS go to
# benchmarks/speculative.py (default: --scale default). MTP_SPEC_STEPS sets the training steps
# (default 500, as in the CPU entry of benchmarks/RESULTS.md).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacks of setup.cfg's install_requires, at the versions CI installed on 2026-11-24
# (`pip show NAME` here gives today's; keep pydantic and pydantic-core a matching pair).
WHEELS=(
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
)

usage() {
  echo "usage: benchmarks/gpu.sh wheels | small | experts | speculative sequential|parallel [speculative.py args]" >&2
  exit 2
}

setup() {  # the carried wheels and this checkout on the path, no install step (no internet there)
  out=${OUT:-runs/gpu}
  mkdir -p "$out"
  if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  else
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import jax, platform; print('python', platform.python_version(), 'jax', jax.__version__, jax.devices())"
  } 2>&1 | tee "$out/machine.txt"
}

case ${1:-} in
  wheels)
    [[ $# -eq 1 ]] || usage
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${WHEELS[@]}"
    ls .whl
    ;;
  small)
    [[ $# -eq 1 ]] || usage
    setup
    python3 benchmarks/bench.py --config configs/small.yaml 2>&1 | tee "$out/small.txt"
    ;;
  experts)  # decides whether moe.BLOCKED_BACKENDS should name gpu: a layer alone, then whole train steps
    [[ $# -eq 1 ]] || usage
    setup
    python3 benchmarks/moe_experts.py 2>&1 | tee "$out/moe_experts.txt"
    python3 benchmarks/moe_experts.py --config configs/small.yaml 2>&1 | tee -a "$out/moe_experts.txt"
    ;;
  speculative)
    [[ $# -ge 2 && ($2 == sequential || $2 == parallel) ]] || usage
    kind=$2
    shift 2
    setup
    steps=${MTP_SPEC_STEPS:-500}
    runs=()
    for depth in 1 2 3 4; do
      workdir=runs/spec-bench-gpu/$kind-d$depth  # not runs/spec-bench: the CPU runs stay
      rm -rf "$workdir"
      python3 -m mtp_jax.cli --config configs/tiny.yaml "train.steps=$steps" train.eval_every=0 \
        "model.mtp.kind=$kind" "model.mtp.depth=$depth" "train.workdir=$workdir" "checkpoint.every=$steps" \
        train.progress_bar=false 2>&1 | tail -n 3 | tee -a "$out/train.txt"
      runs+=("$workdir")
    done
    (($#)) || set -- --scale default
    python3 benchmarks/speculative.py "${runs[@]}" "$@" --json "$out/speculative-$kind.json" 2>&1 |
      tee "$out/speculative-$kind.txt"
    ;;
  *) usage ;;
esac
