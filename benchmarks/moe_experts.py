"""The dropless experts two ways: `jax.lax.ragged_dot` against the blocked loop of `swiglu_blocked`.

  python benchmarks/moe_experts.py [--experts 8] [--sizes 96x96,1024x1024] [--rows 2,16,64,1024]
  python benchmarks/moe_experts.py --config configs/tiny.yaml [--steps 10] [key=value ...]

For each expert size (d_model x expert_d_ff) and row count (token-slots, i.e. tokens x top-k) it
times, on the default backend, one SwiGLU over rows sorted by expert with random group sizes:
forward only (what decoding runs) and forward plus gradients (what training runs). With
`--config`, it times the whole train step of that config (dropless) compiled each way instead,
alternating between the two three times and keeping each one's fastest. Prints one row per
case with both times and their ratio. `model.moe.kernel=auto` takes the blocked loop on CPU
(`experts.NATIVE`); this measures whether that choice is right on the machine at hand.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mtp_jax.cli import load_config
from mtp_jax.model import experts
from mtp_jax.train.program import build


def fastest(fn, *args, repeats: int) -> float:
  """Seconds of the fastest of `repeats` calls, after one that compiles."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def compiled_step(cfg, kernel: str):
  """(compiled step, state, batch) with the dropless experts run by `kernel` (model.moe.kernel)."""
  moe = cfg.model.moe.model_copy(update={"kernel": kernel})
  cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"moe": moe})})
  program = build(cfg, jax.devices()[:1])
  return program.compile(), program.init_state(), program.synthetic_batch()


def time_steps(cfg, steps: int) -> None:
  runs = {name: compiled_step(cfg, name) for name in ("ragged_dot", "blocked")}
  best = dict.fromkeys(runs, float("inf"))
  for _ in range(3):
    for name, (step, state, batch) in runs.items():
      state, metrics = step(state, batch)  # one untimed step after the other program ran
      jax.block_until_ready(metrics)
      start = time.perf_counter()
      for _ in range(steps):
        state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      best[name] = min(best[name], (time.perf_counter() - start) / steps)
      runs[name] = (step, state, batch)
  m = cfg.model
  print(
    f"| {m.d_model}x{m.moe.expert_d_ff}, {m.moe.num_experts} experts top-{m.moe.top_k} | "
    f"{cfg.train.batch_size}x{cfg.data.seq_len} tokens | train step | {best['ragged_dot'] * 1e3:.1f} | "
    f"{best['blocked'] * 1e3:.1f} | {best['ragged_dot'] / best['blocked']:.2f} |"
  )


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="moe_experts", description=__doc__.splitlines()[0])
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--sizes", default="96x96,1024x1024", help="d_model x expert_d_ff, comma-separated")
  parser.add_argument("--rows", default="2,16,64,1024", help="token-slots, comma-separated")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--config", help="time this config's train step each way instead")
  parser.add_argument("--steps", type=int, default=10, help="with --config: steps per timing")
  parser.add_argument("overrides", nargs="*", metavar="key=value", help="with --config")
  args = parser.parse_args(argv)
  try:
    sizes = [tuple(int(v) for v in size.split("x", 1)) for size in args.sizes.split(",")]
    rows = [int(n) for n in args.rows.split(",")]
    if any(len(size) != 2 for size in sizes):
      raise ValueError
  except ValueError:
    parser.error(f"--sizes {args.sizes!r} / --rows {args.rows!r}: expected e.g. 96x96,1024x1024 and 2,16,64")
  e = args.experts
  print(f"# {platform.node()} {jax.devices()[0].device_kind} jax {jax.__version__}")
  print("| d x f | rows | pass | ragged_dot (ms) | blocked (ms) | ragged_dot / blocked |")
  print("|---|---|---|---|---|---|")
  if args.config:
    cfg = load_config(
      "moe_experts", args.config, ["model.moe.mode=dropless", "train.workdir=/tmp/moe-experts", *args.overrides]
    )
    time_steps(cfg, args.steps)
    return 0
  rng = np.random.default_rng(0)
  for d, f in sizes:
    w = tuple(jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d)))
    for n in rows:
      x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
      groups = jnp.asarray(np.bincount(rng.integers(0, e, n), minlength=e), jnp.int32)
      for name, grad in (("forward", False), ("forward + grads", True)):
        times = []
        for swiglu in (experts.swiglu_ragged_dot, experts.swiglu_blocked):
          if grad:
            fn = jax.jit(jax.grad(lambda x, w, g, s=swiglu: jnp.sum(s(x, w, g) ** 2), (0, 1)))
          else:
            fn = jax.jit(swiglu)
          times.append(fastest(fn, x, w, groups, repeats=args.repeats))
        ms = " | ".join(f"{t * 1e3:.2f}" for t in times)
        print(f"| {d}x{f}, {e} experts | {n} | {name} | {ms} | {times[0] / times[1]:.2f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
