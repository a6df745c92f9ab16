"""Cached forward passes and autoregressive generation.

`prefill` and `step` are pure functions of (model, tokens, cache), to be called under jax.jit;
they run only the trunk, in the model's own numerics (float32 models match the uncached
forward to float rounding). Their MoE layers route dropless: capacity mode sizes its expert
buffers from the number of tokens in the call, so a one-token step would drop (or keep)
different token-slots than the training-time forward over the whole sequence did; dropless is
what that forward computes whenever nothing overflowed. The aux-loss-free router bias is used
as trained: it steers which experts are chosen, exactly as in the forward pass.

On a GPU, `generate` and the speculative rounds hold the weights in the compute dtype, cast
once when the call starts, and the trunk a block at a time, sliced out of its stacks in the
same pass (`for_steps`, `in_compute_dtype`, `Transformer.unstack`): the same numbers as casting
at every use, and a bfloat16 step from float32 parameters then reads its weights once, at half
the width, with no converted or sliced copies written at every step (small.yaml's decoding loop
compiled for an H200: 4.14 GiB a step against 20.9; benchmarks/RESULTS.md). That copy sits
beside the caller's parameters for the call. `mtp-generate` loads the weights already held so
(`load.held`: cast, and on GPUs and TPUs a block at a time), each block read into its own
array, and then holds no other copy.

MLA layers run `step` absorbed (`model.attention.absorb`, the default): attending over the
cached latent instead of up-projecting all of it for every new token. `prefill` up-projects, as
training does (`absorbing`).

Shape letters beyond the package legend (model/__init__.py): P prompt slots · T tokens a call
reads per row · N new tokens per row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import sharding
from mtp_jax.generate import cache as cache_lib
from mtp_jax.generate.cache import Cache
from mtp_jax.generate.sample import sample
from mtp_jax.model import Transformer
from mtp_jax.model.attention import MLA
from mtp_jax.model.moe import MoE


def dropless(model: Transformer) -> Transformer:
  """The model, or a copy sharing its arrays whose MoE layers route dropless (see above): every
  one in its graph, stacked, MTP or held a block at a time (`Transformer.unstack`)."""
  if all(m.cfg.mode == "dropless" for _, m in nnx.iter_graph(model) if isinstance(m, MoE)):
    return model
  model = nnx.merge(*nnx.split(model))
  for _, m in nnx.iter_graph(model):
    if isinstance(m, MoE):
      m.cfg = m.cfg.model_copy(update={"mode": "dropless"})
  return model


def in_compute_dtype(model: Transformer) -> Transformer:
  """The model, or a copy whose weights read only through `.astype(compute dtype)`
  (`layers.weight`'s `cast_at_use`) are stored in the compute dtype. A decoding step is bound by
  reading its weights, and float32 weights with bfloat16 compute are otherwise read at 4 bytes
  and converted on every step. The numbers are the same: casting once is casting at each use.
  Norm scales and the router's kernel keep their dtype (they are read in float32), and so does
  the router's bias."""
  graphdef, state = nnx.split(model)
  narrow = jnp.dtype(model.dtype)

  def wide(v) -> bool:
    return bool(v.get_metadata().get("cast_at_use")) and v.get_value().dtype != narrow

  def variable(x) -> bool:
    return isinstance(x, nnx.Variable)

  if not any(map(wide, jax.tree.leaves(state, is_leaf=variable))):
    return model
  state = jax.tree.map(lambda v: v.replace(v.get_value().astype(narrow)) if wide(v) else v, state, is_leaf=variable)
  return nnx.merge(graphdef, state)


def for_steps(model: Transformer) -> Transformer:
  """What a decoding loop steps with. On GPUs a copy cast to the compute dtype
  (`in_compute_dtype`) that stores its trunk a block at a time (`Transformer.unstack`), cast and
  sliced in one pass before the loop: XLA:GPU would otherwise convert float32 weights inside the
  loop, at every step, and slice each layer's weights out of their stacks again at every step.
  From float32 parameters the slices are the cast's copy; from parameters stored in the compute
  dtype they are a second copy of the trunk's weights, held while decoding, and from a model
  already held so (`load.held`) no copy. Elsewhere the model itself: XLA:CPU widens bfloat16
  matmul operands to float32 anyway, and XLA:TPU already hoists the conversion and slices out
  of the loop (weights held cast but stacked made it slice an expert stack anew every step; a
  copy made here holds 1 GiB more for small.yaml on a v5p chip than XLA's own, for the same
  traffic). benchmarks/RESULTS.md, 2026-12-07 (eighth, ninth)."""
  return in_compute_dtype(model).unstack() if sharding.platform() == "gpu" else model


def absorbing(model: Transformer, on: bool) -> Transformer:
  """The model, or a copy sharing its arrays, whose MLA layers attend over their cached latent
  with W_uk and W_uv folded into the query and output (`on`, `attention.absorbed_attend`) or
  up-project the whole cache (`model.attention.absorb` picks the model's own). The prefill
  runs with it off: there the new tokens are about as many as the slots, so up-projecting the
  slots once costs less than attending over R-wide latents, and the prefill stays the training
  forward's maths."""
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, MLA)]
  if all(m.absorb == on for m in layers):
    return model
  model = nnx.merge(*nnx.split(model))
  for _, m in nnx.iter_graph(model):
    if isinstance(m, MLA):
      m.absorb = on
  return model


def step(model: Transformer, tokens_BxT: jax.Array, cache: Cache) -> tuple[jax.Array, jax.Array, Cache]:
  """(logits_BxTxV, hidden_BxTxD, cache): T new tokens of each row, written at its length on.
  All T positions are returned: speculative verification scores every draft token, and the
  MTP heads read the final-normed hidden states."""
  model = dropless(model)
  positions_BxT = cache_lib.positions(cache, tokens_BxT.shape[1])
  hidden_BxTxD, layers, _ = model.decode(tokens_BxT, positions_BxT, cache.layers)
  cache = Cache(layers=layers, length_B=cache.length_B + tokens_BxT.shape[1])
  return model.logits(hidden_BxTxD), hidden_BxTxD, cache


def prefill(
  model: Transformer, tokens_BxP: jax.Array, prompt_lengths_B: jax.Array, cache: Cache
) -> tuple[jax.Array, jax.Array, Cache]:
  """(logits_BxV at each row's last prompt token, hidden_BxPxD, cache) for right-padded
  prompts. The padding is written too, then left stale: each row's length ends after its
  prompt, so its first new token overwrites the padding's slots. MLA layers up-project their
  cache here, absorbed or not (see `absorbing`)."""
  model = absorbing(dropless(model), False)
  positions_BxP = cache_lib.positions(cache, tokens_BxP.shape[1])
  hidden_BxPxD, layers, _ = model.decode(tokens_BxP, positions_BxP, cache.layers)
  cache = Cache(layers=layers, length_B=cache.length_B + prompt_lengths_B.astype(jnp.int32))
  last_Bx1xD = jnp.take_along_axis(hidden_BxPxD, (prompt_lengths_B - 1)[:, None, None], axis=1)
  return model.logits(last_Bx1xD)[:, 0], hidden_BxPxD, cache


def generate(
  model: Transformer,
  prompts: list[list[int]],
  max_new_tokens: int,
  *,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_id: int | None = None,
) -> list[list[int]]:
  """The new tokens of each prompt: up to max_new_tokens, ending at the first eos_id (kept).
  Greedy at temperature 0. One compiled program per (batch, longest prompt, max_new_tokens)
  and sampling settings; the cache holds longest prompt + max_new_tokens positions."""
  tokens_BxP, lengths_B = pad_prompts(prompts, max_new_tokens)
  graphdef, state = nnx.split(dropless(model))
  stop = np.int32(-1 if eos_id is None else eos_id)  # an argument, so eos_id costs no recompile
  settings = dict(max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p))
  out_BxN = np.asarray(_generate(graphdef, state, tokens_BxP, lengths_B, stop, jax.random.key(seed), **settings))
  rows = [list(map(int, row)) for row in out_BxN]
  return [row[: row.index(eos_id) + 1] if eos_id in row else row for row in rows]


def pad_prompts(prompts: list[list[int]], max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(right-padded tokens_BxP, lengths_B), or a ValueError for an empty prompt or max_new_tokens < 1."""
  lengths = [len(p) for p in prompts]
  if not prompts or min(lengths) == 0 or max_new_tokens < 1:
    raise ValueError("generate needs non-empty prompts and max_new_tokens >= 1")
  tokens_BxP = np.zeros((len(prompts), max(lengths)), np.int32)
  for row, prompt in zip(tokens_BxP, prompts, strict=True):
    row[: len(prompt)] = prompt
  return tokens_BxP, np.asarray(lengths, np.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_p"))
def _generate(graphdef, state, tokens_BxP, lengths_B, stop, key, *, max_new_tokens, temperature, top_p):
  """BxN new tokens; a row that has produced `stop` (eos, or -1: none) repeats it. Stops early
  once all rows have."""
  model = for_steps(nnx.merge(graphdef, state))  # on GPUs cast once, not at every step
  b, p = tokens_BxP.shape
  cache = cache_lib.allocate(model.empty_cache(b, p + max_new_tokens), b)
  logits_BxV, _, cache = prefill(model, tokens_BxP, lengths_B, cache)

  def pick(i, logits_BxV, done_B):
    token_B = sample(logits_BxV, jax.random.fold_in(key, i), temperature, top_p)
    return jnp.where(done_B, stop, token_B)

  token_B = pick(0, logits_BxV, jnp.zeros((b,), bool))
  out_BxN = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(token_B)

  def more(carry):
    i, token_B, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(token_B == stop)

  def one(carry):
    i, token_B, cache, out_BxN = carry
    logits_Bx1xV, _, cache = step(model, token_B[:, None], cache)
    token_B = pick(i, logits_Bx1xV[:, 0], token_B == stop)
    return i + 1, token_B, cache, out_BxN.at[:, i].set(token_B)

  _, _, _, out_BxN = jax.lax.while_loop(more, one, (1, token_B, cache, out_BxN))
  return out_BxN
