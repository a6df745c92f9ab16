"""Building blocks: parameters with logical axes, RMSNorm, RoPE, embedding, SwiGLU."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax import sharding


def weight(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], std: float, dtype: jnp.dtype) -> nnx.Param:
  """A normally-initialised weight carrying its logical axis names."""
  return nnx.Param(std * jax.random.normal(_next_key(rngs.params), tuple(shape), dtype), axes=tuple(axes))


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


def rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, rotate-half layout (the first and second halves form the pairs)."""
  half = x_BxLxHxK.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLxK = positions_BxL[..., None].astype(jnp.float32) * freq[None, None]
  sin, cos = jnp.sin(angle_BxLxK)[:, :, None], jnp.cos(angle_BxLxK)[:, :, None]
  x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxHxK.dtype)


class Embed(nnx.Module):
  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float, dtype, param_dtype):
    self.table = weight(rngs, (vocab, dim), ("vocab", "embed"), std, param_dtype)
    self.dtype = dtype

  def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
    x_BxLxD = jnp.take(self.table[...], tokens_BxL, axis=0).astype(self.dtype)
    return sharding.constrain(x_BxLxD, ("act_batch", "act_length", "act_embed"))


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(x gate) * (x up))."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float, dtype, param_dtype):
    self.w_gate = weight(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
    self.w_up = weight(rngs, (dim, hidden), ("embed", "mlp"), std, param_dtype)
    self.w_down = weight(rngs, (hidden, dim), ("mlp", "embed"), std, param_dtype)
    self.dtype = dtype

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt = self.dtype
    gate_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_gate[...].astype(dt))
    up_BxLxF = jnp.einsum("bld,df->blf", x_BxLxD, self.w_up[...].astype(dt))
    h_BxLxF = sharding.constrain(jax.nn.silu(gate_BxLxF) * up_BxLxF, ("act_batch", "act_length", "act_mlp"))
    return jnp.einsum("blf,fd->bld", h_BxLxF, self.w_down[...].astype(dt))
