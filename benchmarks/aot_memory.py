"""Compile a config's train step for an abstract TPU topology and print its memory analysis.

  pip install libtpu==0.0.42.1   # the version jax[tpu] pins for jax 0.10.2
  JAX_PLATFORMS=cpu python benchmarks/aot_memory.py --topology v5p:1x1x1 --config configs/small.yaml [key=value ...]

No TPU is needed: `jax.experimental.topologies` gives abstract devices to compile against, so
this tells whether a job fits a chip's HBM before paying for it. (The scale-out issue turns
this into a first-class command.)
"""

from __future__ import annotations

import math
import os
import sys
import time

os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM here: silence libtpu's probe

from mtp_jax.cli import command_parser, load_config
from mtp_jax.train import loop


def main(argv=None) -> int:
  parser = command_parser("aot_memory", __doc__.splitlines()[0], default_config="configs/small.yaml")
  parser.add_argument("--topology", default="v5p:1x1x1", help="e.g. v5p:1x1x1, v5p:2x2x1, v6e:2x2")
  args = parser.parse_args(argv)
  cfg = load_config(parser.prog, args.config, args.overrides)
  try:
    from jax.experimental import topologies

    shape = args.topology.split(":")[-1].split("x")
    single_host = tuple(int(s) for s in shape) if math.prod(int(s) for s in shape) <= 4 else None
    kw = {"chips_per_host_bounds": single_host} if single_host else {}
    topo = topologies.get_topology_desc(args.topology, "tpu", **kw)
  except Exception as err:  # libtpu missing or an unknown topology name
    print(f"aot_memory: --topology {args.topology}: {str(err).splitlines()[0]}", file=sys.stderr)
    return 2
  start = time.perf_counter()
  compiled = loop.build(cfg, list(topo.devices)).compile()
  m = compiled.memory_analysis()
  gib = 2**30
  print(
    f"{args.config} {' '.join(args.overrides)} on {args.topology} ({len(topo.devices)} chips), "
    f"compiled in {time.perf_counter() - start:.0f}s; per chip: arguments {m.argument_size_in_bytes / gib:.1f} GiB "
    f"(train state, donated), temporaries {m.temp_size_in_bytes / gib:.1f} GiB, "
    f"total {(m.argument_size_in_bytes + m.temp_size_in_bytes) / gib:.1f} GiB"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
