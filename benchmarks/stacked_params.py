"""What storing scanned layers' parameters stacked saves over stacking them in the step, compiled for TPU.

  python benchmarks/stacked_params.py [--topology v5p:2x2x1] [--layers 16] [--d 4096] [--f 16384] \
      [--microbatches 1,4,8] [--swiglu]

Until the model stored each run of scanned layers stacked (`transformer.stack`), the step
stacked their per-layer parameters itself, a copy the scan read. This measures that copy on a
stand-in step: L two-matmul layers (three with `--swiglu`; f32, sharded over every device on
their first dimension) run as a rematerialised `lax.scan`, gradients accumulated over
microbatches, a momentum update, parameters and optimizer state donated. It compiles the step
for the TPU topology with the parameters passed as one array per layer (stacked in the step)
and as one stacked array, and prints the compiler's per-device memory for each. Needs libtpu
(`pip install 'mtp-jax[tpu-aot]'`); nothing runs on a TPU."""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

GiB = 2**30


def compiled_memory(mesh, stacked: bool, layers: int, d: int, f: int, microbatches: int, tokens: int, swiglu: bool):
  """The compiler's memory analysis of the stand-in step, parameters per layer or stacked."""
  shard = lambda *spec: NamedSharding(mesh, P(*spec))

  def forward(params, x_NxD):
    stack = params if stacked else jax.tree.map(lambda *ws: jnp.stack(ws), *params)
    stack = jax.tree.map(lambda w: jax.lax.with_sharding_constraint(w, shard(None, "all", None)), stack)

    def layer(x, w):
      if swiglu:
        w_gate, w_up, w_out = w
        return x + (jax.nn.silu(x @ w_gate) * (x @ w_up)) @ w_out, None
      w_in, w_out = w
      return x + jax.nn.relu(x @ w_in) @ w_out, None

    x_NxD, _ = jax.lax.scan(jax.checkpoint(layer, prevent_cse=False), x_NxD, stack)
    return jnp.mean(x_NxD**2)

  def step(params, momentum, xs_MxNxD):
    def one(acc, x_NxD):
      return jax.tree.map(jnp.add, acc, jax.grad(forward)(params, x_NxD)), None

    grads, _ = jax.lax.scan(one, jax.tree.map(jnp.zeros_like, params), xs_MxNxD)
    momentum = jax.tree.map(lambda m, g: 0.9 * m + g, momentum, grads)
    return jax.tree.map(lambda p, m: p - 1e-3 * m, params, momentum), momentum

  shapes = ((d, f), (d, f), (f, d)) if swiglu else ((d, f), (f, d))
  if stacked:
    params = tuple(jax.ShapeDtypeStruct((layers, *s), jnp.float32, sharding=shard(None, "all")) for s in shapes)
  else:
    one_layer = tuple(jax.ShapeDtypeStruct(s, jnp.float32, sharding=shard("all")) for s in shapes)
    params = [one_layer] * layers
  xs = jax.ShapeDtypeStruct((microbatches, tokens, d), jnp.float32, sharding=shard(None, "all"))
  return jax.jit(step, donate_argnums=(0, 1)).lower(params, params, xs).compile().memory_analysis()


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5p:2x2x1", help="libtpu's name of the slice (default: 4 v5p chips)")
  ap.add_argument("--layers", type=int, default=16)
  ap.add_argument("--d", type=int, default=4096)
  ap.add_argument("--f", type=int, default=16384)
  ap.add_argument("--microbatches", default="1,4,8")
  ap.add_argument("--tokens", type=int, default=4096, help="tokens per microbatch, all devices together")
  ap.add_argument("--swiglu", action="store_true", help="three matrices per layer, as the model's FFNs")
  args = ap.parse_args()
  devices = topologies.get_topology_desc(args.topology, "tpu").devices
  mesh = Mesh(np.array(devices), ("all",))
  params_gib = args.layers * (3 if args.swiglu else 2) * args.d * args.f * 4 / len(devices) / GiB
  print(f"{args.topology}: {len(devices)} devices; parameters {params_gib:.2f} GiB per device (f32), as much momentum")
  print("| microbatches | parameters | arguments GiB | temporaries GiB | temporaries, per layer - stacked |")
  print("|---|---|---|---|---|")
  for m in map(int, args.microbatches.split(",")):
    temps = {}
    for stacked in (False, True):
      mem = compiled_memory(mesh, stacked, args.layers, args.d, args.f, m, args.tokens, args.swiglu)
      temps[stacked] = mem.temp_size_in_bytes / GiB
      kind = "stacked" if stacked else "per layer"
      delta = f"{temps[False] - temps[True]:.2f} GiB" if stacked else ""
      print(f"| {m} | {kind} | {mem.argument_size_in_bytes / GiB:.2f} | {temps[stacked]:.2f} | {delta} |")


if __name__ == "__main__":
  main()
