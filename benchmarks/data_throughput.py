"""Input-pipeline tokens/s per host against what the train step consumes.

  python benchmarks/data_throughput.py --config configs/tiny.yaml [--data DIR] [--workers 0,1,2] [key=value ...]

Without `--data` it first runs `mtp-prepare` (byte-level) on the stdlib corpus into a
temporary directory. For each worker count it builds the real training pipeline on the
prepared data (global shuffle, pack, mix, batch, prefetch; with `--processes`, one host's rows
of each global batch: it plans every row and reads its own), discards warm-up batches and times `--batches`
more. The step's appetite is measured here (`--step measure`: the compiled train step on
this host's devices, synthetic batch) or estimated from the FLOP model for a host of
accelerators (`--step H100:8:0.5`: 8 H100s per host at 50% MFU).
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import time

from mtp_jax import data
from mtp_jax.cli import command_parser, load_config
from mtp_jax.data import prepare, stdlib
from mtp_jax.model.flops import cost

PEAK = {"H100": 989e12, "H200": 989e12, "TPUv5p": 459e12, "TPUv6e": 918e12}  # dense bf16 FLOP/s per chip


def pipeline_tokens_per_sec(cfg, rows: int, batches: int, warmup: int) -> tuple[float, float]:
  """(tokens/s, fraction of tokens that are not padding) of the training pipeline, for a host
  that reads the first `rows` rows of each global batch."""
  it = iter(data.make_dataset(cfg.data, batch_size=cfg.train.batch_size, seed=0, rows=range(rows)))
  for _ in range(warmup):
    next(it)
  real = 0
  start = time.perf_counter()
  for _ in range(batches):
    real += int((next(it)["segment_ids"] > 0).sum())
  elapsed = time.perf_counter() - start
  it.close()
  total = batches * rows * cfg.data.seq_len
  return total / elapsed, real / total


def step_tokens_per_sec(cfg, how: str) -> tuple[float, str]:
  """What the train step consumes per host, and how that figure was obtained."""
  if how == "measure":
    sys.path.insert(0, os.path.dirname(__file__))
    import bench  # here only: it imports JAX

    r = bench.measure(cfg, steps=5, warmup=2)
    return r["tokens_per_sec"], "measured here"
  kind, per_host, util = how.split(":")
  flops = cost(cfg.model, cfg.data.seq_len).train_flops_per_token
  return PEAK[kind] * float(util) * int(per_host) / flops, f"estimated: {per_host} x {kind} at {float(util):.0%} MFU"


def main(argv=None) -> int:
  parser = command_parser("data_throughput", __doc__.splitlines()[0], default_config="configs/tiny.yaml")
  parser.add_argument("--data", help="a directory written by mtp-prepare (default: prepare the stdlib corpus)")
  parser.add_argument("--workers", default="0,1,2", help="comma-separated data.workers values to time")
  parser.add_argument("--batches", type=int, default=100)
  parser.add_argument("--warmup", type=int, default=10)
  parser.add_argument("--processes", type=int, default=1, help="hosts sharing train.batch_size")
  parser.add_argument("--step", default="measure", help="measure, or KIND:DEVICES_PER_HOST:MFU (KIND in PEAK)")
  args = parser.parse_args(argv)
  if args.step != "measure" and (len(args.step.split(":")) != 3 or args.step.split(":")[0] not in PEAK):
    parser.error(f"--step {args.step!r}: expected measure or KIND:DEVICES:MFU with KIND in {', '.join(PEAK)}")

  with tempfile.TemporaryDirectory() as tmp:
    path = args.data
    if path is None:
      path = os.path.join(tmp, "stdlib")
      start = time.perf_counter()
      files = stdlib.split_files("train")
      prepare.prepare(files, path, tokenizer="bytes", workers=os.cpu_count())
      took = time.perf_counter() - start
      size = sum(os.path.getsize(f) for f in files) / 2**20
      print(f"# mtp-prepare: {len(files)} files, {size:.1f} MiB in {took:.1f} s ({size / took:.1f} MiB/s)")
    base = load_config(
      "data_throughput", args.config, [*args.overrides, f"data.path={path}", "checkpoint.enabled=false"]
    )
    step_tps, how = step_tokens_per_sec(base, args.step)
    local_batch = base.train.batch_size // args.processes
    print(
      f"# {args.config} {' '.join(args.overrides)}: batch {local_batch} x {base.data.seq_len} per host, "
      f"packing {base.data.packing}; {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    )
    print(f"# the step consumes {step_tps:,.0f} tokens/s per host ({how})")
    print("| data.workers | pipeline tokens/s | non-padding | pipeline / step |")
    print("|---|---|---|---|")
    for w in (int(x) for x in args.workers.split(",")):
      cfg = base.model_copy(update={"data": base.data.model_copy(update={"workers": w})})
      tps, fill = pipeline_tokens_per_sec(cfg, local_batch, args.batches, args.warmup)
      print(f"| {w} | {tps:,.0f} | {fill:.1%} | {tps / step_tps:.2f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
