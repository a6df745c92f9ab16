"""Which drafts the verifier accepts, and the token that follows them: greedy, or the rejection
sampling of Leviathan et al. (2023) and Chen et al. (2023) that keeps every token distributed as
plain sampling from the verifier would.

Shape letters beyond the package legend (model/__init__.py): K drafts per round · T = K + 1
positions the verifier read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp_jax.generate.sample import filtered_probs


def rows(x_BxTx_, index_B):
  """x[b, index[b]] for every row."""
  return jnp.take_along_axis(x_BxTx_, index_B.reshape(-1, *([1] * (x_BxTx_.ndim - 1))), axis=1)[:, 0]


def accept(logits_BxTxV, drafts_BxK, draft_logits_BxKxV, key, temperature: float, top_p: float):
  """(accepted drafts per row, the token after them), from the verifier's logits at the K + 1
  positions it read (T = K + 1) and the K drafts with the logits they were drawn from.

  Greedy: drafts are accepted while they equal the verifier's argmax, which is then the next
  token. Sampled: draft x_j ~ q_j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); at the
  first rejection the token is drawn from norm(max(0, p_j - q_j)), and after K accepted from
  p_{K+1}, so every token is distributed as p, the verifier's filtered distribution."""
  b, t, v = logits_BxTxV.shape
  k = t - 1
  if temperature == 0.0:
    target_BxT = jnp.argmax(logits_BxTxV, -1).astype(jnp.int32)
    ok_BxK = drafts_BxK == target_BxT[:, :k]
    accepted_B = jnp.sum(jnp.cumprod(ok_BxK, axis=1), axis=1)
    return accepted_B, rows(target_BxT, accepted_B)
  p_BxTxV = filtered_probs(logits_BxTxV.reshape(b * t, v), temperature, top_p).reshape(b, t, v)
  q_BxKxV = filtered_probs(draft_logits_BxKxV.reshape(b * k, v), temperature, top_p).reshape(b, k, v)
  p_x_BxK = jnp.take_along_axis(p_BxTxV[:, :k], drafts_BxK[..., None], -1)[..., 0]
  q_x_BxK = jnp.take_along_axis(q_BxKxV, drafts_BxK[..., None], -1)[..., 0]
  key_u, key_next = jax.random.split(key)
  ok_BxK = jax.random.uniform(key_u, (b, k)) * q_x_BxK < p_x_BxK  # u < p / q, q(x) > 0 as x ~ q
  accepted_B = jnp.sum(jnp.cumprod(ok_BxK, axis=1), axis=1)
  # q is zero past the drafts, so after K accepted the residual is p_{K+1} itself: the bonus token.
  q_BxTxV = jnp.concatenate([q_BxKxV, jnp.zeros((b, 1, v), q_BxKxV.dtype)], axis=1)
  p_BxV, q_BxV = rows(p_BxTxV, accepted_B), rows(q_BxTxV, accepted_B)
  residual_BxV = jnp.maximum(p_BxV - q_BxV, 0.0)
  total_Bx1 = residual_BxV.sum(-1, keepdims=True)
  # All-zero residual means p <= q everywhere, i.e. p == q, where nothing is ever rejected.
  next_BxV = jnp.where(total_Bx1 > 0, residual_BxV / jnp.where(total_Bx1 > 0, total_Bx1, 1.0), p_BxV)
  return accepted_B, jax.random.categorical(key_next, jnp.log(next_BxV), axis=-1).astype(jnp.int32)
