"""The two drafters of self-speculative decoding. Each works in three steps the decoding loop
(speculative.py) calls: `prefill` once the trunk has read the prompts, `draft` at the start of a
round, `after_verify` once the trunk has verified the drafts and the rows' caches are rolled back
to the accepted ones. What a drafter carries from round to round, its state, rides in the loop's
carry (`SpecState.drafter`). MTP.md ("Speculative decoding") explains which positions each draft
cache holds.

Notation as in speculative.py: a row has committed tokens t_0 .. t_{n-1}; the trunk's cache
length is L = n - 1. Shape letters beyond the package legend (model/__init__.py): K drafts per
round · W = 2K window positions · P prompt slots · T = K + 1 verified positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp_jax.generate import cache as cache_lib
from mtp_jax.generate.accept import rows
from mtp_jax.generate.cache import Cache
from mtp_jax.model import Transformer
from mtp_jax.model.attention import cached_mask, write_rows


def make(model: Transformer, k: int):
  """The drafter of `model`'s MTP kind, drafting k tokens a round."""
  return (Sequential if model.mtp_kind == "sequential" else Parallel)(model, k)


class Sequential:
  """DeepSeek-V3's modules chained: draft j reads draft j-1's hidden state and the embedding of
  the token j ahead. With reuse, draft j runs module ((j-1) mod modules) + 1. State: (the trunk's
  final-normed hidden state h0 at every position so far, BxSxD; the modules' caches)."""

  def __init__(self, model: Transformer, k: int):
    self.model, self.k = model, k
    self.window = 2 * k  # see MTP.md: enough for every draft-dependent slot to be rewritten once settled

  def prefill(self, full: Transformer, seq_BxS, hidden_BxPxD, branch_BxPxD, lengths_B):
    """Every prompt slot through the modules (`full`: MLA up-projecting, as the prefill does), so
    that slots the first round's window does not reach are settled; those drafts are discarded."""
    del branch_BxPxD
    (b, s), p = seq_BxS.shape, hidden_BxPxD.shape[1]
    drafts = cache_lib.allocate([m.block.empty_cache(b, s) for m in _modules(self.model, self.k)], b)
    h0_BxSxD = jnp.zeros((b, s, hidden_BxPxD.shape[-1]), hidden_BxPxD.dtype).at[:, :p].set(hidden_BxPxD)
    prompt_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    argmax = lambda j, logits_BxV: jnp.argmax(logits_BxV, -1).astype(jnp.int32)
    modules = _modules(full, self.k)
    *_, layers = _chain(full, modules, seq_BxS, h0_BxSxD, drafts.layers, prompt_BxP, lengths_B - 1, argmax)
    return h0_BxSxD, drafts.replace(layers=layers, length_B=lengths_B)

  def draft(self, state, seq_BxS, last_B, pick):
    """(drafts BxK, their logits BxKxV, the sequence with them written in, state): the modules
    over the W positions before the query, each draft written before the next module reads it."""
    h0_BxSxD, drafts = state
    start_B = jnp.maximum(last_B - self.window, 0)
    pos_BxW = start_B[:, None] + jnp.arange(self.window, dtype=jnp.int32)[None]
    modules = _modules(self.model, self.k)
    drafts_BxK, logits_BxKxV, seq_BxS, layers = _chain(
      self.model, modules, seq_BxS, h0_BxSxD, drafts.layers, pos_BxW, last_B - 1 - start_B, pick
    )
    return drafts_BxK, logits_BxKxV, seq_BxS, (h0_BxSxD, drafts.replace(layers=layers))

  def after_verify(self, state, hidden_BxTxD, branch_BxTxD, positions_BxT, accepted_B, length_B):
    """The verified positions' hidden states kept; the window rewrites the modules' slots next round."""
    del branch_BxTxD, accepted_B
    h0_BxSxD, drafts = state
    return write_rows(h0_BxSxD, hidden_BxTxD, positions_BxT), drafts.replace(length_B=length_B)


class Parallel:
  """Gloeckle et al.'s heads, each predicting its own offset from the state entering the trunk's
  last block. State: (the next round's draft logits, BxKxV; the heads' caches)."""

  def __init__(self, model: Transformer, k: int):
    self.model, self.k = model, k

  def prefill(self, full: Transformer, seq_BxS, hidden_BxPxD, branch_BxPxD, lengths_B):
    del hidden_BxPxD
    (b, s), p = seq_BxS.shape, branch_BxPxD.shape[1]
    drafts = cache_lib.allocate([h.empty_cache(b, s) for h in list(self.model.mtp)[: self.k]], b)
    outs, layers = _heads(full, list(full.mtp)[: self.k], branch_BxPxD, cache_lib.positions(drafts, p), drafts.layers)
    logits_BxKxV = self.model.logits(jnp.stack([rows(o, lengths_B - 1) for o in outs], 1))
    return logits_BxKxV, cache_lib.rollback(drafts.replace(layers=layers, length_B=drafts.length_B + p), lengths_B)

  def draft(self, state, seq_BxS, last_B, pick):
    logits_BxKxV, _ = state
    drafts_BxK = jnp.stack([pick(j, logits_BxKxV[:, j - 1]) for j in range(1, self.k + 1)], 1)
    positions_BxK = last_B[:, None] + 1 + jnp.arange(self.k, dtype=jnp.int32)[None]
    return drafts_BxK, logits_BxKxV, write_rows(seq_BxS, drafts_BxK, positions_BxK), state

  def after_verify(self, state, hidden_BxTxD, branch_BxTxD, positions_BxT, accepted_B, length_B):
    """The heads over the verified positions. The next drafts read position n' - 2 = L + a, index
    a of this pass, whose query saw only accepted slots; the caches roll back with the trunk's."""
    del hidden_BxTxD
    _, drafts = state
    outs, layers = _heads(self.model, list(self.model.mtp)[: self.k], branch_BxTxD, positions_BxT, drafts.layers)
    next_BxKxV = self.model.logits(jnp.stack([rows(o, accepted_B) for o in outs], 1))
    return next_BxKxV, Cache(layers=layers, length_B=length_B)


def _modules(model: Transformer, k: int) -> list:
  return [model.mtp_module(j) for j in range(1, k + 1)]


def _chain(model, modules, seq_BxS, h0_BxSxD, layers, pos_BxW, query_B, pick):
  """Sequential drafting over a window of positions: draft j runs module `modules[j-1]` at every
  window position i on [RMSNorm(Emb(t_{i+j})); RMSNorm(h^{j-1}_i)] exactly as training does
  (h^0 the trunk's final-normed state), writing its cache there, and drafts t_{n-1+j} from the
  query position n-2. The draft is written into the sequence before module j+1 reads it as its
  Emb(t_{i+j+1}) at the query. Returns (drafts BxK, draft logits BxKxV, sequence, layers)."""
  s = seq_BxS.shape[1]
  mask_BxWxS = cached_mask(pos_BxW, s)
  h_BxWxD = jnp.take_along_axis(h0_BxSxD, pos_BxW[..., None], axis=1)
  query_pos_B = jnp.take_along_axis(pos_BxW, query_B[:, None], axis=1)[:, 0]
  drafts, logits, new_layers = [], [], []
  for j, (module, layer) in enumerate(zip(modules, layers, strict=True), start=1):
    tokens_BxW = jnp.take_along_axis(seq_BxS, jnp.minimum(pos_BxW + j, s - 1), axis=1)
    h_BxWxD, layer = module.block.decode(module.mix(model.embed(tokens_BxW), h_BxWxD), mask_BxWxS, pos_BxW, layer)
    logits_BxV = model.logits(module.norm(rows(h_BxWxD, query_B)[:, None]))[:, 0]
    token_B = pick(j, logits_BxV)
    seq_BxS = write_rows(seq_BxS, token_B[:, None], (query_pos_B + 1 + j)[:, None])
    drafts.append(token_B)
    logits.append(logits_BxV)
    new_layers.append(layer)
  return jnp.stack(drafts, 1), jnp.stack(logits, 1), seq_BxS, new_layers


def _heads(model, heads, branch_BxTxD, positions_BxT, layers):
  """The parallel heads over new trunk positions: (final-normed outputs per head, layers)."""
  mask_BxTxS = cached_mask(positions_BxT, jax.tree.leaves(layers[0])[0].shape[1])
  outs, new_layers = [], []
  for head, layer in zip(heads, layers, strict=True):
    out_BxTxD, layer = head.decode(branch_BxTxD, mask_BxTxS, positions_BxT, layer)
    outs.append(model.final_norm(out_BxTxD))
    new_layers.append(layer)
  return outs, new_layers
