"""What saving checkpoints costs the step: none vs asynchronous vs synchronous saves.

  python benchmarks/checkpoint_cost.py --config configs/tiny.yaml --steps 40 --every 5 [key=value ...]

Runs the real train step on a fixed synthetic batch three times: without saves, then saving
every `--every` steps with `checkpoint.async_save` on, then off. Prints the time per step
(the last write included), how long the loop was held inside `save()` per checkpoint once the
state was ready, and the size of one checkpoint. With async saves the loop is held only while
arrays are copied to host memory and checksummed; the writing overlaps the following steps,
so long as the host has CPU to spare for it.
"""

from __future__ import annotations

import platform
import sys
import tempfile
import time

import jax

from mtp_jax.cli import command_parser, load_config
from mtp_jax.train.checkpoint import Checkpointer
from mtp_jax.train.program import build


def measure(cfg, steps: int, every: int, mode: str, directory: str) -> dict:
  program = build(cfg)
  compiled = program.compile()
  batch = program.synthetic_batch()
  state = program.init_state()
  ckpt = (
    None
    if mode == "none"
    else Checkpointer(directory, cfg.checkpoint.model_copy(update={"async_save": mode == "async"}))
  )
  state, metrics = compiled(state, batch)  # warm-up; also compiles the checksums
  if ckpt:
    ckpt.save(0, state, None)
    ckpt.wait()
  jax.block_until_ready(metrics)
  held, saves = 0.0, 0
  start = time.perf_counter()
  for i in range(1, steps + 1):
    state, metrics = compiled(state, batch)
    if ckpt and i % every == 0:
      jax.block_until_ready(state)  # the steps queued so far are not the save's cost
      t = time.perf_counter()
      ckpt.save(i, state, None)
      held += time.perf_counter() - t
      saves += 1
  jax.block_until_ready(metrics)
  if ckpt:
    ckpt.wait()  # the last write counts: the run is not done before it is
  total = time.perf_counter() - start
  size = 0
  if ckpt:
    step_dir = ckpt.directory / str(ckpt.latest_step())
    size = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
    ckpt.close()
  return {"step_time": total / steps, "held_per_save": held / max(saves, 1), "bytes": size}


def main(argv=None) -> int:
  parser = command_parser("checkpoint_cost", __doc__.splitlines()[0], default_config="configs/tiny.yaml")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--every", type=int, default=5, help="save every this many steps")
  args = parser.parse_args(argv)
  cfg = load_config("checkpoint_cost", args.config, args.overrides)
  print(f"# {args.config} {' '.join(args.overrides)}; {jax.device_count()} x {jax.devices()[0].device_kind}")
  print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, python {sys.version.split()[0]}")
  print("| saves | step time (ms) | vs no saves | loop held per save (ms) | checkpoint size (MiB) |")
  print("|---|---|---|---|---|")
  base = None
  for mode in ("none", "async", "sync"):
    with tempfile.TemporaryDirectory() as directory:
      r = measure(cfg, args.steps, args.every, mode, directory)
    base = base or r["step_time"]
    held = "-" if mode == "none" else f"{r['held_per_save'] * 1e3:,.1f}"
    size = "-" if mode == "none" else f"{r['bytes'] / 2**20:,.1f}"
    label = "none" if mode == "none" else f"{mode}, every {args.every}"
    print(f"| {label} | {r['step_time'] * 1e3:,.1f} | {r['step_time'] / base:.2f}x | {held} | {size} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
