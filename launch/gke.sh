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
# The slice shape comes from the same table mtp-compile uses (src/mtp_jax/topology.py).
PYTHONPATH="$here/../src${PYTHONPATH:+:$PYTHONPATH}" exec python3 - "$here/gke/jobset.yaml" "$name" "$image" "$tpu_type" "$@" <<'PY'
import json, os, string, subprocess, sys

from mtp_jax.topology import TopologyError, parse_topology

template, name, image, tpu_type, *args = sys.argv[1:]
ACCELERATORS = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice", "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
PER_HOST = 4  # chips per TPU VM host in multi-host slices of all four generations
try:
  topo = parse_topology(tpu_type)
except TopologyError as err:
  print(f"gke.sh: TPU_TYPE {tpu_type}: {str(err).split(': ', 1)[1]}", file=sys.stderr)
  sys.exit(2)
if topo.chip is None or topo.slices > 1 or topo.chips % PER_HOST:
  print(f"gke.sh: TPU_TYPE {tpu_type}: not one slice of whole TPU VM hosts (for several slices use xpk)", file=sys.stderr)
  sys.exit(2)
fields = {
  "NAME": name,
  "IMAGE": image,
  "ACCELERATOR": ACCELERATORS[topo.chip.name],
  "TOPOLOGY": "x".join(map(str, topo.shape)),
  "HOSTS": str(topo.chips // PER_HOST),
  "CHIPS_PER_HOST": str(PER_HOST),
  "ARGS": json.dumps(args),
  "CLAIM": os.environ.get("MTP_PVC", "mtp-shared"),
  "MAX_RESTARTS": os.environ.get("MTP_MAX_RESTARTS", "3"),
}
manifest = string.Template(open(template).read()).substitute(fields)
if os.environ.get("MTP_DRY_RUN"):
  print(manifest, end="")
else:
  sys.exit(subprocess.run(["kubectl", "apply", "-f", "-"], input=manifest, text=True).returncode)
PY
