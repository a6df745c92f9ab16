#!/usr/bin/env bash
# Several processes on this machine, each with its own fake CPU devices, joined by
# jax.distributed over 127.0.0.1 with gloo collectives: the multi-host code path, no cluster.
#
#   launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS --config FILE [section.key=value ...]
#   launch/local.sh 2 4 --config configs/tiny.yaml mesh.data=1 mesh.fsdp=2 mesh.expert=4
#
# Process 0 prints to this terminal; the others write <workdir>/logs/process_<i>.log. If one
# process fails the others are stopped, and the script exits with the first failure's status.
set -euo pipefail

usage() {
  echo "usage: launch/local.sh NUM_PROCESSES DEVICES_PER_PROCESS --config FILE [section.key=value ...]" >&2
  exit 2
}
[[ $# -ge 2 && $1 =~ ^[1-9][0-9]*$ && $2 =~ ^[1-9][0-9]*$ ]] || usage
num=$1 per=$2
shift 2

python=${PYTHON:-python}
workdir=$("$python" -m mtp_jax.cli "$@" --print-config | "$python" -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["train"]["workdir"])')
mkdir -p "$workdir/logs"
port=${MTP_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' TERM INT  # a preemption notice for every process

for ((i = 0; i < num; i++)); do
  args=("$@" "distributed.coordinator_address=127.0.0.1:$port" "distributed.num_processes=$num"
    "distributed.process_id=$i")
  env JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$per ${XLA_FLAGS:-}" \
    PYTHONUNBUFFERED=1 "$python" -m mtp_jax.cli "${args[@]}" \
    > >(if ((i == 0)); then cat; else cat > "$workdir/logs/process_$i.log"; fi) 2>&1 &
  pids+=($!)
done

status=0 running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  finished=
  wait -n -p finished "${running[@]}" || status=$?
  running=("${running[@]/$finished/}")
  running=(${running[@]})
  if ((status != 0)); then
    for ((i = 0; i < num; i++)); do
      if [[ ${pids[$i]} == "$finished" ]]; then
        echo "local.sh: process $i exited with status $status; stopping the others (logs: $workdir/logs)" >&2
      fi
    done
    break
  fi
done
exit "$status"
