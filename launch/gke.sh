#!/usr/bin/env bash
# One TPU slice on GKE: fills in launch/gke/jobset.yaml and applies it with kubectl.
#
#   launch/gke.sh NAME IMAGE TPU_TYPE --config configs/deepseek-v3-671b.yaml train.workdir=/mnt/shared/dsv3 [overrides]
#   launch/gke.sh dsv3 us-docker.pkg.dev/p/r/mtp-jax:latest v5p-256 --config ...
#   MTP_DRY_RUN=1 launch/gke.sh ...     # print the manifest instead of applying it
#
# TPU_TYPE is a Cloud TPU name (v5p-N, v4-N: N TensorCores; v5e-N, v6e-N: N chips). The image
# holds this checkout installed with jax[tpu]. Environment: MTP_PVC (the ReadWriteMany volume
# claim mounted at /mnt/shared, default mtp-shared), MTP_MAX_RESTARTS (default 3).
# For several slices (DCN), use xpk, which sets up the multi-slice networking:
#   xpk workload create --cluster C --workload NAME --tpu-type v5p-256 --num-slices 2 \
#     --docker-image IMAGE --command "python -m mtp_jax.cli --config ... mesh.dcn.data=2"
set -euo pipefail

if [[ $# -lt 4 || $1 == -* || $2 == -* || $3 == -* ]]; then
  echo "usage: launch/gke.sh NAME IMAGE TPU_TYPE --config FILE [section.key=value ...]" >&2
  exit 2
fi
name=$1 image=$2 tpu_type=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
exec python3 - "$here/gke/jobset.yaml" "$name" "$image" "$tpu_type" "$@" <<'PY'
import json, os, re, string, subprocess, sys


def usage(why):
  print(f"gke.sh: {why}", file=sys.stderr)
  sys.exit(2)


template, name, image, tpu_type, *args = sys.argv[1:]
# Cloud TPU type -> (GKE accelerator, chips per host, default slice topology by chip count).
kinds = {
  "v4": ("tpu-v4-podslice", 4, 2),  # (accelerator, chips per host, TensorCores per chip)
  "v5p": ("tpu-v5p-slice", 4, 2),
  "v5e": ("tpu-v5-lite-podslice", 4, 1),
  "v5litepod": ("tpu-v5-lite-podslice", 4, 1),
  "v6e": ("tpu-v6e-slice", 4, 1),
}
m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", tpu_type)
if not m:
  usage(f"TPU_TYPE {tpu_type!r}: expected v4-N, v5p-N, v5e-N or v6e-N")
accelerator, per_host, cores = kinds[m[1]]
chips = int(m[2]) // cores
if chips < per_host or chips % per_host:
  usage(f"TPU_TYPE {tpu_type}: {chips} chips is not a multi-host slice of {per_host}-chip hosts")


def shape(n, dims):
  """The most cubic (3-D) or square (2-D) power-of-two shape with n chips, smallest first."""
  out = [1] * dims
  i = 0
  while n > 1:
    out[i % dims] *= 2
    n //= 2
    i += 1
  return "x".join(map(str, sorted(out)))


if chips & (chips - 1):
  usage(f"TPU_TYPE {tpu_type}: {chips} chips is not a power of two")
topology = shape(chips, 3 if m[1] in ("v4", "v5p") else 2)
fields = {
  "NAME": name,
  "IMAGE": image,
  "ACCELERATOR": accelerator,
  "TOPOLOGY": topology,
  "HOSTS": str(chips // per_host),
  "CHIPS_PER_HOST": str(per_host),
  "ARGS": json.dumps(args),
  "CLAIM": os.environ.get("MTP_PVC", "mtp-shared"),
  "MAX_RESTARTS": os.environ.get("MTP_MAX_RESTARTS", "3"),
}
manifest = string.Template(open(template).read()).substitute(fields)
if os.environ.get("MTP_DRY_RUN"):
  print(manifest, end="")
else:
  subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True, check=True)
PY
