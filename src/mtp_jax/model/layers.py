"""Building blocks: parameters with logical axes, RMSNorm, RoPE, embedding, SwiGLU.

Shape letters beyond the package legend (model/__init__.py): K per-head dimension.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import sharding
from mtp_jax.config import RopeScaling

ACT = ("act_batch", "act_length", "act_embed")  # a B x L x D activation's axes


def weight(
  rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float, dtype: jnp.dtype, cast_at_use=True
) -> nnx.Param:
  """A normally-initialised weight carrying its logical axis names. `cast_at_use`: every use
  reads it as `.astype(compute dtype)`, so decoding may store it in that dtype once
  (`decode.in_compute_dtype`); False for one read at its own precision (the router's)."""
  init = std * jax.random.normal(_next_key(rngs.params), tuple(shape), dtype)
  return nnx.Param(init, axes=tuple(axes), cast_at_use=cast_at_use)


def bias(shape: Sequence[int], axes: Sequence[str | None], dtype: jnp.dtype) -> nnx.Param:
  """A zero-initialised bias carrying its logical axis names, left out of weight decay, read as
  `weight`'s are (`cast_at_use`)."""
  return nnx.Param(jnp.zeros(tuple(shape), dtype), axes=tuple(axes), decay=False, cast_at_use=True)


def _next_key(stream: nnx.RngStream) -> jax.Array:
  """`stream()`'s key (the same fold_in of its count), its count stored whole: under a trace
  (`eval_shape`) flax 0.12.8's indexed store asks the tracer for its sharding, which on jax 0.10
  builds an error message by walking the whole program so far, about 10 ms a weight for 671B."""
  count = stream.count.get_value()
  stream.count.set_value(count + 1)
  return jax.random.fold_in(stream.key.get_value(), count)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
    self.eps, self.dtype = eps, dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
    return (x32 * scale).astype(self.dtype)


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary embedding over `dim` dimensions: base `theta`, and YaRN (`scaling`, Peng et al. 2023,
  as Hugging Face's `rope_scaling` computes it) where set."""

  dim: int
  theta: float
  scaling: RopeScaling | None = None

  def frequencies(self):
    """(inverse frequencies, dim / 2 of them, float32; the factor on cos and sin)."""
    half = self.dim // 2
    if self.scaling is None:
      return self.theta ** (-jnp.arange(half, dtype=jnp.float32) / half), 1.0
    return yarn(self.dim, self.theta, self.scaling)

  def __call__(self, x_BxLxHxK: jax.Array, positions_BxL: jax.Array) -> jax.Array:
    """Rotate-half layout: the first and second halves of the last axis form the pairs."""
    freq, factor = self.frequencies()
    angle_BxLxK = positions_BxL[..., None].astype(jnp.float32) * freq[None, None]
    sin, cos = jnp.sin(angle_BxLxK)[:, :, None], jnp.cos(angle_BxLxK)[:, :, None]
    if factor != 1.0:
      sin, cos = sin * factor, cos * factor
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxHxK.dtype)


def yarn(dim: int, theta: float, s: RopeScaling) -> tuple[np.ndarray, float]:
  """YaRN's frequencies: each dimension pair's between its own (rotating more than `beta_fast`
  times over the original context: extrapolated) and `factor` times slower (fewer than
  `beta_slow`: interpolated), a linear ramp between; and the cos/sin factor, 1 when both
  `mscale` and `mscale_all_dim` are set (DeepSeek-V3 then scales the softmax instead:
  `softmax_mscale`)."""
  half = dim // 2

  def boundary(rotations: float) -> float:  # the dimension that rotates this many times
    return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(theta))

  low, high = boundary(s.beta_fast), boundary(s.beta_slow)
  if s.truncate:
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  ramp = np.clip((np.arange(half, dtype=np.float32) - low) / ((high - low) or 0.001), 0, 1)
  own = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
  freq = own / s.factor * ramp + own * (1 - ramp)
  if s.mscale and s.mscale_all_dim:
    factor = _mscale(s.factor, s.mscale) / _mscale(s.factor, s.mscale_all_dim)
  else:
    factor = _mscale(s.factor, 1.0)
  return freq.astype(np.float32), factor


def softmax_mscale(s: RopeScaling | None) -> float:
  """DeepSeek-V3's correction to MLA's softmax scale under YaRN: mscale(factor, mscale_all_dim)^2."""
  if s is None or not s.mscale_all_dim:
    return 1.0
  return _mscale(s.factor, s.mscale_all_dim) ** 2


def _mscale(factor: float, mscale: float) -> float:
  return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float, dtype, param_dtype):
    self.table = weight(rngs, (vocab, dim), ("vocab", "embed"), std, param_dtype)
    self.dtype = dtype

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    table_VxD = self.table[...]
    # Each device looks up its slice of D for its group's tokens, where the table lies.
    tokens_at, *rows_at = sharding.lookup_layout(table_VxD.shape, tokens_BxL.shape) or [None]
    if tokens_at:
      tokens_BxL = jax.lax.with_sharding_constraint(tokens_BxL, tokens_at)
    x_BxLxD = jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype)
    for layout in rows_at:
      x_BxLxD = jax.lax.with_sharding_constraint(x_BxLxD, layout)
    return sharding.constrain(x_BxLxD, ACT)


_IN, _OUT, _HIDDEN = ("embed", "mlp"), ("mlp", "embed"), ("act_batch", "act_length", "act_mlp")  # MLP's


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(x gate) * (x up))."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float, dtype, param_dtype):
    self.w_gate = weight(rngs, (dim, hidden), _IN, std, param_dtype)
    self.w_up = weight(rngs, (dim, hidden), _IN, std, param_dtype)
    self.w_down = weight(rngs, (hidden, dim), _OUT, std, param_dtype)
    self.dtype = dtype

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt = self.dtype
    gate_BxLxF = sharding.fsdp_einsum("bld,df->blf", x_BxLxD, ACT, self.w_gate[...].astype(dt), _IN)
    up_BxLxF = sharding.fsdp_einsum("bld,df->blf", x_BxLxD, ACT, self.w_up[...].astype(dt), _IN)
    h_BxLxF = sharding.constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, _HIDDEN)
    return sharding.fsdp_einsum("blf,fd->bld", h_BxLxF, _HIDDEN, self.w_down[...].astype(dt), _OUT)
