"""The decoding cache: one attention cache per block and a length per row.

Slot s of every layer's cache holds position s. `length_B` is where each row writes next; the
new tokens of a call go to positions length .. length + T - 1, and a query at position p sees
slots 0..p. So rolling a row back past rejected draft tokens is only lowering its length: the
stale slots beyond are invisible to every later query and the next write overwrites them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Cache:
  layers: list  # per block: attention.GQACache | attention.MLACache, slots BxS...
  length_B: jax.Array  # int32: each row's next write position; slots from there on are stale


def allocate(layers: list, batch: int) -> Cache:
  """A cache of empty attention caches `layers` (`Transformer.empty_cache` for the trunk, or
  `Block.empty_cache` of each MTP block), every row at length 0."""
  return Cache(layers=layers, length_B=jnp.zeros((batch,), jnp.int32))


def positions(cache: Cache, new: int) -> jax.Array:
  """BxT: the positions `new` tokens written next take, row by row."""
  return cache.length_B[:, None] + jnp.arange(new, dtype=jnp.int32)[None]


def rollback(cache: Cache, length_B: jax.Array) -> Cache:
  """The cache as if only the first `length_B` positions of each row had been written."""
  return cache.replace(length_B=jnp.minimum(cache.length_B, length_B.astype(jnp.int32)))
