"""Mixture-of-experts FFN: router, routed experts (dropless or capacity), shared experts.

The layer returns its auxiliary terms explicitly (`MoEAux`): the sequence-wise balance loss,
router z-loss, per-expert load and the number of dropped token-slots. The aux-loss-free
bias (DeepSeek-V3 eq. 16) lives in a `RouterBias` variable, outside the parameters, so the
optimizer and weight decay never see it; the train step moves it with `update_bias`.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax import sharding
from mtp_jax.config import ModelConfig, MoEConfig
from mtp_jax.model.layers import MLP, weight


class RouterBias(nnx.Variable):
  """Per-expert selection bias: updated by a sign rule after each step, never by gradients."""


@chex.dataclass
class MoEAux:
  balance_loss: jax.Array  # scalar, already weighted by alpha
  z_loss: jax.Array  # scalar, already weighted
  load: jax.Array  # E: token-slots routed to each expert (valid tokens only)
  dropped: jax.Array  # scalar: token-slots dropped for lack of capacity


class Router(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m = cfg.moe
    self.kernel = weight(rngs, (cfg.d_model, m.num_experts), ("embed", None), cfg.init_std, jnp.float32)
    self.bias = RouterBias(jnp.zeros((m.num_experts,), jnp.float32), axes=(None,))
    self.cfg = m

  def __call__(self, x_TxD: jax.Array):
    """Returns (gates_TxK, experts_TxK, scores_TxE, logits_TxE); routing math in float32."""
    m = self.cfg
    logits_TxE = x_TxD.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)
    scores_TxE = jax.nn.sigmoid(logits_TxE) if m.score_func == "sigmoid" else jax.nn.softmax(logits_TxE, -1)
    # The bias steers which experts are chosen, never how much they weigh (eq. 16).
    choice_TxE = scores_TxE + self.bias[...][None]
    if m.n_group > 1:
      t = choice_TxE.shape[0]
      grouped = choice_TxE.reshape(t, m.n_group, -1)
      group_score_TxG = jax.lax.top_k(grouped, 2)[0].sum(-1)
      _, keep_TxG = jax.lax.top_k(group_score_TxG, m.topk_group)
      keep = jnp.zeros_like(group_score_TxG, bool).at[jnp.arange(t)[:, None], keep_TxG].set(True)
      choice_TxE = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, -1)
    _, experts_TxK = jax.lax.top_k(choice_TxE, m.top_k)
    gates_TxK = jnp.take_along_axis(scores_TxE, experts_TxK, axis=-1)
    if m.norm_topk_prob:
      gates_TxK = gates_TxK / (gates_TxK.sum(-1, keepdims=True) + 1e-20)
    return gates_TxK * m.routed_scaling_factor, experts_TxK, scores_TxE, logits_TxE

  def update_bias(self, load_E: jax.Array, rate: float) -> None:
    """b_i += gamma * sign(mean load - load_i) (DeepSeek-V3 eq. 16)."""
    self.bias[...] = self.bias[...] + rate * jnp.sign(load_E.mean() - load_E)


class Experts(nnx.Module):
  """E SwiGLU experts with stacked weights."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f, std = cfg.moe.num_experts, cfg.d_model, cfg.moe.expert_d_ff, cfg.init_std
    pdt = jnp.dtype(cfg.param_dtype)
    self.w_gate = weight(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pdt)
    self.w_up = weight(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pdt)
    self.w_down = weight(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, pdt)
    self.dtype = jnp.dtype(cfg.dtype)

  def ragged(self, x_NxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Rows of x sorted by expert; group_sizes_E rows go to each expert in turn."""
    dt = self.dtype
    gate = jax.lax.ragged_dot(x_NxD, self.w_gate[...].astype(dt), group_sizes_E)
    up = jax.lax.ragged_dot(x_NxD, self.w_up[...].astype(dt), group_sizes_E)
    return jax.lax.ragged_dot(jax.nn.silu(gate) * up, self.w_down[...].astype(dt), group_sizes_E)

  def batched(self, x_ExCxD: jax.Array) -> jax.Array:
    """One fixed-size buffer of rows per expert."""
    dt = self.dtype
    gate = jnp.einsum("ecd,edf->ecf", x_ExCxD, self.w_gate[...].astype(dt))
    up = jnp.einsum("ecd,edf->ecf", x_ExCxD, self.w_up[...].astype(dt))
    return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, self.w_down[...].astype(dt))


def capacity(cfg: MoEConfig, num_tokens: int) -> int:
  return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))


def dispatch_slots(experts_TxK: jax.Array, valid_T: jax.Array, num_experts: int, cap: int):
  """Slot of each (token, choice) in its expert's buffer, first choices first, then by
  token order (GShard-style priority); slots >= cap overflow and are dropped."""
  t, k = experts_TxK.shape
  onehot_KxTxE = jax.nn.one_hot(experts_TxK.T, num_experts, dtype=jnp.int32) * valid_T[None, :, None]
  rank = jnp.cumsum(onehot_KxTxE.reshape(k * t, num_experts), axis=0).reshape(k, t, num_experts) - 1
  slot_TxK = jnp.take_along_axis(rank, experts_TxK.T[..., None], axis=-1)[..., 0].T
  keep_TxK = (slot_TxK < cap) & valid_T[:, None].astype(bool)
  return slot_TxK, keep_TxK


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m = cfg.moe
    self.router = Router(cfg, rngs=rngs)
    self.experts = Experts(cfg, rngs=rngs)
    self.shared = nnx.data(None)
    if m.num_shared_experts:
      self.shared = MLP(
        cfg.d_model,
        m.num_shared_experts * m.expert_d_ff,
        rngs=rngs,
        std=cfg.init_std,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
      )
    self.cfg = m

  def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array) -> tuple[jax.Array, MoEAux]:
    m = self.cfg
    b, l, d = x_BxLxD.shape
    e, k = m.num_experts, m.top_k
    x_TxD = x_BxLxD.reshape(b * l, d)
    valid_T = valid_BxL.reshape(-1).astype(jnp.int32)
    gates_TxK, experts_TxK, scores_TxE, logits_TxE = self.router(x_TxD)

    if m.mode == "dropless":
      flat = experts_TxK.reshape(-1)
      order = jnp.argsort(flat, stable=True)
      group_sizes_E = jnp.bincount(flat, length=e).astype(jnp.int32)
      y_sorted = self.experts.ragged(x_TxD[order // k], group_sizes_E)
      y_TxKxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(b * l, k, d)
      dropped = jnp.zeros((), jnp.int32)
    else:
      cap = capacity(m, b * l)
      slot_TxK, keep_TxK = dispatch_slots(experts_TxK, valid_T, e, cap)
      slot_TxK = jnp.where(keep_TxK, slot_TxK, cap)  # out of range: dropped by the scatter
      buf_ExCxD = (
        jnp.zeros((e, cap, d), x_TxD.dtype)
        .at[experts_TxK, slot_TxK]
        .set(jnp.broadcast_to(x_TxD[:, None], (b * l, k, d)), mode="drop")
      )
      out_ExCxD = self.experts.batched(sharding.constrain(buf_ExCxD, ("experts", None, "act_embed")))
      y_TxKxD = out_ExCxD.at[experts_TxK, slot_TxK].get(mode="fill", fill_value=0)
      dropped = jnp.sum(valid_T[:, None] * (1 - keep_TxK.astype(jnp.int32)))

    y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype))
    y_BxLxD = y_TxD.reshape(b, l, d)
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)

    chosen_TxE = jax.nn.one_hot(experts_TxK, e, dtype=jnp.float32).sum(1) * valid_T[:, None]
    aux = MoEAux(
      balance_loss=m.balance_loss_weight
      * sequence_balance_loss(chosen_TxE.reshape(b, l, e), scores_TxE.reshape(b, l, e), valid_BxL, k),
      z_loss=m.z_loss_weight * _masked_mean(jax.nn.logsumexp(logits_TxE, -1) ** 2, valid_T),
      load=chosen_TxE.sum(0),
      dropped=dropped,
    )
    return y_BxLxD, aux


def sequence_balance_loss(chosen_BxLxE, scores_BxLxE, valid_BxL, top_k: int) -> jax.Array:
  """Sum_i f_i P_i per sequence, averaged over sequences (DeepSeek-V3 eqs. 17-20):
  f_i = E / (K T) * tokens choosing i; P_i = mean normalised affinity of i."""
  e = scores_BxLxE.shape[-1]
  valid = valid_BxL.astype(jnp.float32)
  tokens_B = jnp.maximum(valid.sum(-1), 1.0)
  f_BxE = e / (top_k * tokens_B[:, None]) * chosen_BxLxE.sum(1)
  norm_BxLxE = scores_BxLxE / (scores_BxLxE.sum(-1, keepdims=True) + 1e-20)
  p_BxE = (norm_BxLxE * valid[..., None]).sum(1) / tokens_B[:, None]
  return jnp.mean(jnp.sum(f_BxE * p_BxE, -1))


def _masked_mean(x, valid):
  return jnp.sum(x * valid) / jnp.maximum(jnp.sum(valid), 1)
