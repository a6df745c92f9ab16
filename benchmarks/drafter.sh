#!/bin/bash
# The drafter workflow end to end, on CPU, with acceptance before and after:
#   benchmarks/drafter.sh [OUT]      (default runs/drafter; about 15 minutes on 2 cores)
# 1. a model with no MTP module: configs/tiny.yaml with MLA attention, model.mtp.depth=0;
# 2. exported in DeepSeek-V3's layout and imported with model.mtp.depth=1 train.trainable=mtp:
#    its trunk from the files, the MTP module the files lack initialised afresh;
# 3. acceptance of that untrained drafter (benchmarks/speculative.py, greedy, held-out code);
# 4. `mtp-train` trains the MTP module alone on the frozen trunk; acceptance again;
# 5. exported again: the trunk's tensors are the first export's, bit for bit, beside the new layer.
# 6. step times: benchmarks/bench.py at depth 1, all parameters against train.trainable=mtp.
set -euo pipefail
OUT=${1:-runs/drafter}
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL="model.attention.kind=mla model.attention.q_lora_rank=32"
rm -rf "$OUT" && mkdir -p "$OUT"

mtp-train --config configs/tiny.yaml $MODEL model.mtp.depth=0 train.eval_every=0 train.progress_bar=false \
  train.workdir="$OUT/base" | tail -n 2
mtp-export --checkpoint "$OUT/base" --output "$OUT/hf-base" --dtype fp32
mtp-import "$OUT/hf-base" --output "$OUT/drafter" --config configs/tiny.yaml \
  model.mtp.depth=1 train.trainable=mtp train.eval_every=0 train.progress_bar=false

spec() { python "$HERE/speculative.py" "$OUT/drafter" --batches 1,8 --repeats 1 --prompts 8; }
echo "== before training the drafter"; spec
mtp-train --config "$OUT/drafter/config.yaml" | tail -n 2
echo "== after 300 steps of train.trainable=mtp"; spec
mtp-export --checkpoint "$OUT/drafter" --output "$OUT/hf-drafter" --dtype fp32
python - "$OUT/hf-base" "$OUT/hf-drafter" <<'EOF'
import sys, pathlib
from safetensors.numpy import load_file
def tensors(d):
  out = {}
  for f in sorted(pathlib.Path(d).glob("*.safetensors")):
    out.update(load_file(f))
  return out
base, new = tensors(sys.argv[1]), tensors(sys.argv[2])
same = all(new[k].tobytes() == v.tobytes() for k, v in base.items())
print(f"trunk bit for bit: {same}; tensors new in the drafter export: {len(set(new) - set(base))}")
EOF

echo "== step time, depth 1: all parameters, then the MTP module alone"
python "$HERE/bench.py" --config configs/tiny.yaml --depths 1 --trainable all,mtp $MODEL
