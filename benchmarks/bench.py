"""Throughput of a config, and the cost of each MTP depth against its FLOPs.

  python benchmarks/bench.py --config configs/tiny.yaml --depths 0,1,2 --steps 20 [key=value ...]
  python benchmarks/bench.py --depths 1 --trainable all,mtp      # a drafter on a frozen trunk
  python benchmarks/bench.py --depths 0,1 --vary-depth 1 --vary xla:model.attention.impl=xla \
      --vary bf16:model.moe.mode=dropless,jax_default_matmul_precision=bfloat16

For each depth and each `--trainable` (train.trainable), then for each variant at the first
trainable and the first depth or `--vary-depth` (`--vary NAME:KEY=VALUE,...`: config overrides,
or `jax_*` options of JAX, on top of the command line's), it compiles the real train step, runs
warm-up steps, then times `--steps` steps on a fixed synthetic batch (data loading excluded) and
prints tokens/s, MFU (where the device's peak is known), XLA's peak memory a device, and step
time and FLOPs relative to the first row measured. `--json FILE` also writes the rows (after each
one); `--stop-after SECONDS` starts no row once that much time has passed (for a command's time
limit). A row that fails (a kernel that refuses the shapes, memory) prints its error's first line
and the others still run; the exit status is then 1.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
import time

import jax

from mtp_jax import config
from mtp_jax.cli import command_parser, load_config
from mtp_jax.errors import first_line
from mtp_jax.model.flops import cost
from mtp_jax.train.metrics import mfu
from mtp_jax.train.program import build, memory


@contextlib.contextmanager
def jax_options(options: dict[str, str]):
  """JAX's own options (`jax_*`) set for one row, then put back."""
  before = {k: getattr(jax.config, k) for k in options}
  try:
    for k, v in options.items():
      jax.config.update(k, {"true": True, "false": False}.get(v.lower(), v))
    yield
  finally:
    for k, v in before.items():
      jax.config.update(k, v)


def measure(cfg: config.Config, steps: int, warmup: int) -> dict:
  program = build(cfg)
  compiled = program.compile()
  mem = memory(compiled)
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
    "peak_bytes": mem and (mem["peak"] or mem["total"]),  # XLA's peak where it gives one, else the sum
  }


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
  """NAME:KEY=VALUE,... -> (name, config overrides, JAX options). Values hold no commas."""
  name, _, rest = text.partition(":")
  pairs = [p for p in rest.split(",") if p]
  if not name or not pairs or any("=" not in p for p in pairs):
    raise ValueError(f"--vary {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
  options = dict(p.split("=", 1) for p in pairs if p.startswith("jax_"))
  unknown = [k for k in options if not hasattr(jax.config, k)]
  if unknown:
    raise ValueError(f"--vary {text!r}: this JAX has no option {unknown[0]}")
  return name, [p for p in pairs if not p.startswith("jax_")], options


def main(argv=None) -> int:
  parser = command_parser("bench", __doc__.splitlines()[0], default_config="configs/tiny.yaml")
  parser.add_argument("--depths", default="0,1,2", help="comma-separated MTP depths; the first is the baseline")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--trainable", default="all", help="comma-separated train.trainable values (all, mtp)")
  parser.add_argument("--vary", action="append", default=[], metavar="NAME:KEY=VALUE,...", help="a variant (repeat)")
  parser.add_argument("--vary-depth", type=int, help="the MTP depth of the variants' rows (default: the first depth)")
  parser.add_argument("--json", metavar="FILE", help="also write every row here")
  parser.add_argument("--stop-after", type=float, metavar="SECONDS", help="start no row after this many seconds")
  args = parser.parse_args(argv)
  try:
    depths = [int(d) for d in args.depths.split(",")]
    variants = [("as given", [], {}), *map(parse_variant, args.vary)]
  except ValueError as err:
    parser.error(str(err) if "--vary" in str(err) else f"--depths {args.depths!r}: expected comma-separated integers")
  trainables = args.trainable.split(",")
  rows = [(variants[0], d, t) for d in depths for t in trainables]  # then each variant at the first of each
  rows += [(v, args.vary_depth if args.vary_depth is not None else depths[0], trainables[0]) for v in variants[1:]]
  cfgs = [
    load_config(
      "bench",
      args.config,
      [*args.overrides, *v[1], f"model.mtp.depth={d}", f"train.trainable={t}", "checkpoint.enabled=false"],
    )
    for v, d, t in rows
  ]

  dev = jax.devices()[0]
  print(
    f"# {args.config} {' '.join(args.overrides)} on {len(jax.devices())} x {dev.device_kind} "
    f"({platform.processor() or platform.machine()}), jax {jax.__version__}, {args.steps} timed steps"
  )
  print(
    "| variant | MTP depth | trained | step time (s) | tokens/s | MFU | peak GiB | step time / first measured "
    "| FLOPs / first measured |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  base, out, start, failed = None, [], time.monotonic(), False

  def dump(rows):  # after every row: a run stopped at its time limit keeps what it measured
    if args.json:
      with open(args.json, "w") as f:
        head = {"config": args.config, "overrides": args.overrides, "device": dev.device_kind, "jax": jax.__version__}
        json.dump({**head, "rows": rows}, f, indent=1)

  for ((name, overrides, options), d, t), cfg in zip(rows, cfgs, strict=True):
    if args.stop_after is not None and time.monotonic() - start > args.stop_after:
      print(f"| {name} | {d} | {t} | skipped: --stop-after {args.stop_after:g} s passed |", flush=True)
      continue
    row = {"variant": name, "overrides": overrides, "jax": options, "depth": d, "trainable": t}
    try:
      with jax_options(options):
        r = measure(cfg, args.steps, args.warmup)
    except Exception as err:  # a kernel that refuses the shapes, or memory: the other rows still run
      why = f"{type(err).__name__}: {first_line(err)}"[:300]
      print(f"| {name} | {d} | {t} | failed: {why} |", flush=True)
      out.append({**row, "error": why})
      failed = True
      dump(out)
      continue
    base = base or r
    m = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / 2**30:.2f}"
    print(
      f"| {name} | {d} | {t} | {r['step_time']:.4f} | {r['tokens_per_sec']:,.0f} | {m} | {peak} | "
      f"{r['step_time'] / base['step_time']:.3f} | {r['flops_per_token'] / base['flops_per_token']:.3f} |",
      flush=True,
    )
    out.append({**row, **r})
    dump(out)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
