"""AdamW with linear warmup + cosine decay, global-norm clipping, decay on matrices only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mtp_jax.config import OptimizerConfig


def schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine to min_lr_ratio * peak at decay_steps."""
  decay = cfg.decay_steps or total_steps
  warmup = cfg.warmup_steps

  def lr(step):
    step = jnp.asarray(step, jnp.float32)
    warm = (step + 1) / max(warmup, 1)
    progress = jnp.clip((step - warmup) / max(decay - warmup, 1), 0.0, 1.0)
    cosine = cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    return cfg.learning_rate * jnp.where(step < warmup, warm, cosine)

  return lr


def decay_mask(params):
  """Weight decay on matrices only: norms and biases (`decay=False`) are left alone, a stack's
  `layers` axis not counted. The router bias is not a parameter at all, so it never reaches the
  optimizer."""

  def matrix(v) -> bool:
    axes = v.get_metadata().get("axes") or (None,) * v.get_value().ndim
    return v.replace(v.get_metadata().get("decay", True) and sum(a != "layers" for a in axes) >= 2)

  return jax.tree.map(matrix, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip else []
  parts.append(
    optax.adamw(
      schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )
  )
  return optax.chain(*parts)
