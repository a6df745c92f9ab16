"""Decoding MLA absorbed against up-projecting the cached latent: FLOPs at DeepSeek-V3's shapes, and CPU speed.

  python benchmarks/decode_flops.py [--config configs/deepseek-v3-671b.yaml] [--contexts 1024,4096] \
      [--speed-contexts 128,1024] [--batch 1] [--new-tokens 8,72] [--repeats 5]

FLOPs: one MLA layer's attention matmuls for one new token over a cache of S slots, counted
from the config's shapes (2 FLOPs per multiply-add): the query and key/value down-projections,
then either the up-projection of all S cached latents through W_kv_b and attention over the
up-projected heads, or (absorbed) W_uk folded into the query, attention over the R + rope wide
latent, and W_uv folded into the output; then W_o. Each total is checked against the matmuls of
the layer itself, traced at those shapes (`flops.traced_matmul_flops`; nothing is run).

Speed: greedy plain and self-speculative decoding (`decode.generate`, `speculative.run`, the
library `mtp-generate` calls) of a tiny MLA model with random weights: configs/tiny.yaml with
MLA attention (the default MLA sizes) and its one sequential MTP module, batch `--batch`, at each
context: prompts of context - the longer `--new-tokens`, so the cache holds the context. A
decoding step's cost is the difference between generating the two `--new-tokens` counts, over
the tokens between them (the prefill and the call's fixed costs cancel); each run is compiled
first and timed `--repeats` times, fastest kept, absorbed and not alternately.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import config as config_lib
from mtp_jax.generate import decode, speculative
from mtp_jax.model import Transformer, attention, flops

TINY_MLA = ["model.attention.kind=mla"]
ROWS = (  # the parts of `attention_flops`, in the order they run
  "query projections",
  "key/value down-projection",
  "up-projection of the cache",
  "W_uk into the query",
  "scores",
  "values",
  "W_uv into the output",
  "output projection",
)


def attention_flops(a: config_lib.AttentionConfig, d: int, s: int, absorbed: bool) -> dict[str, float]:
  """Matmul FLOPs of one MLA layer's attention for one new token over `s` cache slots, by part."""
  h, r, nope, rd, v = a.num_heads, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
  q_rank = a.q_lora_rank
  q = 2 * d * q_rank + 2 * q_rank * h * (nope + rd) if q_rank else 2 * d * h * (nope + rd)
  parts = {"query projections": q, "key/value down-projection": 2 * d * (r + rd)}
  if absorbed:
    parts["W_uk into the query"] = 2 * h * nope * r
    parts["scores"] = 2 * h * s * (r + rd)
    parts["values"] = 2 * h * s * r
    parts["W_uv into the output"] = 2 * h * r * v
  else:
    parts["up-projection of the cache"] = 2 * s * r * h * (nope + v)
    parts["scores"] = 2 * h * s * (nope + rd)
    parts["values"] = 2 * h * s * v
  parts["output projection"] = 2 * h * v * d
  return {k: float(x) for k, x in parts.items()}


def traced_flops(cfg: config_lib.ModelConfig, s: int, absorbed: bool) -> float:
  """The matmul FLOPs of `MLA.__call__` with a cache of `s` slots and one new token, traced."""
  layer = nnx.eval_shape(lambda: attention.MLA(cfg, rngs=nnx.Rngs(0)))
  layer.absorb = absorbed
  graphdef, state = nnx.split(layer)
  dt = jnp.dtype(cfg.dtype)
  cache = jax.eval_shape(lambda: layer.empty_cache(1, s))

  def one(state, x_1x1xD, positions_1x1, cache):
    mask_1x1xS = attention.cached_mask(positions_1x1, s)
    return nnx.merge(graphdef, state)(x_1x1xD, mask_1x1xS, positions_1x1, cache)

  x = jax.ShapeDtypeStruct((1, 1, cfg.d_model), dt)
  traced = jax.jit(one).trace(state, x, jax.ShapeDtypeStruct((1, 1), jnp.int32), cache)
  return flops.traced_matmul_flops(traced.jaxpr, 1)


def flops_table(cfg: config_lib.ModelConfig, contexts: list[int]) -> None:
  a = cfg.attention
  print(
    f"\n## Attention FLOPs per new token per layer: H={a.num_heads}, R={a.kv_lora_rank}, q rank {a.q_lora_rank}, "
    f"nope {a.qk_nope_head_dim}, rope {a.qk_rope_head_dim}, v {a.v_head_dim}, D={cfg.d_model} (GFLOP)\n"
  )
  cols = [(s, absorbed) for s in contexts for absorbed in (False, True)]
  print("| part | " + " | ".join(f"{s:,}, {'absorbed' if ab else 'up-projected'}" for s, ab in cols) + " |")
  print("|---|" + "---|" * len(cols))
  tables = [attention_flops(a, cfg.d_model, s, ab) for s, ab in cols]
  for part in ROWS:
    print(f"| {part} | " + " | ".join(f"{t[part] / 1e9:.4f}" if part in t else "-" for t in tables) + " |")
  totals = [sum(t.values()) for t in tables]
  traced = [traced_flops(cfg, s, ab) for s, ab in cols]
  print("| **total** | " + " | ".join(f"**{x / 1e9:.3f}**" for x in totals) + " |")
  print("| traced layer (check) | " + " | ".join(f"{x / 1e9:.3f}" for x in traced) + " |")
  for (s, _), up, ab in zip(cols[::2], totals[::2], totals[1::2], strict=True):
    print(f"context {s:,}: up-projected / absorbed = {up / ab:.1f}x")
  if any(abs(t - x) > 1e-6 * x for t, x in zip(traced, totals, strict=True)):
    raise SystemExit("benchmark: the formula and the traced layer disagree: fix the formula")


def decode_seconds(model, prompts: list[list[int]], new: int, kind: str) -> float:
  """Seconds to generate `new` tokens of each prompt, compiled beforehand (execution as
  `speculative.run` measures it; for plain decoding, the call)."""
  if kind == "speculative":
    return speculative.run(model, prompts, new)[1]
  start = time.perf_counter()
  decode.generate(model, prompts, new)  # returns host lists: done
  return time.perf_counter() - start


def greedy_tokens(model, prompts: list[list[int]], new: int, kind: str) -> list[list[int]]:
  if kind == "speculative":
    return speculative.speculative_generate(model, prompts, new)[0]
  return decode.generate(model, prompts, new)


def speed_table(contexts: list[int], batch: int, new: tuple[int, int], repeats: int) -> None:
  cfg = config_lib.load("configs/tiny.yaml", TINY_MLA).model
  a = cfg.attention
  model = decode.dropless(Transformer(cfg, rngs=nnx.Rngs(0)))
  models = {"up-projected": decode.absorbing(model, False), "absorbed": decode.absorbing(model, True)}
  print(
    f"\n## Decoding tokens/s, tiny MLA model (configs/tiny.yaml, {cfg.num_layers} layers, D={cfg.d_model}, "
    f"H={a.num_heads}, R={a.kv_lora_rank}, nope {a.qk_nope_head_dim}, rope {a.qk_rope_head_dim}, "
    f"v {a.v_head_dim}; sequential MTP depth {cfg.mtp.depth}; random weights), batch {batch}, greedy\n"
  )
  print("| context | decoding | up-projected tok/s | absorbed tok/s | absorbed / up-projected | drafts accepted |")
  print("|---|---|---|---|---|---|")
  rng = np.random.default_rng(0)
  short, long = new
  for context in contexts:
    prompts = [list(map(int, rng.integers(0, cfg.vocab_size, context - long))) for _ in range(batch)]
    for kind in ("plain", "speculative"):
      tokens = {name: greedy_tokens(m, prompts, long, kind) for name, m in models.items()}  # compiles `long`
      if tokens["absorbed"] != tokens["up-projected"]:
        raise SystemExit("benchmark: absorbed greedy tokens differ from up-projected ones: a bug, please report it")
      best = {(name, n): float("inf") for name in models for n in (short, long)}
      for m in models.values():
        decode_seconds(m, prompts, short, kind)  # compiles `short`
      for _ in range(repeats):  # alternately, so a busy moment of the machine hits both alike
        for (name, n), t in best.items():
          best[name, n] = min(t, decode_seconds(models[name], prompts, n, kind))
      rate = {name: batch * (long - short) / (best[name, long] - best[name, short]) for name in models}
      accepted = ""
      if kind == "speculative":
        stats = speculative.speculative_generate(models["absorbed"], prompts, long)[1]
        accepted = f"{stats.acceptance[0]:.2f}"
      up, ab = rate["up-projected"], rate["absorbed"]
      print(f"| {context:,} | {kind} | {up:,.0f} | {ab:,.0f} | {ab / up:.2f}x | {accepted} |", flush=True)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="benchmark", description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/deepseek-v3-671b.yaml", help="the shapes FLOPs are counted at")
  parser.add_argument("--contexts", default="1024,4096", help="cache slots the FLOPs are counted for")
  parser.add_argument("--speed-contexts", default="128,1024", help="contexts decoding is timed at ('' to skip)")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--new-tokens", default="8,72", help="the two generation lengths whose difference is timed")
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  print(f"# {platform.node()} {jax.devices()[0].device_kind} jax {jax.__version__}")
  flops_table(config_lib.load(args.config, []).model, [int(s) for s in args.contexts.split(",")])
  if args.speed_contexts:
    short, long = (int(n) for n in args.new_tokens.split(","))
    speed_table([int(c) for c in args.speed_contexts.split(",")], args.batch, (short, long), args.repeats)
  return 0


if __name__ == "__main__":
  sys.exit(main())
