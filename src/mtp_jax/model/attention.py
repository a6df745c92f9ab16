"""Causal, segment-aware attention: grouped-query (GQA) and Multi-head Latent (MLA).

Both take an optional per-layer cache for decoding (`GQACache`, `MLACache`): the new keys are
written at their positions, the query attends over the whole cache through the caller's mask,
and the updated cache is returned beside the output. Which cached positions are valid is the
caller's business (`mtp_jax.generate.cache`), so rolling back a draft costs nothing here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mtp_jax import sharding
from mtp_jax.config import AttentionConfig, ModelConfig
from mtp_jax.model.layers import RMSNorm, rope, weight


def mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """BxLxS: key s is visible from query l iff s <= l and both lie in the same document.
  Packed documents are contiguous, so this never lets a token see across a boundary."""
  length = segment_ids_BxL.shape[1]
  causal_LxS = jnp.tril(jnp.ones((length, length), bool))
  same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal_LxS[None] & same_BxLxS


def attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, mask_BxLxS, scale: float, chunk_len: int = 0) -> jax.Array:
  """Softmax attention in float32; query heads are grouped over the G key/value heads.

  With `chunk_len`, queries go through in blocks of that many, each rematerialised, so the
  float32 scores exist for one block at a time (H x chunk_len x S, not H x L x S), forward and
  backward. Every block sees all keys, so the result is the same softmax, not an approximation.
  Block j holds queries j, j + n, j + 2n, ... (n blocks): strided rather than contiguous, so a
  sequence axis that shards L keeps sharding every block instead of being gathered."""
  b, length = q_BxLxHxK.shape[:2]
  if not chunk_len or chunk_len >= length:
    return _attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, mask_BxLxS, scale)
  n = length // chunk_len

  def blocks(x):  # BxLx... -> NxBxCx..., block j = positions j, j + n, ...
    return jnp.moveaxis(x.reshape(b, chunk_len, n, *x.shape[2:]), 2, 0)

  one = jax.checkpoint(lambda qm: _attend(qm[0], k_BxSxGxK, v_BxSxGxV, qm[1], scale))
  out_NxBxCxHxV = jax.lax.map(one, (blocks(q_BxLxHxK), blocks(mask_BxLxS)))
  return jnp.moveaxis(out_NxBxCxHxV, 0, 2).reshape(b, length, *out_NxBxCxHxV.shape[3:])


def _attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, mask_BxLxS, scale: float) -> jax.Array:
  b, l, h, kdim = q_BxLxHxK.shape
  g = k_BxSxGxK.shape[2]
  q_BxLxGxRxK = q_BxLxHxK.reshape(b, l, g, h // g, kdim)
  s = jnp.einsum("blgrk,bsgk->bgrls", q_BxLxGxRxK, k_BxSxGxK, preferred_element_type=jnp.float32)
  s = jnp.where(mask_BxLxS[:, None, None], s * scale, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v_BxSxGxV.dtype)
  out = jnp.einsum("bgrls,bsgv->blgrv", p, v_BxSxGxV)
  return out.reshape(b, l, h, v_BxSxGxV.shape[-1])


_ACT_HEADS = ("act_batch", "act_length", "act_heads", None)


@struct.dataclass
class GQACache:
  """One GQA layer's keys (after RoPE) and values, slot s holding position s."""

  k_BxSxGxK: jax.Array
  v_BxSxGxK: jax.Array


@struct.dataclass
class MLACache:
  """One MLA layer's normed key/value latent and decoupled RoPE key, slot s holding position s:
  what DeepSeek-V3 caches (§2.1.1), (R + rope dim) numbers per token instead of 2 H K."""

  ckv_BxSxR: jax.Array
  k_rope_BxSxK: jax.Array


def cached_mask(positions_BxL: jax.Array, max_len: int) -> jax.Array:
  """BxLxS: a query at position p sees cache slots 0..p. Slots past p may hold stale entries
  of a rolled-back draft; they stay invisible until overwritten."""
  return jnp.arange(max_len)[None, None, :] <= positions_BxL[:, :, None]


def _write(buf_BxSx_, new_BxLx_, positions_BxL):
  """buf with new[b, l] at slot positions[b, l] (each row at its own positions); positions past
  the buffer are dropped."""
  rows_Bx1 = jnp.arange(buf_BxSx_.shape[0])[:, None]
  return buf_BxSx_.at[rows_Bx1, positions_BxL].set(new_BxLx_.astype(buf_BxSx_.dtype), mode="drop")


class GQA(nnx.Module):
  """Grouped-query attention; with `qk_norm`, each query and key head is RMS-normed over its
  head_dim before RoPE (Qwen3), which bounds the attention logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, chunk_len: int = 0):
    a: AttentionConfig = cfg.attention
    d, std, pdt, dt = cfg.d_model, cfg.init_std, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.wq = weight(rngs, (d, a.num_heads, a.head_dim), ("embed", "heads", None), std, pdt)
    self.wk = weight(rngs, (d, a.num_kv_heads, a.head_dim), ("embed", "kv_heads", None), std, pdt)
    self.wv = weight(rngs, (d, a.num_kv_heads, a.head_dim), ("embed", "kv_heads", None), std, pdt)
    self.wo = weight(rngs, (a.num_heads, a.head_dim, d), ("heads", None, "embed"), std, pdt)
    if a.qk_norm:
      self.q_norm = RMSNorm(a.head_dim, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
      self.k_norm = RMSNorm(a.head_dim, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.qk_norm, self.theta, self.dtype, self.chunk_len = a.qk_norm, a.rope_theta, dt, chunk_len
    self.kv_shape = (a.num_kv_heads, a.head_dim)

  def empty_cache(self, batch: int, max_len: int) -> GQACache:
    zeros = jnp.zeros((batch, max_len, *self.kv_shape), self.dtype)
    return GQACache(k_BxSxGxK=zeros, v_BxSxGxK=zeros)

  def __call__(self, x_BxLxD, mask_BxLxS, positions_BxL, cache: GQACache | None = None):
    """The output, or (output, cache) given a cache: then mask_BxLxS covers its S slots."""
    dt = self.dtype
    q = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wq[...].astype(dt))
    k = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wk[...].astype(dt))
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q, positions_BxL, self.theta), rope(k, positions_BxL, self.theta)
    v = jnp.einsum("bld,dgk->blgk", x_BxLxD, self.wv[...].astype(dt))
    q = sharding.constrain(q, _ACT_HEADS)
    chunk_len = self.chunk_len
    if cache is not None:  # a few new queries over the whole cache: no chunking
      cache = GQACache(
        k_BxSxGxK=_write(cache.k_BxSxGxK, k, positions_BxL), v_BxSxGxK=_write(cache.v_BxSxGxK, v, positions_BxL)
      )
      k, v, chunk_len = cache.k_BxSxGxK, cache.v_BxSxGxK, 0
    out_BxLxHxK = attend(q, k, v, mask_BxLxS, q.shape[-1] ** -0.5, chunk_len)
    out = jnp.einsum("blhk,hkd->bld", out_BxLxHxK, self.wo[...].astype(dt))
    return out if cache is None else (out, cache)


class MLA(nnx.Module):
  """Multi-head Latent Attention (DeepSeek-V3 §2.1.1): low-rank query and key/value
  projections, each latent RMS-normed; a decoupled RoPE key shared by all heads."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, chunk_len: int = 0):
    a: AttentionConfig = cfg.attention
    d, std, pdt, dt = cfg.d_model, cfg.init_std, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    h, nope, rdim = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim
    if a.q_lora_rank:
      self.wq_a = weight(rngs, (d, a.q_lora_rank), ("embed", None), std, pdt)
      self.q_norm = RMSNorm(a.q_lora_rank, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
      self.wq_b = weight(rngs, (a.q_lora_rank, h, nope + rdim), ("q_lora", "heads", None), std, pdt)
    else:
      self.wq = weight(rngs, (d, h, nope + rdim), ("embed", "heads", None), std, pdt)
    self.wkv_a = weight(rngs, (d, a.kv_lora_rank + rdim), ("embed", None), std, pdt)
    self.kv_norm = RMSNorm(a.kv_lora_rank, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.wkv_b = weight(rngs, (a.kv_lora_rank, h, nope + a.v_head_dim), ("kv_lora", "heads", None), std, pdt)
    self.wo = weight(rngs, (h, a.v_head_dim, d), ("heads", None, "embed"), std, pdt)
    self.q_lora_rank, self.kv_lora_rank, self.nope = a.q_lora_rank, a.kv_lora_rank, nope
    self.theta, self.dtype, self.chunk_len = a.rope_theta, dt, chunk_len
    self.rope_dim = rdim

  def empty_cache(self, batch: int, max_len: int) -> MLACache:
    return MLACache(
      ckv_BxSxR=jnp.zeros((batch, max_len, self.kv_lora_rank), self.dtype),
      k_rope_BxSxK=jnp.zeros((batch, max_len, self.rope_dim), self.dtype),
    )

  def __call__(self, x_BxLxD, mask_BxLxS, positions_BxL, cache: MLACache | None = None):
    """The output, or (output, cache) given a cache: then mask_BxLxS covers its S slots.
    Decoding up-projects the whole cached latent with W_kv_b every call, the same maths as
    training (so cached logits match the full forward); absorbing W_kv_b into the query and
    output would be cheaper per step but reorders the float sums."""
    dt, nope = self.dtype, self.nope
    if self.q_lora_rank:
      cq_BxLxR = self.q_norm(jnp.einsum("bld,dr->blr", x_BxLxD, self.wq_a[...].astype(dt)))
      q = jnp.einsum("blr,rhk->blhk", cq_BxLxR, self.wq_b[...].astype(dt))
    else:
      q = jnp.einsum("bld,dhk->blhk", x_BxLxD, self.wq[...].astype(dt))
    q = jnp.concatenate([q[..., :nope], rope(q[..., nope:], positions_BxL, self.theta)], axis=-1)
    kv_a = jnp.einsum("bld,dr->blr", x_BxLxD, self.wkv_a[...].astype(dt))
    ckv_BxLxR = self.kv_norm(kv_a[..., : self.kv_lora_rank])
    k_rope_BxLx1xK = rope(kv_a[..., None, self.kv_lora_rank :], positions_BxL, self.theta)
    chunk_len = self.chunk_len
    if cache is not None:  # a few new queries over the whole cache: no chunking
      cache = MLACache(
        ckv_BxSxR=_write(cache.ckv_BxSxR, ckv_BxLxR, positions_BxL),
        k_rope_BxSxK=_write(cache.k_rope_BxSxK, k_rope_BxLx1xK[:, :, 0], positions_BxL),
      )
      ckv_BxLxR, k_rope_BxLx1xK, chunk_len = cache.ckv_BxSxR, cache.k_rope_BxSxK[:, :, None], 0
    kv = jnp.einsum("blr,rhk->blhk", ckv_BxLxR, self.wkv_b[...].astype(dt))
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope_BxLx1xK, (*k_nope.shape[:3], k_rope_BxLx1xK.shape[-1]))], -1)
    q = sharding.constrain(q, _ACT_HEADS)
    out_BxLxHxV = attend(q, k, v, mask_BxLxS, q.shape[-1] ** -0.5, chunk_len)
    out = jnp.einsum("blhv,hvd->bld", out_BxLxHxV, self.wo[...].astype(dt))
    return out if cache is None else (out, cache)


def make(cfg: ModelConfig, *, rngs: nnx.Rngs, chunk_len: int = 0) -> GQA | MLA:
  return {"gqa": GQA, "mla": MLA}[cfg.attention.kind](cfg, rngs=rngs, chunk_len=chunk_len)
