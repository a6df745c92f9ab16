"""Self-speculative decoding: the model's own MTP depths draft, its trunk verifies.

Each round drafts K tokens per row, scores all of them with one trunk `step` over K + 1 tokens
(the last committed token and the drafts), keeps each row's accepted prefix plus one corrected
(or bonus) token, and rolls every cache back past the rejected ones by lowering row lengths.
Greedy output is the greedy plain output; sampled output follows Leviathan et al. / Chen et al.
(2023), so it is distributed as plain sampling is. MTP.md ("Speculative decoding") explains
which positions each draft cache holds.

Notation: a row has committed tokens t_0 .. t_{n-1}; the trunk has processed t_0 .. t_{n-2}
(its cache length L = n - 1), and t_{n-1} is the token it must read next.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from mtp_jax.generate import cache as cache_lib
from mtp_jax.generate import decode
from mtp_jax.generate.cache import Cache
from mtp_jax.generate.sample import filtered_probs, sample
from mtp_jax.model import Transformer
from mtp_jax.model.attention import cached_mask


@dataclasses.dataclass(frozen=True)
class SpecStats:
  """Counts over all rows. The prefill, and the first token of each row that it produces, are
  left out of `forward_passes` and `decoded_tokens` alike, so plain decoding reads exactly one
  pass per token (less only where a row stopped at eos)."""

  new_tokens: int  # tokens returned, all rows
  decoded_tokens: int  # of those, the ones produced after the prefill
  forward_passes: int  # main-model passes after the prefill, one per row per round it took part in
  rounds: int  # batched main-model calls after the prefill
  acceptance: tuple[float, ...]  # per draft position j: of the drafts proposed there, the share accepted
  mean_accepted: float  # drafts accepted per row-round
  wall_s: float  # execution only (compiled beforehand), measured outside jit after block_until_ready

  @property
  def passes_per_token(self) -> float:
    return self.forward_passes / max(self.decoded_tokens, 1)

  @property
  def tokens_per_s(self) -> float:
    return self.new_tokens / self.wall_s if self.wall_s > 0 else float("nan")


@struct.dataclass
class SpecState:
  """Where a speculative run stands after `rounds` rounds: the decoding loop's carry, and what it
  ends with, for `speculative_generate` and for inspection in tests."""

  seq_BxS: jax.Array  # prompt, then committed tokens (and stale drafts beyond each row's end)
  count_B: jax.Array  # new tokens each row returns
  trunk: Cache  # length_B = committed tokens - 1: every committed token but the last was read
  rounds: jax.Array
  row_rounds: jax.Array  # forward passes counted per row
  accepted_K: jax.Array  # per draft position, row-rounds whose draft there was accepted
  done_B: jax.Array  # rows that emitted eos or max_new_tokens
  # What drafts the next round. Sequential modules: (the trunk's hidden states h0 at every
  # position so far, the modules' caches); parallel heads: (the next drafts' logits, the heads' caches).
  drafter: tuple
  trace: Trace | None = None  # with run(..., trace=True)


@struct.dataclass
class Trace:
  """Every round's drafts, for tests that check them against the training forward: round r
  (row b) drafted `drafts_RxBxK[r, b]` from `logits_RxBxKxV[r, b]` at trunk length `last_RxB[r, b]`
  (the query position is last - 1), where `active_RxB` is set. R = max_new_tokens bounds the rounds."""

  last_RxB: jax.Array
  active_RxB: jax.Array
  drafts_RxBxK: jax.Array
  logits_RxBxKxV: jax.Array


def check(model: Transformer, draft_tokens: int | None, reuse: bool) -> int:
  """The number of drafts per round, or a ValueError saying why these settings cannot draft."""
  depth = model.mtp_depth
  if depth == 0:
    raise ValueError("speculative decoding drafts with the MTP depths, and this model has model.mtp.depth=0")
  k = depth if draft_tokens is None else draft_tokens
  if k < 1:
    raise ValueError(f"draft_tokens must be at least 1, got {k}")
  if k > depth and not reuse:
    raise ValueError(f"draft_tokens={k} exceeds the MTP depth {depth}; pass reuse=True to reuse the modules in turn")
  if k > depth and model.mtp_kind == "parallel":
    raise ValueError(
      f"draft_tokens={k} exceeds the MTP depth {depth}: parallel heads each predict one fixed offset "
      "from the trunk state, so they cannot be chained past it (only sequential modules can be reused)"
    )
  return k


def run(
  model: Transformer,
  prompts: list[list[int]],
  max_new_tokens: int,
  *,
  draft_tokens: int | None = None,
  reuse: bool = False,
  temperature: float = 0.0,
  top_p: float = 1.0,
  seed: int = 0,
  eos_id: int | None = None,
  trace: bool = False,
) -> tuple[SpecState, float]:
  """(final state, execution seconds): `speculative_generate` without turning the state into
  lists; `trace` also records every round's drafts (`Trace`)."""
  k = check(model, draft_tokens, reuse)
  tokens_BxP, lengths_B = decode.pad_prompts(prompts, max_new_tokens)
  graphdef, state = nnx.split(decode.dropless(model))
  args = (graphdef, state, tokens_BxP, lengths_B, np.int32(-1 if eos_id is None else eos_id), jax.random.key(seed))
  settings = dict(
    max_new_tokens=max_new_tokens, draft_tokens=k, temperature=float(temperature), top_p=float(top_p), trace=trace
  )
  # Timed apart from the run. Lowering and compiling again with the same shapes and settings
  # hits JAX's caches (milliseconds), so repeated calls do not recompile.
  compiled = _speculative.lower(*args, **settings).compile()
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args[1:]))
  return out, time.perf_counter() - start


def speculative_generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, **kwargs):
  """(new tokens of each prompt, SpecStats): as `decode.generate` returns them (up to
  max_new_tokens, ending at the first eos_id, kept), drafted by the MTP depths. Keywords:
  draft_tokens (default: the MTP depth), reuse (draft more than the depth with sequential
  modules reused in turn), temperature, top_p, seed, eos_id. One compiled program per shape
  and settings."""
  out, wall_s = run(model, prompts, max_new_tokens, **kwargs)
  seq_BxS, count_B = np.asarray(out.seq_BxS), np.asarray(out.count_B)
  tokens = [list(map(int, row[len(p) : len(p) + c])) for row, p, c in zip(seq_BxS, prompts, count_B, strict=True)]
  row_rounds = int(out.row_rounds)
  accepted_K = np.asarray(out.accepted_K)
  stats = SpecStats(
    new_tokens=int(count_B.sum()),
    decoded_tokens=int(count_B.sum()) - len(prompts),
    forward_passes=row_rounds,
    rounds=int(out.rounds),
    acceptance=tuple(float(a) / max(row_rounds, 1) for a in accepted_K),
    mean_accepted=float(accepted_K.sum()) / max(row_rounds, 1),
    wall_s=wall_s,
  )
  return tokens, stats


def plain_generate_with_stats(model: Transformer, prompts: list[list[int]], max_new_tokens: int, **kwargs):
  """(tokens, SpecStats) of `decode.generate`, timed the same way, for comparison: one pass
  per token after the first, nothing drafted."""
  decode.generate(model, prompts, max_new_tokens, **kwargs)  # compiles; the timed call reuses it
  start = time.perf_counter()
  tokens = decode.generate(model, prompts, max_new_tokens, **kwargs)  # returns host lists: already done
  wall_s = time.perf_counter() - start
  n = sum(map(len, tokens))
  lengths = [len(t) for t in tokens]
  stats = SpecStats(n, n - len(tokens), n - len(tokens), max(lengths) - 1, (), 0.0, wall_s)
  return tokens, stats


def _trunk(model: Transformer, tokens_BxT: jax.Array, cache: Cache):
  """(logits, final-normed hidden, branch, cache): `decode.step` plus the state entering the
  last block, which the parallel heads read."""
  hidden_BxTxD, layers, branch_BxTxD = model.decode(
    tokens_BxT, cache_lib.positions(cache, tokens_BxT.shape[1]), cache.layers
  )
  cache = Cache(layers=layers, length_B=cache.length_B + tokens_BxT.shape[1])
  return model.logits(hidden_BxTxD), hidden_BxTxD, branch_BxTxD, cache


def _rows(x_BxTx_, index_B):
  """x[b, index[b]] for every row."""
  return jnp.take_along_axis(x_BxTx_, index_B.reshape(-1, *([1] * (x_BxTx_.ndim - 1))), axis=1)[:, 0]


def _put(buf_BxSx_, new_BxTx_, positions_BxT):
  rows_Bx1 = jnp.arange(buf_BxSx_.shape[0])[:, None]
  return buf_BxSx_.at[rows_Bx1, positions_BxT].set(new_BxTx_.astype(buf_BxSx_.dtype), mode="drop")


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
    logits_BxV = model.logits(module.norm(_rows(h_BxWxD, query_B)[:, None]))[:, 0]
    token_B = pick(j, logits_BxV)
    seq_BxS = _put(seq_BxS, token_B[:, None], (query_pos_B + 1 + j)[:, None])
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


def _accept(logits_BxTxV, drafts_BxK, draft_logits_BxKxV, key, temperature, top_p):
  """(accepted drafts per row, the token after them). Greedy: drafts are accepted while they
  equal the verifier's argmax, which is then the next token. Sampled (Leviathan et al. 2023,
  Chen et al. 2023): draft x_j ~ q_j is accepted with probability min(1, p_j(x_j) / q_j(x_j));
  at the first rejection the token is drawn from norm(max(0, p_j - q_j)), and after K accepted
  from p_{K+1}, so every token is distributed as p, the verifier's filtered distribution."""
  b, t, v = logits_BxTxV.shape
  k = t - 1
  if temperature == 0.0:
    target_BxT = jnp.argmax(logits_BxTxV, -1).astype(jnp.int32)
    ok_BxK = drafts_BxK == target_BxT[:, :k]
    accepted_B = jnp.sum(jnp.cumprod(ok_BxK, axis=1), axis=1)
    return accepted_B, _rows(target_BxT, accepted_B)
  p_BxTxV = filtered_probs(logits_BxTxV.reshape(b * t, v), temperature, top_p).reshape(b, t, v)
  q_BxKxV = filtered_probs(draft_logits_BxKxV.reshape(b * k, v), temperature, top_p).reshape(b, k, v)
  p_x_BxK = jnp.take_along_axis(p_BxTxV[:, :k], drafts_BxK[..., None], -1)[..., 0]
  q_x_BxK = jnp.take_along_axis(q_BxKxV, drafts_BxK[..., None], -1)[..., 0]
  key_u, key_next = jax.random.split(key)
  ok_BxK = jax.random.uniform(key_u, (b, k)) * q_x_BxK < p_x_BxK  # u < p / q, q(x) > 0 as x ~ q
  accepted_B = jnp.sum(jnp.cumprod(ok_BxK, axis=1), axis=1)
  # q is zero past the drafts, so after K accepted the residual is p_{K+1} itself: the bonus token.
  q_BxTxV = jnp.concatenate([q_BxKxV, jnp.zeros((b, 1, v), q_BxKxV.dtype)], axis=1)
  p_BxV, q_BxV = _rows(p_BxTxV, accepted_B), _rows(q_BxTxV, accepted_B)
  residual_BxV = jnp.maximum(p_BxV - q_BxV, 0.0)
  total_Bx1 = residual_BxV.sum(-1, keepdims=True)
  # All-zero residual means p <= q everywhere, i.e. p == q, where nothing is ever rejected.
  next_BxV = jnp.where(total_Bx1 > 0, residual_BxV / jnp.where(total_Bx1 > 0, total_Bx1, 1.0), p_BxV)
  return accepted_B, jax.random.categorical(key_next, jnp.log(next_BxV), axis=-1).astype(jnp.int32)


@functools.partial(
  jax.jit, static_argnames=("graphdef", "max_new_tokens", "draft_tokens", "temperature", "top_p", "trace")
)
def _speculative(
  graphdef, state, tokens_BxP, lengths_B, stop, key, *, max_new_tokens, draft_tokens, temperature, top_p, trace
):
  model = nnx.merge(graphdef, state)
  b, p = tokens_BxP.shape
  k, sequential = draft_tokens, model.mtp_kind == "sequential"
  window = 2 * k  # see MTP.md: enough for every draft-dependent slot to be rewritten once settled
  s = p + max_new_tokens + window  # verification reaches position n - 1 + K, n <= P + max_new_tokens - 1
  steps_T = jnp.arange(k + 1, dtype=jnp.int32)
  seq_BxS = jnp.zeros((b, s), jnp.int32).at[:, :p].set(tokens_BxP)

  def pick(round_key, j, logits_BxV):
    return sample(logits_BxV, jax.random.fold_in(round_key, j), temperature, top_p)

  # Prefill: the trunk reads the prompts (padding too, left stale by the rollback); its first
  # token comes from plain sampling, so n = prompt length + 1 and L = prompt length. MLA layers
  # up-project their caches there, as `decode.prefill` does; the rounds attend absorbed.
  full = decode.absorbing(model, False)
  trunk = cache_lib.allocate(model.empty_cache(b, s), b)
  logits_BxPxV, hidden_BxPxD, branch_BxPxD, trunk = _trunk(full, tokens_BxP, trunk)
  trunk = cache_lib.rollback(trunk, lengths_B)
  first_B = pick(jax.random.fold_in(key, 0), 0, _rows(logits_BxPxV, lengths_B - 1))
  seq_BxS = _put(seq_BxS, first_B[:, None], lengths_B[:, None])
  if sequential:
    modules = [model.mtp_module(j) for j in range(1, k + 1)]  # reuse: module ((j-1) mod modules)+1
    full_modules = [full.mtp_module(j) for j in range(1, k + 1)]  # the same, for the prefill
    drafts = cache_lib.allocate([m.block.empty_cache(b, s) for m in modules], b)
    h0_BxSxD = jnp.zeros((b, s, hidden_BxPxD.shape[-1]), hidden_BxPxD.dtype).at[:, :p].set(hidden_BxPxD)
    # Every prompt slot, so that slots the first round's window does not reach are settled.
    prompt_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    argmax = lambda j, logits_BxV: jnp.argmax(logits_BxV, -1).astype(jnp.int32)  # these drafts are discarded
    *_, layers = _chain(full, full_modules, seq_BxS, h0_BxSxD, drafts.layers, prompt_BxP, lengths_B - 1, argmax)
    extra = (h0_BxSxD, drafts.replace(layers=layers, length_B=trunk.length_B))
  else:
    heads = list(model.mtp)[:k]
    drafts = cache_lib.allocate([h.empty_cache(b, s) for h in heads], b)
    outs, layers = _heads(full, list(full.mtp)[:k], branch_BxPxD, cache_lib.positions(drafts, p), drafts.layers)
    draft_logits_BxKxV = model.logits(jnp.stack([_rows(o, lengths_B - 1) for o in outs], 1))
    extra = (
      draft_logits_BxKxV,
      cache_lib.rollback(drafts.replace(layers=layers, length_B=drafts.length_B + p), lengths_B),
    )

  count_B = jnp.ones((b,), jnp.int32)
  done_B = (first_B == stop) | (max_new_tokens <= 1)
  zero = jnp.zeros((), jnp.int32)
  rounds_trace = None
  if trace:
    r_ = max_new_tokens  # every round but the last emits at least one token of each active row
    v = logits_BxPxV.shape[-1]
    rounds_trace = Trace(
      jnp.zeros((r_, b), jnp.int32),
      jnp.zeros((r_, b), bool),
      jnp.zeros((r_, b, k), jnp.int32),
      jnp.zeros((r_, b, k, v), jnp.float32),
    )
  start = SpecState(
    seq_BxS, count_B, trunk, zero, zero, jnp.zeros((k,), jnp.int32), done_B, drafter=extra, trace=rounds_trace
  )

  def more(state: SpecState):
    return ~jnp.all(state.done_B)

  def one(state: SpecState) -> SpecState:
    seq_BxS, trunk, extra = state.seq_BxS, state.trunk, state.drafter
    r, count_B, done_B = state.rounds, state.count_B, state.done_B
    round_key = jax.random.fold_in(key, r + 1)
    last_B = trunk.length_B  # L = n - 1: t_{n-1} sits at position L, the drafts at L + 1 .. L + K
    if sequential:
      h0_BxSxD, drafts = extra
      start_B = jnp.maximum(last_B - window, 0)
      pos_BxW = start_B[:, None] + jnp.arange(window, dtype=jnp.int32)[None]
      drafts_BxK, draft_logits_BxKxV, seq_BxS, layers = _chain(
        model,
        modules,
        seq_BxS,
        h0_BxSxD,
        drafts.layers,
        pos_BxW,
        last_B - 1 - start_B,
        functools.partial(pick, round_key),
      )
      drafts = drafts.replace(layers=layers)
    else:
      draft_logits_BxKxV, drafts = extra
      drafts_BxK = jnp.stack([pick(round_key, j, draft_logits_BxKxV[:, j - 1]) for j in range(1, k + 1)], 1)
      seq_BxS = _put(seq_BxS, drafts_BxK, last_B[:, None] + 1 + steps_T[None, :k])

    # Verify: one trunk pass over t_{n-1} and the K drafts, at positions L .. L + K.
    positions_BxT = last_B[:, None] + steps_T[None]
    logits_BxTxV, hidden_BxTxD, branch_BxTxD, trunk = _trunk(
      model, jnp.take_along_axis(seq_BxS, positions_BxT, 1), trunk
    )
    accepted_B, next_B = _accept(
      logits_BxTxV, drafts_BxK, draft_logits_BxKxV, jax.random.fold_in(round_key, k + 1), temperature, top_p
    )
    active_B = ~done_B
    seq_BxS = _put(seq_BxS, jnp.where(active_B, next_B, stop)[:, None], (last_B + 1 + accepted_B)[:, None])

    # Emit t_n .. t_{n+a}, cut at max_new_tokens and after the first eos.
    emitted_BxT = jnp.take_along_axis(seq_BxS, jnp.minimum(positions_BxT + 1, s - 1), 1)
    allowed_BxT = (
      (steps_T[None] <= accepted_B[:, None]) & (count_B[:, None] + steps_T[None] < max_new_tokens) & active_B[:, None]
    )
    stops_BxT = allowed_BxT & (emitted_BxT == stop)
    first_stop_B = jnp.argmax(stops_BxT, axis=1)
    emitted_B = jnp.where(stops_BxT.any(1), first_stop_B + 1, allowed_BxT.sum(1))
    count_B = count_B + emitted_B
    done_B = done_B | stops_BxT.any(1) | (count_B >= max_new_tokens)

    # Roll back past the rejected drafts: the trunk has now read t_{n-1} and the accepted ones.
    length_B = jnp.where(active_B, last_B + 1 + accepted_B, last_B)
    trunk = cache_lib.rollback(trunk, length_B)
    if sequential:
      h0_BxSxD = _put(h0_BxSxD, hidden_BxTxD, positions_BxT)
      extra = (h0_BxSxD, drafts.replace(length_B=length_B))  # the window rewrites its slots; see MTP.md
    else:
      outs, layers = _heads(model, heads, branch_BxTxD, positions_BxT, drafts.layers)
      # The next drafts read position n' - 2 = L + a, index a of this pass: its query saw only accepted slots.
      next_logits_BxKxV = model.logits(jnp.stack([_rows(o, accepted_B) for o in outs], 1))
      extra = (next_logits_BxKxV, Cache(layers=layers, length_B=trunk.length_B))  # rolled back with the trunk
    accepted_K = state.accepted_K + jnp.sum(active_B[:, None] & (steps_T[None, :k] < accepted_B[:, None]), 0)
    t = state.trace
    if trace:
      t = Trace(
        t.last_RxB.at[r].set(last_B),
        t.active_RxB.at[r].set(active_B),
        t.drafts_RxBxK.at[r].set(drafts_BxK),
        t.logits_RxBxKxV.at[r].set(draft_logits_BxKxV.astype(jnp.float32)),
      )
    return SpecState(
      seq_BxS,
      count_B,
      trunk,
      r + 1,
      state.row_rounds + active_B.sum(),
      accepted_K,
      done_B,
      drafter=extra,
      trace=t,
    )

  return jax.lax.while_loop(more, one, start).replace(drafter=())  # the drafter's caches stay inside
