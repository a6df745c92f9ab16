"""Mixture-of-experts FFN: the router and the layer (routed experts plus shared experts).

The layer returns its auxiliary terms explicitly (`MoEAux`): the sequence-wise balance loss,
router z-loss, per-expert load and the number of dropped token-slots. The aux-loss-free
bias (DeepSeek-V3 eq. 16) lives in a `RouterBias` variable, outside the parameters, so the
optimizer and weight decay never see it; the train step moves it with `update_bias`.

Where the routing and the experts run, and how tokens reach them, is `dispatch.py`'s business;
the expert kernels are in `experts.py`; `MOE.md` has the table of modes and dispatches.

Shape letters beyond the package legend (model/__init__.py): T tokens (B·L) · K experts chosen
per token (top-k) · X expert groups (group-limited routing) · N experts in a group · J groups
kept per token.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax import sharding
from mtp_jax.config import ModelConfig, MoEConfig
from mtp_jax.model import dispatch
from mtp_jax.model.experts import Experts
from mtp_jax.model.layers import MLP, weight


class RouterBias(nnx.Variable):
  """Per-expert selection bias: updated by a sign rule after each step, never by gradients."""


@chex.dataclass
class MoEAux:
  balance_loss: jax.Array  # scalar, already weighted by alpha
  z_loss: jax.Array  # scalar, already weighted
  load: jax.Array  # E: token-slots routed to each expert (valid tokens only)
  dropped: jax.Array  # scalar: token-slots dropped for lack of capacity, over all devices


def route(m: MoEConfig, params: tuple[jax.Array, jax.Array], x_TxD: jax.Array):
  """(gates_TxK, experts_TxK, scores_TxE, logits_TxE) for router params (kernel DxE, bias E);
  routing math in float32."""
  kernel_DxE, bias_E = params
  logits_TxE = x_TxD.astype(jnp.float32) @ kernel_DxE.astype(jnp.float32)
  scores_TxE = jax.nn.sigmoid(logits_TxE) if m.score_func == "sigmoid" else jax.nn.softmax(logits_TxE, -1)
  # The bias steers which experts are chosen, never how much they weigh (eq. 16).
  choice_TxE = scores_TxE + bias_E[None]
  if m.n_group > 1:
    t = choice_TxE.shape[0]
    grouped_TxXxN = choice_TxE.reshape(t, m.n_group, -1)
    group_score_TxX = jax.lax.top_k(grouped_TxXxN, 2)[0].sum(-1)
    _, kept_TxJ = jax.lax.top_k(group_score_TxX, m.topk_group)  # J: the groups kept
    keep_TxX = (kept_TxJ[:, :, None] == jnp.arange(m.n_group)[None, None]).any(1)
    choice_TxE = jnp.where(keep_TxX[:, :, None], grouped_TxXxN, -jnp.inf).reshape(t, -1)
  _, experts_TxK = jax.lax.top_k(choice_TxE, m.top_k)
  gates_TxK = jnp.take_along_axis(scores_TxE, experts_TxK, axis=-1)
  if m.norm_topk_prob:
    gates_TxK = gates_TxK / (gates_TxK.sum(-1, keepdims=True) + 1e-20)
  return gates_TxK * m.routed_scaling_factor, experts_TxK, scores_TxE, logits_TxE


class Router(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m = cfg.moe
    # Read in float32 whatever the compute dtype: the choice of experts is not rounded.
    self.kernel = weight(
      rngs, (cfg.d_model, m.num_experts), ("embed", None), cfg.init_std, jnp.float32, cast_at_use=False
    )
    self.bias = RouterBias(jnp.zeros((m.num_experts,), jnp.float32), axes=(None,))
    self.cfg = m

  def params(self) -> tuple[jax.Array, jax.Array]:
    return self.kernel[...], self.bias[...]

  def __call__(self, x_TxD: jax.Array):
    """Returns (gates_TxK, experts_TxK, scores_TxE, logits_TxE)."""
    return route(self.cfg, self.params(), x_TxD)

  def update_bias(self, load_E: jax.Array, rate: float) -> None:
    """b_i += gamma * sign(mean load - load_i) (DeepSeek-V3 eq. 16); `load_E` is shaped as the
    bias: [E], or [layers, E] for a stack's router, each layer's row by its own mean."""
    # set_value, not `bias[...] =`: under jit flax's indexed store asks the tracer for its sharding, and
    # JAX answers that with an error whose message walks the whole jaxpr (50-70 ms a router per trace).
    self.bias.set_value(self.bias[...] + rate * jnp.sign(load_E.mean(-1, keepdims=True) - load_E))


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
    b, l, _ = x_BxLxD.shape
    e, k = m.num_experts, m.top_k
    active = sharding.active()
    p = dispatch.plan(m, *active, (b, l)) if active else dispatch.ONE_DEVICE
    y_BxLxD, experts_BxLxK, scores_BxLxE, logits_BxLxE, dropped = dispatch.routed_experts(
      m, p, functools.partial(route, m), self.router.params(), self.experts.weights(), x_BxLxD, valid_BxL
    )
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)

    valid = valid_BxL.astype(jnp.float32)
    chosen_BxLxE = jax.nn.one_hot(experts_BxLxK, e, dtype=jnp.float32).sum(2) * valid[..., None]
    aux = MoEAux(
      balance_loss=m.balance_loss_weight * sequence_balance_loss(chosen_BxLxE, scores_BxLxE, valid_BxL, k),
      z_loss=m.z_loss_weight * _masked_mean(jax.nn.logsumexp(logits_BxLxE, -1) ** 2, valid),
      load=chosen_BxLxE.sum((0, 1)),
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
