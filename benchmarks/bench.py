"""Throughput of a config, and the cost of each MTP depth against its FLOPs.

  python benchmarks/bench.py --config configs/tiny.yaml --depths 0,1,2 --steps 20 [key=value ...]
  python benchmarks/bench.py --depths 1 --trainable all,mtp      # a drafter on a frozen trunk

For each depth (and each `--trainable`, train.trainable) it compiles the real train step, runs
warm-up steps, then times `--steps` steps on a fixed synthetic batch (data loading excluded) and
prints tokens/s, MFU (where the device's peak is known) and step time and FLOPs relative to the
first row.
"""

from __future__ import annotations

import platform
import sys
import time

import jax

from mtp_jax import config
from mtp_jax.cli import command_parser, load_config
from mtp_jax.model.flops import cost
from mtp_jax.train.metrics import mfu
from mtp_jax.train.program import build


def measure(cfg: config.Config, steps: int, warmup: int) -> dict:
  program = build(cfg)
  compiled = program.compile()
  batch = program.synthetic_batch()
  state = program.init_state()
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  step_time = (time.perf_counter() - start) / steps
  tps = cfg.train.batch_size * cfg.data.seq_len / step_time
  flops = cost(cfg.model, cfg.data.seq_len, cfg.train.trainable).train_flops_per_token
  return {
    "step_time": step_time,
    "tokens_per_sec": tps,
    "flops_per_token": flops,
    "mfu": mfu(tps, flops, jax.devices()),
  }


def main(argv=None) -> int:
  parser = command_parser("bench", __doc__.splitlines()[0], default_config="configs/tiny.yaml")
  parser.add_argument("--depths", default="0,1,2", help="comma-separated MTP depths; the first is the baseline")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--trainable", default="all", help="comma-separated train.trainable values (all, mtp)")
  args = parser.parse_args(argv)
  try:
    depths = [int(d) for d in args.depths.split(",")]
  except ValueError:
    parser.error(f"--depths {args.depths!r}: expected comma-separated integers")
  rows = [(d, t) for d in depths for t in args.trainable.split(",")]
  cfgs = [
    load_config(
      "bench",
      args.config,
      [*args.overrides, f"model.mtp.depth={d}", f"train.trainable={t}", "checkpoint.enabled=false"],
    )
    for d, t in rows
  ]

  dev = jax.devices()[0]
  print(
    f"# {args.config} {' '.join(args.overrides)} on {len(jax.devices())} x {dev.device_kind} "
    f"({platform.processor() or platform.machine()}), jax {jax.__version__}, {args.steps} timed steps"
  )
  print("| MTP depth | trained | step time (s) | tokens/s | MFU | step time / first row | FLOPs / first row |")
  print("|---|---|---|---|---|---|---|")
  base = None
  for (d, t), cfg in zip(rows, cfgs, strict=True):
    r = measure(cfg, args.steps, args.warmup)
    base = base or r
    m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    print(
      f"| {d} | {t} | {r['step_time']:.4f} | {r['tokens_per_sec']:,.0f} | {m} | "
      f"{r['step_time'] / base['step_time']:.3f} | {r['flops_per_token'] / base['flops_per_token']:.3f} |",
      flush=True,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
