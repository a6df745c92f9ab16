"""Choosing the next token from logits: greedy, temperature, top-p (nucleus).

`filtered_probs` is kept apart from `sample` because speculative rejection sampling compares
the target's and the draft's filtered distributions, not their raw softmaxes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def filtered_probs(logits_BxV: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
  """softmax(logits / temperature) restricted to the nucleus, the smallest set of most likely
  tokens whose probability reaches top_p (Holtzman et al. 2020), renormalised."""
  probs_BxV = jax.nn.softmax(logits_BxV.astype(jnp.float32) / temperature, axis=-1)
  if top_p >= 1.0:
    return probs_BxV
  order_BxV = jnp.argsort(-probs_BxV, axis=-1, stable=True)
  sorted_BxV = jnp.take_along_axis(probs_BxV, order_BxV, axis=-1)
  # A token is in the nucleus iff the more likely ones before it have not yet reached top_p.
  keep_sorted_BxV = jnp.cumsum(sorted_BxV, axis=-1) - sorted_BxV < top_p
  rows_Bx1 = jnp.arange(probs_BxV.shape[0])[:, None]
  keep_BxV = jnp.zeros_like(keep_sorted_BxV).at[rows_Bx1, order_BxV].set(keep_sorted_BxV)
  kept_BxV = jnp.where(keep_BxV, probs_BxV, 0.0)
  return kept_BxV / kept_BxV.sum(-1, keepdims=True)


def sample(logits_BxV: jax.Array, key: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
  """B token ids: the argmax at temperature 0, else a draw from `filtered_probs`."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  probs_BxV = filtered_probs(logits_BxV, temperature, top_p)
  return jax.random.categorical(key, jnp.log(probs_BxV), axis=-1).astype(jnp.int32)
