"""Per-depth shifted targets and a chunked, rematerialised output-head cross-entropy.

Each depth's logits are projected and reduced one sequence chunk at a time under
`jax.checkpoint`, so the backward pass recomputes them: peak memory holds about one chunk of
logits, never all depths at once (Gloeckle et al. §2). On a mesh the logits split by vocabulary
over the axes of `mesh.rules.act_vocab`; where one of them also splits the tokens, the head runs
in one `shard_map` (`vocab_split`, `_head`), elsewhere the compiler places it.

Shape letters beyond the package legend (model/__init__.py): C positions per chunk · N chunks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from mtp_jax import sharding
from mtp_jax.model.mtp import shift_left


def depth_targets(tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, depth: int):
  """Targets t+1+depth for each position and where they are real: inside the sequence and
  inside the same packed document (segment 0 is padding)."""
  shift = depth + 1
  targets_BxL = shift_left(tokens_BxL, shift)
  target_seg_BxL = shift_left(segment_ids_BxL, shift, fill=0)
  mask_BxL = (segment_ids_BxL != 0) & (target_seg_BxL == segment_ids_BxL)
  return targets_BxL, mask_BxL


def all_depth_targets(tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, depths: int):
  """`depth_targets` of depths 0 .. depths - 1: (their targets, their masks), a tuple each."""
  return tuple(zip(*(depth_targets(tokens_BxL, segment_ids_BxL, d) for d in range(depths)), strict=True))


def head_cross_entropy(h_BxLxD, w_DxV, targets_BxL, mask_BxL, chunk_len: int = 0):
  """Returns (summed NLL, summed top-1 hits) over masked positions, in float32."""
  nll_K, hits_K = head_losses((h_BxLxD,), w_DxV, (targets_BxL,), (mask_BxL,), chunk_len)
  return nll_K[0], hits_K[0]


def head_losses(hs, w_DxV, targets, masks, chunk_len: int = 0):
  """`head_cross_entropy` of every depth's (h_BxLxD, targets_BxL, mask_BxL) through one head
  matrix: (NLL sums, hit sums), each [depths]. On a mesh the depths share one gathered head
  matrix, and its gradient, summed over them, leaves once (`_head`)."""
  nll_K, hits_K, _ = _head(tuple(hs), w_DxV, tuple(targets), tuple(masks), chunk_len, keep_argmax=False)
  return nll_K, hits_K


def head_eval(hs, w_DxV, targets, masks, chunk_len: int = 0):
  """`head_losses` plus every depth's top-1 token at each position (argmax_BxL, int32), for
  held-out metrics that compare depths; a separate path so the training step carries no extra
  output."""
  return _head(tuple(hs), w_DxV, tuple(targets), tuple(masks), chunk_len, keep_argmax=True)


@dataclasses.dataclass(frozen=True)
class VocabSplit:
  """Where the head runs on a mesh. The vocabulary splits over `vocab` (mesh.rules.act_vocab,
  the axes that divide it); those of them that also split the tokens (`gather`) are given the
  whole group's tokens, so a device computes its group's logits over its share of the
  vocabulary: the same FLOPs as its own tokens over all of it, without the whole head matrix.
  Only then does the head run in a shard_map (`_head`)."""

  mesh: Mesh
  tokens: PartitionSpec  # of B x L x D
  vocab: tuple[str, ...]  # in the order they split it inside (`_head`)
  gather: tuple[str, ...]
  stored: PartitionSpec  # the head matrix's own layout (mesh.rules embed and vocab), as it enters


def vocab_split(vocab_size: int, h_shape) -> VocabSplit | None:
  """The head's layout on the active mesh (`sharding.activate`), or None outside one."""
  active = sharding.active()
  if active is None:
    return None
  mesh, rules = active
  tokens = sharding.spec(("act_batch", "act_length", None), h_shape, mesh, rules)
  # The act_vocab axes that divide the vocabulary, less the length's (only the batch's are gathered).
  on_length = {"act_length": list(sharding.axes_of(tokens[1])), "act_vocab": rules.get("act_vocab", [])}
  vocab = sharding.axes_of(sharding.spec(("act_length", "act_vocab"), (h_shape[1], vocab_size), mesh, on_length)[1])
  stored = sharding.spec(("embed", "vocab"), (h_shape[-1], vocab_size), mesh, rules)
  rows, kept = sharding.axes_of(stored[0]), sharding.axes_of(stored[1])
  # Inside, V splits over the axes it is stored over, then those it is not stored over at all
  # (the shard_map slices it), then those its D rows are stored over (`_all_rows`).
  vocab = (
    tuple(a for a in kept if a in vocab)
    + tuple(a for a in vocab if a not in kept + rows)
    + tuple(a for a in rows if a in vocab)
  )
  gather = tuple(a for a in sharding.axes_of(tokens[0]) if a in vocab)
  return VocabSplit(mesh, tokens, vocab, gather, stored)


def _head(hs, w_DxV, targets, masks, chunk_len: int, keep_argmax: bool):
  split = vocab_split(w_DxV.shape[1], hs[0].shape)
  if split is None or not split.gather:
    # One device, or a vocabulary split only over axes that do not split the tokens (tensor):
    # the compiler places it. (The same program in a shard_map, the head matrix gathered inside,
    # compiled to 5 GiB more a chip for 671B on v5p-1024; benchmarks/RESULTS.md.)
    return _chunked_head(hs, w_DxV, targets, masks, chunk_len, keep_argmax, (), (), (), ())
  tok, tok_BxL = split.tokens, PartitionSpec(*split.tokens[:2])
  token_axes = sharding.axes_of(tok[0]) + sharding.axes_of(tok[1])
  rows = sharding.axes_of(split.stored[0])
  body = functools.partial(
    _chunked_head,
    chunk_len=chunk_len,
    keep_argmax=keep_argmax,
    vocab=split.vocab,
    gather=split.gather,
    rows=rows,
    token_axes=token_axes,
  )
  k = len(hs)
  tops_spec = (tok_BxL,) * k if keep_argmax else PartitionSpec()
  # The head matrix comes as stored: V over the axes it is stored over and those it is not
  # stored over at all; _all_rows moves the rest.
  w_spec = PartitionSpec(sharding.entry(rows), sharding.entry([a for a in split.vocab if a not in rows]))
  return jax.shard_map(
    body,
    mesh=split.mesh,
    in_specs=((tok,) * k, w_spec, (tok_BxL,) * k, (tok_BxL,) * k),
    out_specs=(PartitionSpec(), PartitionSpec(), tops_spec),
  )(hs, w_DxV, targets, masks)


def _chunked_head(hs, w_DxV, targets, masks, chunk_len, keep_argmax, vocab, gather, rows, token_axes):
  """On one device, or inside `_head`'s shard_map on each: (NLL sums, hit sums, argmaxes or
  None) of each depth's (h_BxLxD, targets_BxL, mask_BxL). In the shard_map, B is this device's
  rows of the batch (the group's after the gather), V its share of the vocabulary (`part`), D and
  L whole. Over `vocab` the logits are split and the log-sum-exp, target logit and argmax
  combine across devices; over `gather` the tokens of the group are gathered and each device
  keeps its own rows' results; the head matrix's D rows, stored over `rows`, are brought
  together once for all depths (`_all_rows`), so its gradient leaves once."""
  # Both head operands vary over every axis the head's work splits over; the head matrix's
  # cast's transpose is the sum of its gradient over the devices that share it, after the
  # gather's transpose (a reduce-scatter) has cut it to this device's rows.
  split_by = set(token_axes) | set(vocab) | set(rows)
  w_DxV = _varying(w_DxV, tuple(a for a in sorted(split_by) if a not in vocab + rows))
  w_DxV = _all_rows(w_DxV, rows, vocab)
  part = w_DxV.shape[1]

  @jax.checkpoint
  def chunk(h_BxCxD, t_BxC, m_BxC):
    if gather:  # the group's rows; the gather's transpose is a reduce-scatter of dh
      h_BxCxD = jax.lax.all_gather(h_BxCxD, gather, axis=0, tiled=True)
      t_BxC = jax.lax.all_gather(t_BxC, gather, axis=0, tiled=True)
    logits = head_logits(_varying(h_BxCxD, tuple(a for a in sorted(split_by) if a not in token_axes)), w_DxV)
    first = jax.lax.axis_index(vocab) * part if vocab else 0  # of this device's slice of the vocabulary
    top_local = jnp.max(logits, -1)
    top = _over(jax.lax.pmax, jax.lax.stop_gradient(top_local), vocab)
    lse = top + jnp.log(_over(jax.lax.psum, jnp.sum(jnp.exp(logits - top[..., None]), -1), vocab))
    hit_BxCxV = (first + jnp.arange(part))[None, None] == t_BxC[..., None]
    nll = lse - _over(jax.lax.psum, jnp.sum(jnp.where(hit_BxCxV, logits, 0.0), -1), vocab)
    arg = jnp.where(top_local == top, first + jnp.argmax(logits, -1).astype(jnp.int32), _NONE)
    arg_BxC = _over(jax.lax.pmin, arg, vocab)  # the first maximum over the whole vocabulary
    hits = arg_BxC == t_BxC
    if gather:  # back to this device's rows
      own = jax.lax.axis_index(gather) * m_BxC.shape[0]
      nll, hits, arg_BxC = (jax.lax.dynamic_slice_in_dim(x, own, m_BxC.shape[0]) for x in (nll, hits, arg_BxC))
    m = m_BxC.astype(jnp.float32)
    return jnp.sum(nll * m), jnp.sum(hits * m), arg_BxC if keep_argmax else None

  def body(carry, xs):
    nll, hits, top_BxC = chunk(*xs)
    return (carry[0] + nll, carry[1] + hits), top_BxC

  def depth(h_BxLxD, targets_BxL, mask_BxL):
    b, length, _ = h_BxLxD.shape
    c = chunk_len or length
    n = length // c

    def split(x):  # B x L x ... -> N x B x C x ...
      return jnp.moveaxis(x.reshape(b, n, c, *x.shape[2:]), 1, 0)

    zero = _varying(jnp.zeros((), jnp.float32), token_axes)
    (nll, hits), top_NxBxC = jax.lax.scan(body, (zero, zero), (split(h_BxLxD), split(targets_BxL), split(mask_BxL)))
    return nll, hits, None if top_NxBxC is None else jnp.moveaxis(top_NxBxC, 0, 1).reshape(b, length)

  nll_K, hits_K, tops = zip(*(depth(*xs) for xs in zip(hs, targets, masks, strict=True)), strict=True)
  nll_K, hits_K = jnp.stack(nll_K), jnp.stack(hits_K)
  if token_axes:
    nll_K, hits_K = jax.lax.psum(nll_K, token_axes), jax.lax.psum(hits_K, token_axes)
  return nll_K, hits_K, tops if keep_argmax else None


_NONE = jnp.iinfo(jnp.int32).max


def _all_rows(w_RxV: jax.Array, rows: tuple[str, ...], vocab: tuple[str, ...]) -> jax.Array:
  """In the shard_map: this device's block of the head matrix as stored (its D rows split over
  `rows`, the major first) -> all D rows of its share of the vocabulary. Over a row axis that
  also splits the vocabulary, an all-to-all trades the other devices' shares of V for their rows
  (so the optimizer keeps the head as stored: left to XLA:TPU, the move between the two layouts
  ran after the microbatches, through a whole float32 head matrix; benchmarks/RESULTS.md); over
  the others, an all-gather; one axis at a time, the all-to-alls first while the block is small.
  Their transposes leave the gradient as stored."""
  order = [a for a in rows if a in vocab] + [a for a in rows if a not in vocab]
  for a in order:  # each adds a leading axis: the source device's index along `a`
    if a in vocab:
      n = jax.lax.axis_size(a)
      w_RxV = jnp.moveaxis(w_RxV.reshape(*w_RxV.shape[:-1], n, -1), -2, 0)  # [the share for device i along a, ...]
      w_RxV = jax.lax.all_to_all(w_RxV, a, 0, 0)
    else:
      w_RxV = jax.lax.all_gather(w_RxV, a, axis=0)
  lead = order[::-1]
  w_RxV = w_RxV.transpose(*[lead.index(a) for a in rows], *range(len(rows), w_RxV.ndim))
  return w_RxV.reshape(-1, w_RxV.shape[-1])


def _over(reduce, x, axes):
  return reduce(x, axes) if axes else x


def _varying(x, axes):  # x, invariant over `axes` so far, as varying over them
  return jax.lax.pcast(x, axes, to="varying") if axes else x


@jax.custom_vjp
def head_logits(h_BxCxD: jax.Array, w_DxV: jax.Array) -> jax.Array:
  """Float32 logits of the output head. Its backward casts the logits' cotangent to the compute
  dtype (h's) first, so both gradient matmuls run there, accumulating in float32, instead of as
  float32 matmuls; the log-sum-exp and the loss stay in float32. It computes the gradient of
  only what is differentiated: not the head's when it is frozen (train.trainable=mtp)."""
  return jnp.einsum("bcd,dv->bcv", h_BxCxD, w_DxV, preferred_element_type=jnp.float32)


def _head_logits_fwd(h, w):  # symbolic zeros: each argument says whether it is differentiated
  return head_logits(h.value, w.value), (h.value, w.value, h.perturbed, w.perturbed)


def _head_logits_bwd(res, g_BxCxV):
  h_BxCxD, w_DxV, dh_needed, dw_needed = res
  g_BxCxV = g_BxCxV.astype(h_BxCxD.dtype)
  dh = dw = None
  if dh_needed:
    dh = jnp.einsum("bcv,dv->bcd", g_BxCxV, w_DxV, preferred_element_type=jnp.float32).astype(h_BxCxD.dtype)
  if dw_needed:
    dw = jnp.einsum("bcd,bcv->dv", h_BxCxD, g_BxCxV, preferred_element_type=jnp.float32).astype(w_DxV.dtype)
  return dh, dw


head_logits.defvjp(_head_logits_fwd, _head_logits_bwd, symbolic_zeros=True)


def mtp_weight(step: jax.Array, base: float, schedule: list[tuple[int, float]]) -> jax.Array:
  """lambda at `step`: `base`, replaced by each (from_step, weight) once reached."""
  w = jnp.asarray(base, jnp.float32)
  for from_step, weight in schedule:
    w = jnp.where(step >= from_step, weight, w)
  return w
