"""Multi-token prediction, both published forms. See MTP.md beside this file.

`sequential` (DeepSeek-V3 §2.2): module k mixes RMSNorm(Emb(t_{i+k})) with RMSNorm of the
previous depth's hidden state, projects 2D -> D (eq. 21), runs one block (eq. 22) and
predicts t_{i+k+1} through its own norm and the shared head (eq. 23).
`parallel` (Gloeckle et al. 2024): extra one-block heads branching from the trunk before its
last block; extra head i predicts t_{i+1+i}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax import sharding
from mtp_jax.config import ModelConfig
from mtp_jax.model.layers import ACT, RMSNorm, weight


def shift_left(x_BxL: jax.Array, k: int, fill: int = 0) -> jax.Array:
  """x[:, t + k] at position t; positions past the end get `fill`."""
  if k == 0:
    return x_BxL
  pad = jnp.full((x_BxL.shape[0], k), fill, x_BxL.dtype)
  return jnp.concatenate([x_BxL[:, k:], pad], axis=1)


_EH = (None, "embed")  # eh_proj's axes: 2D x D


class SequentialModule(nnx.Module):
  """One DeepSeek-V3 MTP module; field names follow the released checkpoint's
  enorm / hnorm / eh_proj / shared_head.norm so export maps one to one."""

  def __init__(self, cfg: ModelConfig, block: nnx.Module, *, rngs: nnx.Rngs):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    d = cfg.d_model
    self.enorm = RMSNorm(d, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.hnorm = RMSNorm(d, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.eh_proj = weight(rngs, (2 * d, d), _EH, cfg.init_std, pdt)
    self.block = block
    self.norm = RMSNorm(d, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.dtype = dt

  def mix(self, emb_BxLxD: jax.Array, h_BxLxD: jax.Array) -> jax.Array:
    """M_k [RMSNorm(Emb); RMSNorm(h)], embedding half first as the serving runtimes load it."""
    both = jnp.concatenate([self.enorm(emb_BxLxD), self.hnorm(h_BxLxD)], axis=-1)
    return sharding.fsdp_einsum("ble,ed->bld", both, ACT, self.eh_proj[...].astype(self.dtype), _EH)
