#!/usr/bin/env bash
# A Cloud TPU VM slice, one host or many: the same `mtp-train` on every worker through
# `gcloud compute tpus tpu-vm ssh --worker=all`. On the workers jax.distributed finds the other
# hosts from the TPU metadata, so no addresses are passed.
#
#   launch/tpu_pod.sh TPU_NAME ZONE --config configs/deepseek-v3-671b.yaml train.workdir=/mnt/shared/dsv3 [overrides]
#   MTP_SETUP=1 launch/tpu_pod.sh ...      # first copy this checkout to every worker and install it
#   MTP_DRY_RUN=1 launch/tpu_pod.sh ...    # print the gcloud commands instead of running them
#
# train.workdir must be a directory every host sees (Filestore/NFS, or a gcsfuse mount):
# checkpoints are written by all hosts together. Environment: MTP_PROJECT (gcloud --project),
# MTP_REMOTE_DIR (the checkout on the workers, default mtp-jax in the home directory).
set -euo pipefail

if [[ $# -lt 3 || $1 == -* || $2 == -* ]]; then
  echo "usage: launch/tpu_pod.sh TPU_NAME ZONE --config FILE [section.key=value ...]" >&2
  exit 2
fi
tpu=$1 zone=$2
shift 2
remote=${MTP_REMOTE_DIR:-mtp-jax}
gcloud=(gcloud compute tpus tpu-vm)
where=(--zone "$zone" ${MTP_PROJECT:+--project "$MTP_PROJECT"})
run() { if [[ -n ${MTP_DRY_RUN:-} ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [[ -n ${MTP_SETUP:-} ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  tarball=$(mktemp --suffix=.tar.gz)
  tar -C "$here" --exclude=.git --exclude=runs --exclude='*.egg-info' -czf "$tarball" .
  run "${gcloud[@]}" scp "$tarball" "$tpu:mtp-jax.tar.gz" --worker=all "${where[@]}"
  run "${gcloud[@]}" ssh "$tpu" --worker=all "${where[@]}" --command \
    "mkdir -p $(printf '%q' "$remote") && tar -C $(printf '%q' "$remote") -xzf mtp-jax.tar.gz && pip install -q -e $(printf '%q' "$remote") 'jax[tpu]'"
  rm -f "$tarball"
fi

# Every worker runs the same command; SIGTERM (maintenance, preemption) saves a checkpoint.
command="cd $(printf '%q' "$remote") && python3 -m mtp_jax.cli $(printf '%q ' "$@")"
run "${gcloud[@]}" ssh "$tpu" --worker=all "${where[@]}" --command "$command"
