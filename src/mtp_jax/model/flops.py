"""Parameter counts and model FLOPs per token, from the config alone (for MFU and sizing)."""

from __future__ import annotations

import dataclasses

from mtp_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Cost:
  total_params: int  # every parameter, MTP modules included
  active_params: int  # parameters one token's forward pass multiplies through (embedding lookup excluded)
  train_flops_per_token: float  # forward + backward (3x forward), attention and MTP included
  mtp_train_flops_per_token: float  # the share of the above spent in MTP depths


def _attention(cfg: ModelConfig) -> tuple[int, int, int]:
  """(parameters, q/k dim per head, v dim per head) of one attention layer."""
  a, d = cfg.attention, cfg.d_model
  if a.kind == "gqa":
    params = d * a.num_heads * a.head_dim * 2 + 2 * d * a.num_kv_heads * a.head_dim
    params += 2 * a.head_dim if a.qk_norm else 0  # the q and k norm scales
    return params, a.head_dim, a.head_dim
  qk = a.qk_nope_head_dim + a.qk_rope_head_dim
  q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk if a.q_lora_rank else d * a.num_heads * qk
  kv = (
    d * (a.kv_lora_rank + a.qk_rope_head_dim)
    + a.kv_lora_rank
    + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
  )
  return q + kv + a.num_heads * a.v_head_dim * d, qk, a.v_head_dim


def _ffn(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
  """(total, active) parameters of one FFN."""
  d, m = cfg.d_model, cfg.moe
  if not moe:
    return 3 * d * cfg.d_ff, 3 * d * cfg.d_ff
  expert = 3 * d * m.expert_d_ff
  shared = m.num_shared_experts * expert
  router = d * m.num_experts
  return router + m.num_experts * expert + shared, router + m.top_k * expert + shared


def cost(cfg: ModelConfig, seq_len: int) -> Cost:
  d, v = cfg.d_model, cfg.vocab_size
  attn_params, qk_dim, v_dim = _attention(cfg)
  # Causal attention: on average a token attends to (L + 1) / 2 keys; QK^T and PV each
  # cost 2 FLOPs per multiply-add.
  attn_scores = 2 * cfg.attention.num_heads * (qk_dim + v_dim) * (seq_len + 1) / 2
  norms = 2 * d
  has_moe = cfg.moe.num_experts > 0

  def block(moe: bool) -> tuple[int, int]:
    total, active = _ffn(cfg, moe)
    return attn_params + norms + total, attn_params + active

  head = d * v
  embed = v * d
  total = embed + d + (0 if cfg.tie_embeddings else head)
  active = head
  trunk_blocks = [block(has_moe and i >= cfg.first_k_dense) for i in range(cfg.num_layers)]
  total += sum(t for t, _ in trunk_blocks)
  active += sum(a for _, a in trunk_blocks)

  mtp_total = mtp_active = 0
  for _ in range(cfg.mtp.depth):
    t, a = block(has_moe and cfg.mtp.use_moe)
    if cfg.mtp.kind == "sequential":  # enorm, hnorm, 2D -> D projection, own final norm
      t, a = t + 2 * d * d + 3 * d, a + 2 * d * d
    mtp_total += t
    mtp_active += a + head  # every depth projects through the shared head
  total += mtp_total
  n_attn = cfg.num_layers + cfg.mtp.depth
  fwd = 2 * (active + mtp_active) + n_attn * attn_scores
  mtp_fwd = 2 * mtp_active + cfg.mtp.depth * attn_scores
  return Cost(
    total_params=total,
    active_params=active + mtp_active,
    train_flops_per_token=3 * fwd,
    mtp_train_flops_per_token=3 * mtp_fwd,
  )
