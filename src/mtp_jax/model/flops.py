"""Parameter counts and model FLOPs per token from the config alone (for MFU and sizing), and
the matmul FLOPs of a traced program."""

from __future__ import annotations

import dataclasses
import math

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


def traced_matmul_flops(jaxpr, devices: int) -> float:
  """Matmul FLOPs per device of a traced program (`jax.jit(f).trace(...).jaxpr`): every
  `dot_general` and `ragged_dot_general` the program runs, rematerialised forwards included,
  each loop body as many times as the loop runs. XLA's cost analysis counts a loop body once,
  which in a step with scanned layers, query blocks and microbatches is most of the work.
  Outside `shard_map` shapes are global, so their FLOPs are split evenly over `devices`;
  inside, shapes are per device and count whole (capacity padding included)."""

  def dot(eqn) -> float:
    """2 FLOPs per multiply-add: each output element sums over the contracted dimensions."""
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      groups = 1
    else:  # ragged_dot_general
      numbers = eqn.params["ragged_dot_dimension_numbers"]
      (contracting, _), _ = numbers.dot_dimension_numbers
      # With no group dimension in rhs the ragged dimension is contracted (the weight gradient,
      # G x K x N): each group's outputs sum over that group's rows only.
      groups = 1 if numbers.rhs_group_dimensions else eqn.invars[2].aval.shape[-1]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting) / groups

  def subjaxprs(value):
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):  # ClosedJaxpr
      yield value.jaxpr
    elif hasattr(value, "eqns"):  # Jaxpr
      yield value
    elif isinstance(value, tuple | list):
      for v in value:
        yield from subjaxprs(v)

  def walk(jx, share: float) -> float:
    total = 0.0
    for eqn in jx.eqns:
      name = eqn.primitive.name
      if name in ("dot_general", "ragged_dot_general"):
        total += dot(eqn) * share
      elif name == "shard_map":
        total += walk(eqn.params["jaxpr"], 1.0)
      elif name == "scan":
        total += eqn.params["length"] * walk(eqn.params["jaxpr"].jaxpr, share)
      elif name == "cond":
        total += max(walk(b.jaxpr, share) for b in eqn.params["branches"])
      else:  # pjit, remat, custom_vjp, ...: their bodies once (a while_loop's too: no trip count)
        total += sum(walk(j, share) for v in eqn.params.values() for j in subjaxprs(v))
    return total

  return walk(getattr(jaxpr, "jaxpr", jaxpr), 1.0 / devices)
