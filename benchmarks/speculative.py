"""Self-speculative decoding against plain decoding on trained checkpoints, on held-out code.

  python benchmarks/speculative.py runs/spec-bench/sequential-d2 [more runs ...] \
      [--batches 1,8] [--prompt-len 48] [--max-new-tokens 64] [--prompts 8] [--repeats 3] [--temperature 0]

Each RUN is what `mtp-generate --checkpoint` takes. Prompts are windows of the run's held-out
documents (the eval split of its first data source; for the default stdlib corpus, Python
files the run never trained on), cut from each document's middle at a line start so they are
code, not licence headers. For each batch size the same prompts are decoded plainly and
speculatively (drafts = the MTP depth); both are compiled first and timed `--repeats` times
(fastest kept), execution only. Greedy by default, where the speculative tokens must equal the
plain ones (checked). Prints one table row per run and batch size; `--json` writes them all.

The speedup is (accepted length) x (plain step time / speculative round time). The second
factor depends on the hardware and the model's size, not on training, so it is also measured
apart, at each batch size, per round and per step: on the run's model at batch 1, and with
`--scale` on a model of the run's architecture and MTP settings at a larger width (random
weights), where a pass is bound by reading the weights rather than by per-operation overhead
(`--scale default`: ~0.4B parameters in float32, for CPUs; `--scale gpu`: ~2.8B in bfloat16).
Both are differences of short timings: trust them on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from functools import partial

import jax
import numpy as np
from flax import nnx

from mtp_jax import config as config_lib
from mtp_jax.data import pipeline
from mtp_jax.generate import decode, speculative
from mtp_jax.generate.load import load
from mtp_jax.model import Transformer

SCALES = {
  # about 0.4B parameters in float32: a pass reads ~1.6 GB, far beyond any CPU cache
  "default": "model.d_model=1024 model.d_ff=2816 model.attention.head_dim=128 model.attention.num_heads=8 "
  "model.attention.num_kv_heads=4 model.moe.expert_d_ff=1024",
  # about 2.8B parameters in bfloat16 (5.5 GB a pass): on an H200 (4.8 TB/s) a step reads weights
  # for ~1 ms, against some hundreds of kernel launches of a few microseconds each
  "gpu": "model.d_model=4096 model.d_ff=14336 model.attention.head_dim=128 model.attention.num_heads=32 "
  "model.attention.num_kv_heads=8 model.moe.expert_d_ff=4096 model.dtype=bfloat16 model.param_dtype=bfloat16",
}


def held_out_prompts(cfg, count: int, length: int, need: int) -> list[list[int]]:
  """`count` prompts of `length` tokens from the run's held-out documents long enough to hold
  `need` tokens from the prompt's start, each beginning at a line start near the middle."""
  source = pipeline.open_sources(cfg.data, "eval")[0]
  newline = 10  # byte-level corpora; other tokenizers start wherever the middle falls
  prompts = []
  for i in np.argsort(-source.lengths, kind="stable"):  # the longest first: deterministic
    doc = np.asarray(source.documents[int(i)])[:-1]  # without the end-of-document token
    if len(doc) < 2 * need:
      break
    mid = len(doc) // 2
    lines = np.flatnonzero(doc[mid : len(doc) - need] == newline)
    start = mid + int(lines[0]) + 1 if len(lines) else mid
    prompts.append(list(map(int, doc[start : start + length])))
    if len(prompts) == count:
      return prompts
  raise SystemExit(f"benchmark: only {len(prompts)} held-out documents hold {2 * need} tokens; ask for fewer prompts")


def timed(fn, repeats: int):
  """fn() -> (tokens, SpecStats), `repeats` times (fn compiles apart from its own timing):
  the last tokens and stats, with the fastest wall time (on a shared machine the least
  disturbed run is the best estimate of the cost)."""
  runs = [fn() for _ in range(repeats)]
  tokens, stats = runs[-1]
  return tokens, stats, min(s.wall_s for _, s in runs)


def measure(model, prompts, batch, max_new, temperature, repeats, eos_id) -> dict:
  """Both decoders over `prompts` in batches of `batch`, summed over the batches."""
  settings = dict(temperature=temperature, eos_id=eos_id)
  total = {"plain_s": 0.0, "spec_s": 0.0, "plain_new": 0, "spec_new": 0, "decoded": 0, "passes": 0}
  accepted_K = np.zeros(model.mtp_depth)
  for i in range(0, len(prompts), batch):
    group = prompts[i : i + batch]
    plain, _, plain_s = timed(
      partial(speculative.plain_generate_with_stats, model, group, max_new, **settings), repeats
    )
    spec, stats, spec_s = timed(partial(speculative.speculative_generate, model, group, max_new, **settings), repeats)
    if temperature == 0.0 and spec != plain:
      raise SystemExit("benchmark: greedy speculative tokens differ from plain ones: a bug, please report it")
    total["plain_s"] += plain_s
    total["spec_s"] += spec_s
    total["plain_new"] += sum(map(len, plain))
    total["spec_new"] += stats.new_tokens
    total["decoded"] += stats.decoded_tokens
    total["passes"] += stats.forward_passes
    accepted_K += np.asarray(stats.acceptance) * stats.forward_passes
  plain_tps, spec_tps = total["plain_new"] / total["plain_s"], total["spec_new"] / total["spec_s"]
  passes = max(total["passes"], 1)
  return {
    "batch": batch,
    "prompts": len(prompts),
    "plain_tokens_per_s": plain_tps,
    "spec_tokens_per_s": spec_tps,
    "speedup": spec_tps / plain_tps,
    "acceptance": [float(a) / passes for a in accepted_K],
    "accepted_len": 1.0 + float(accepted_K.sum()) / passes,  # tokens per verification pass
    "passes_per_token": total["passes"] / max(total["decoded"], 1),
  }


def step_costs(model, prompts: list[list[int]], repeats: int, short: int = 5, long: int = 21) -> dict:
  """Seconds per plain decoding step and per speculative round at batch len(prompts), from the
  difference between a short and a long generation (the prefill and the call cancel out). No
  eos, so every round of a model that rejects drafts emits one token; the round count is read back."""

  def fastest(fn):
    return min(fn() for _ in range(repeats))

  def plain(n):
    return speculative.plain_generate_with_stats(model, prompts, n)[1].wall_s

  def spec(n):
    out, wall_s = speculative.run(model, prompts, n)
    return wall_s, int(out.rounds)

  for n in (short, long):  # compile
    plain(n), spec(n)
  step = (fastest(lambda: plain(long)) - fastest(lambda: plain(short))) / (long - short)
  (long_s, long_rounds), (short_s, short_rounds) = (min(spec(n) for _ in range(repeats)) for n in (long, short))
  rnd = (long_s - short_s) / max(long_rounds - short_rounds, 1)
  return {"step_s": step, "round_s": rnd, "round_over_step": rnd / step}


def scaled_model(config_yaml, overrides: str) -> Transformer:
  """The run's model settings at another size, randomly initialised (only its cost is used)."""
  cfg = config_lib.load(config_yaml, overrides.split())
  return decode.dropless(Transformer(cfg.model, rngs=nnx.Rngs(0)))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
  parser.add_argument("runs", nargs="+", metavar="RUN", help="checkpoints, as mtp-generate --checkpoint takes them")
  parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  parser.add_argument("--prompts", type=int, default=8, help="held-out prompts (a multiple of every batch size)")
  parser.add_argument("--prompt-len", type=int, default=48)
  parser.add_argument("--max-new-tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=0.0)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--scale", default="", help=f"overrides of a larger model whose step costs are measured, or one of {sorted(SCALES)}"
  )
  parser.add_argument("--json", metavar="FILE", help="also write every row here")
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  args.scale = SCALES.get(args.scale, args.scale)
  print(f"# {platform.node()} {jax.devices()[0].device_kind} jax {jax.__version__}; greedy={args.temperature == 0}")
  print(
    "| run | kind | depth | batch | plain tok/s | spec tok/s | speedup | accepted len | acceptance per position "
    "| round / step | round / step, scaled | accepted len / that |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  rows = []
  for run in args.runs:
    loaded = load(run)
    mtp = loaded.config.model.mtp
    prompts = held_out_prompts(loaded.config, args.prompts, args.prompt_len, args.prompt_len + args.max_new_tokens)
    costs = step_costs(loaded.model, prompts[:1], args.repeats)
    if args.scale:
      big = scaled_model(loaded.step_dir.parent.parent / "config.yaml", args.scale)
      scaled = {batch: step_costs(big, prompts[:batch], 3) for batch in batches}
    for batch in batches:
      row = measure(
        loaded.model, prompts, batch, args.max_new_tokens, args.temperature, args.repeats, loaded.config.model.eos_id
      )
      row.update(run=run, kind=mtp.kind, depth=mtp.depth, step=loaded.step, costs=costs)
      projected = " | "  # both columns empty without --scale
      if args.scale:
        row.update(scaled_costs=scaled[batch], scale=args.scale)
        ratio = scaled[batch]["round_over_step"]
        projected = f"{ratio:.2f} | {row['accepted_len'] / ratio:.2f}x"
      rows.append(row)
      acceptance = " ".join(f"{a:.2f}" for a in row["acceptance"])
      print(
        f"| {run} | {mtp.kind} | {mtp.depth} | {batch} | {row['plain_tokens_per_s']:.0f} | "
        f"{row['spec_tokens_per_s']:.0f} | {row['speedup']:.2f}x | {row['accepted_len']:.2f} | {acceptance} | "
        f"{costs['round_over_step']:.2f} | {projected} |",
        flush=True,
      )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
