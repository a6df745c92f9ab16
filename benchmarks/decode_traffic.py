"""Decoding's HBM traffic on a GPU or TPU chip, by expert kernel, compiled for one not attached.

  python benchmarks/decode_traffic.py [--topology h200] [--config configs/tiny.yaml] [--scale gpu]
      [--batches 1,8] [--tokens 1,3] [--kernels auto,blocked,ragged_dot,mosaic_gpu] [--json OUT] [key=value ...]
  python benchmarks/decode_traffic.py --loop [--topology h200] [--config ...] [--batches 1,8] [key=value ...]

For each expert kernel (`model.moe.kernel`), batch and number of new tokens a row (1: a plain
step; 1 + K: a speculative round's verification with K drafts), it compiles one cached decoding
step (`decode.step`) for the topology's GPU through JAX's CUDA plugin (`pip install
'mtp-jax[gpu-aot]'`; no GPU needed) and counts what the step's kernels read from and write to
HBM (`hlo.kernel_traffic`: each kernel's operands and results, no cache), its weights held as the
decoding loops hold them there (`decode.for_steps`). The step is compiled alone: inside the
decoding loop XLA may fuse it otherwise (small.yaml on an H200, weights cast but still stacked:
4.4 GiB alone, 10.4 GiB a step of the loop, which sliced each layer's expert weights out of their
stacks anew; `for_steps` now slices them once, and the loop moves 4.15 GiB). For one TPU chip (`--topology v5p:1x1x1`,
libtpu from `.[tpu-aot]`) XLA:TPU counts the bytes itself: tiles' padding included, a loop's
body once (the blocked experts loop). A step that reads each weight once moves about those
parameters' bytes; what is over that is copies. The time column is that traffic over the chip's
HBM bandwidth, the step's floor if it is bound by memory.
`--scale` takes overrides of a larger model, or `gpu` (speculative.py's ~2.8B bfloat16 model).

`--loop` compiles the whole decoding program instead (`decode._generate`: prefill of
8-token prompts, then a loop of one-token steps) and counts one step of its loop, with what
XLA's memory analysis says the program holds: its arguments (the weights) and its temporaries.
Two ways in: the parameters as the run stores them (as the in-training evaluation hands them
over; the loop's model is made from them inside the program, `decode.for_steps`) and as
`mtp-generate` loads them (`load.held`). On a TPU chip the step is counted the same way, from
XLA:TPU's program (its own count takes a loop's body once): tiles' padding is not counted, so
the figure is for comparing the two ways, not XLA:TPU's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys

from mtp_jax import topology


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="decode_traffic", description=__doc__.splitlines()[0])
  parser.add_argument("--topology", default="h200", help="one GPU (h100, h200) or one TPU chip (v5p:1x1x1)")
  parser.add_argument("--config", default="configs/tiny.yaml")
  parser.add_argument("--scale", default="", help="overrides of a larger model, or gpu")
  parser.add_argument("--batches", default="1,8")
  parser.add_argument("--tokens", default="1,3", help="new tokens a row per step: 1 plain, 1 + K a round of K drafts")
  parser.add_argument("--kernels", default="auto,blocked,ragged_dot,mosaic_gpu")
  parser.add_argument("--json", metavar="FILE", help="also write every row here")
  parser.add_argument("--loop", action="store_true", help="the whole decoding program, one step of its loop")
  parser.add_argument("overrides", nargs="*", metavar="key=value")
  args = parser.parse_args(argv)
  topo = topology.parse_topology(args.topology)
  if not (topo.gpu or topo.chip) or topo.chips != 1:
    parser.error(f"--topology {args.topology}: one GPU or one TPU chip, e.g. h200 or v5p:1x1x1")
  topology.prepare_environment(topo)  # before JAX starts
  if args.loop:
    return loop(topo, args)

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from mtp_jax import compile as mtp_compile
  from mtp_jax import config as config_lib
  from mtp_jax import hlo, sharding
  from mtp_jax.generate import decode
  from mtp_jax.generate.cache import Cache
  from mtp_jax.model import Transformer, experts

  devs, placed, attached, scale = _chip(topo, args)
  platform = "gpu" if topo.gpu else "tpu"
  print("| kernel | runs as | batch | tokens a row | HBM traffic | / parameters | at HBM bandwidth |")
  print("|---|---|---|---|---|---|---|")
  rows = []
  for kernel in args.kernels.split(","):
    cfg = config_lib.load(args.config, [*scale, *args.overrides, f"model.moe.kernel={kernel}"])
    mesh = sharding.make_mesh(cfg.mesh, devs)
    with sharding.activate(mesh, cfg.mesh.rules):  # as the decoding loops hold it there (decode.for_steps)
      model = nnx.eval_shape(lambda cfg=cfg: decode.for_steps(Transformer(cfg.model, rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(model)
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    for batch in map(int, args.batches.split(",")):
      for tokens in map(int, args.tokens.split(",")):
        slots = cfg.data.seq_len

        def step(state, tokens_BxT, cache, graphdef=graphdef):
          return decode.step(nnx.merge(graphdef, state), tokens_BxT, cache)[0]

        def on_chip(tree):
          return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), tree)

        def empty(batch=batch, slots=slots, model=model):
          return Cache(model.empty_cache(batch, slots), jnp.zeros(batch, jnp.int32))

        cache = jax.eval_shape(empty)
        new = jax.ShapeDtypeStruct((batch, tokens), jnp.int32, sharding=placed)
        with attached(), sharding.activate(mesh, cfg.mesh.rules):
          compiled = jax.jit(step).trace(on_chip(state), new, on_chip(cache)).lower().compile()
        moved = (
          hlo.kernel_traffic(compiled.as_text()).bytes if topo.gpu else mtp_compile._cost(compiled)["bytes accessed"]
        )
        m = cfg.model.moe
        runs = kernel if kernel != "auto" or not m.num_experts else experts.native(platform, batch * tokens * m.top_k)
        row = dict(kernel=kernel, runs=runs, batch=batch, tokens=tokens, bytes=moved, params_bytes=params)
        row["seconds"] = moved / (topo.gpu or topo.chip).hbm_bandwidth
        rows.append(row)
        print(
          f"| {kernel} | {runs} | {batch} | {tokens} | {mtp_compile._size(moved)} | {moved / params:.2f} "
          f"| {row['seconds'] * 1e3:.2f} ms |",
          flush=True,
        )
  return _written(args.json, rows)


def loop(topo, args) -> int:
  """`--loop`: the decoding program compiled whole, the parameters handed in two ways."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from mtp_jax import compile as mtp_compile
  from mtp_jax import config as config_lib
  from mtp_jax import hlo, sharding
  from mtp_jax.generate import decode, load
  from mtp_jax.model import Transformer

  devs, placed, attached, scale = _chip(topo, args)
  cfg = config_lib.load(args.config, [*scale, *args.overrides])
  mesh = sharding.make_mesh(cfg.mesh, devs)
  prompt, new = 8, 16
  print(f"# decode._generate: {prompt}-token prompts, {new} new tokens, greedy; experts {cfg.model.moe.kernel}")
  print("| parameters | batch | HBM traffic a step of the loop | busiest kernels | arguments | temporaries |")
  print("|---|---|---|---|---|---|")

  def on_chip(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=placed)

  rows = []
  for way, form in [("as stored", lambda m: m), ("as loaded (load.held)", load.held)]:
    with sharding.activate(mesh, cfg.mesh.rules):
      model = nnx.eval_shape(lambda form=form: form(Transformer(cfg.model, rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(decode.dropless(model))
    state = jax.tree.map(lambda a: on_chip(a.shape, a.dtype), state)
    for batch in map(int, args.batches.split(",")):
      inputs = (state, on_chip((batch, prompt), jnp.int32), on_chip((batch,), jnp.int32), np.int32(-1))
      with attached(), sharding.activate(mesh, cfg.mesh.rules):
        traced = decode._generate.trace(
          graphdef, *inputs, jax.random.key(0), max_new_tokens=new, temperature=0.0, top_p=1.0
        )
        compiled = traced.lower().compile()
      text = compiled.as_text()
      module = hlo.parse(text)
      loops = [ins.name for ins in module.computations[module.entry] if ins.opcode == "while"]
      # The decoding loop: the busiest of the program's outer loops (the rest sort the prompts).
      step = max((hlo.kernel_traffic(text, 3, frozenset([name])) for name in loops), key=lambda t: t.bytes)
      memory = compiled.memory_analysis()
      busiest = ", ".join(f"{op.rsplit('/', 1)[-1] or name} {mtp_compile._size(b)}" for name, op, b in step.largest)
      row = dict(way=way, batch=batch, bytes=step.bytes, arguments=memory.argument_size_in_bytes)
      row["temporaries"] = memory.temp_size_in_bytes
      rows.append(row)
      print(
        f"| {way} | {batch} | {mtp_compile._size(step.bytes)} | {busiest} | "
        f"{mtp_compile._size(row['arguments'])} | {mtp_compile._size(row['temporaries'])} |",
        flush=True,
      )
  return _written(args.json, rows)


def _chip(topo, args):
  """(devices, the first one's sharding, the context to compile in, the --scale overrides), after
  printing which chip and JAX the figures are for."""
  import jax

  from mtp_jax import compile as mtp_compile

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from speculative import SCALES

  devs = topology.devices(topo)
  attached = functools.partial(mtp_compile._attached, devs) if topo.gpu else contextlib.nullcontext
  print(f"# {args.topology} ({devs[0].device_kind}), compiled with none attached; jax {jax.__version__}")
  return devs, jax.sharding.SingleDeviceSharding(devs[0]), attached, SCALES.get(args.scale, args.scale).split()


def _written(path: str | None, rows: list[dict]) -> int:
  """Writes `rows` to `path` as JSON, if one was given; the exit code."""
  if path:
    with open(path, "w") as f:
      json.dump(rows, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
