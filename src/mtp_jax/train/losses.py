"""Per-depth shifted targets and a chunked, rematerialised output-head cross-entropy.

Each depth's logits are projected and reduced one sequence chunk at a time under
`jax.checkpoint`, so the backward pass recomputes them: peak memory holds about one chunk of
logits, never all depths at once (Gloeckle et al. §2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp_jax.model.mtp import shift_left


def depth_targets(tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, depth: int):
  """Targets t+1+depth for each position and where they are real: inside the sequence and
  inside the same packed document (segment 0 is padding)."""
  shift = depth + 1
  targets_BxL = shift_left(tokens_BxL, shift)
  target_seg_BxL = shift_left(segment_ids_BxL, shift, fill=0)
  mask_BxL = (segment_ids_BxL != 0) & (target_seg_BxL == segment_ids_BxL)
  return targets_BxL, mask_BxL


def head_cross_entropy(h_BxLxD, w_DxV, targets_BxL, mask_BxL, chunk_len: int = 0):
  """Returns (summed NLL, summed top-1 hits) over masked positions, in float32."""
  nll, hits, _ = _chunked_head(h_BxLxD, w_DxV, targets_BxL, mask_BxL, chunk_len, keep_argmax=False)
  return nll, hits


def head_eval(h_BxLxD, w_DxV, targets_BxL, mask_BxL, chunk_len: int = 0):
  """`head_cross_entropy` plus every position's top-1 token (argmax_BxL, int32), for held-out
  metrics that compare depths; a separate path so the training step carries no extra output."""
  return _chunked_head(h_BxLxD, w_DxV, targets_BxL, mask_BxL, chunk_len, keep_argmax=True)


def _chunked_head(h_BxLxD, w_DxV, targets_BxL, mask_BxL, chunk_len: int, keep_argmax: bool):
  b, length, _ = h_BxLxD.shape
  chunk_len = chunk_len or length
  n = length // chunk_len
  vocab = w_DxV.shape[1]

  @jax.checkpoint
  def chunk(h_BxCxD, t_BxC, m_BxC):
    logits = head_logits(h_BxCxD, w_DxV)
    hit_BxCxV = jnp.arange(vocab)[None, None] == t_BxC[..., None]
    target = jnp.sum(jnp.where(hit_BxCxV, logits, 0.0), -1)  # a masked sum: vocab-split logits need no gather
    nll = jax.nn.logsumexp(logits, -1) - target
    top_BxC = jnp.argmax(logits, -1).astype(jnp.int32)
    hits = top_BxC == t_BxC
    m = m_BxC.astype(jnp.float32)
    return jnp.sum(nll * m), jnp.sum(hits * m), top_BxC if keep_argmax else None

  def split(x):  # B x L x ... -> N x B x C x ...
    return jnp.moveaxis(x.reshape(b, n, chunk_len, *x.shape[2:]), 1, 0)

  def body(carry, xs):
    nll, hits, top_BxC = chunk(*xs)
    return (carry[0] + nll, carry[1] + hits), top_BxC

  zero = jnp.zeros((), jnp.float32)
  (nll, hits), top_NxBxC = jax.lax.scan(body, (zero, zero), (split(h_BxLxD), split(targets_BxL), split(mask_BxL)))
  if not keep_argmax:
    return nll, hits, None
  return nll, hits, jnp.moveaxis(top_NxBxC, 0, 1).reshape(b, length)


@jax.custom_vjp
def head_logits(h_BxCxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
  """Float32 logits of the output head. Its backward casts the logits' cotangent to the compute
  dtype (h's) first, so both gradient matmuls run there, accumulating in float32, instead of as
  float32 matmuls; the log-sum-exp and the loss stay in float32."""
  return jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)


def _head_logits_fwd(h_BxCxD, w_DxV):
  return head_logits(h_BxCxD, w_DxV), (h_BxCxD, w_DxV)


def _head_logits_bwd(res, g_BxCxV):
  h_BxCxD, w_DxV = res
  g_BxCxV = g_BxCxV.astype(h_BxCxD.dtype)
  dh = jnp.einsum("bcv,dv->bcd", g_BxCxV, w_DxV, preferred_element_type=jnp.float32)
  dw = jnp.einsum("bcd,bcv->dv", h_BxCxD, g_BxCxV, preferred_element_type=jnp.float32)
  return dh.astype(h_BxCxD.dtype), dw.astype(w_DxV.dtype)


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def mtp_weight(step: jax.Array, base: float, schedule: list[tuple[int, float]]) -> jax.Array:
  """lambda at `step`: `base`, replaced by each (from_step, weight) once reached."""
  w = jnp.asarray(base, jnp.float32)
  for from_step, weight in schedule:
    w = jnp.where(step >= from_step, weight, w)
  return w
