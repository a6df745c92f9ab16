"""Plain decoding from float32 parameters with bfloat16 compute, three ways of holding the weights.

  python benchmarks/decode_cast.py [--config configs/tiny.yaml] [--scale default] [--batches 1,8]
      [--max-new-tokens 64] [--repeats 3] [--tries 2] [key=value ...]

- `each step`: the decoding loop steps with the float32 parameters, converting them at every use
  (what decoding did before `decode.for_steps`, and does on a CPU or TPU);
- `once a call`: `decode.generate` casts them to bfloat16 once when the call starts, slicing the
  layers out of their stacks in the same pass (`decode.in_compute_dtype`, `Transformer.unstack`:
  what `for_steps` does on a GPU);
- `loaded cast`: the model holds them cast already, as `mtp-generate` loads a run on a CPU (on
  a GPU or TPU it also stores the trunk a block at a time: `load.held`).

Each is forced here, whatever the device. Random weights, greedy, 8-token prompts; each way is
compiled first and timed `--repeats` times (fastest kept), execution only, the ways in turn
`--tries` times. `--scale` takes the overrides of speculative.py's SCALES or its own.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
from flax import nnx

from mtp_jax import config as config_lib
from mtp_jax.generate import decode
from mtp_jax.model import Transformer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from speculative import SCALES


def fastest(model, prompts, new: int, repeats: int) -> float:
  decode._generate.clear_cache()  # each way traces its own program
  decode.generate(model, prompts, new)  # compiles
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    decode.generate(model, prompts, new)  # returns host lists: already done
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="decode_cast", description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny.yaml")
  parser.add_argument("--scale", default="default", help=f"overrides of a larger model, or one of {sorted(SCALES)}")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--tries", type=int, default=2)
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args(argv)
  scale = SCALES.get(args.scale, args.scale).split()
  dtypes = ["model.dtype=bfloat16", "model.param_dtype=float32"]
  cfg = config_lib.load(args.config, [*scale, *args.overrides, *dtypes])
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  loaded = decode.in_compute_dtype(model)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  print(f"# {platform.node()} {jax.devices()[0].device_kind} jax {jax.__version__}; {n / 1e9:.2f}B parameters")
  print("| batch | try | each step | once a call | loaded cast | each step / once a call | each step / loaded |")
  print("|---|---|---|---|---|---|---|")
  ways = {"each step": lambda m: m, "once a call": lambda m: decode.in_compute_dtype(m).unstack()}
  shipped = decode.for_steps
  try:
    for batch in map(int, args.batches.split(",")):
      prompts = [[1 + i, 2, 3, 4, 5, 6, 7, 8] for i in range(batch)]
      for t in range(args.tries):
        took = {}
        for name, way in ways.items():
          decode.for_steps = way
          took[name] = fastest(model, prompts, args.max_new_tokens, args.repeats)
        decode.for_steps = shipped
        took["loaded"] = fastest(loaded, prompts, args.max_new_tokens, args.repeats)
        each, once, held = took["each step"], took["once a call"], took["loaded"]
        print(
          f"| {batch} | {t} | {each:.2f} s | {once:.2f} s | {held:.2f} s | {each / once:.2f}x | {each / held:.2f}x |",
          flush=True,
        )
  finally:
    decode.for_steps = shipped
  return 0


if __name__ == "__main__":
  sys.exit(main())
