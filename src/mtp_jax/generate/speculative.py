"""Self-speculative decoding: the model's own MTP depths draft, its trunk verifies.

Each round drafts K tokens per row, scores all of them with one trunk `step` over K + 1 tokens
(the last committed token and the drafts), keeps each row's accepted prefix plus one corrected
(or bonus) token, and rolls every cache back past the rejected ones by lowering row lengths.
Greedy output is the greedy plain output; sampled output follows Leviathan et al. / Chen et al.
(2023), so it is distributed as plain sampling is. MTP.md ("Speculative decoding") explains
which positions each draft cache holds.

Notation: a row has committed tokens t_0 .. t_{n-1}; the trunk has processed t_0 .. t_{n-2}
(its cache length L = n - 1), and t_{n-1} is the token it must read next. Shape letters beyond
the package legend (model/__init__.py): P prompt slots · K drafts per round · T = K + 1 positions
one verification reads · R rounds (`Trace`).
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
from mtp_jax.generate import decode, drafters
from mtp_jax.generate.accept import accept, rows
from mtp_jax.generate.cache import Cache
from mtp_jax.generate.sample import sample
from mtp_jax.model import Transformer
from mtp_jax.model.attention import write_rows


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
  drafter: tuple  # what the drafter (drafters.py) carries to its next round; () once returned
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
  key = jax.random.key(seed)
  lowered, args = lower(model, tokens_BxP, lengths_B, key, max_new_tokens, k, eos_id, temperature, top_p, trace)
  # Timed apart from the run. Lowering and compiling again with the same shapes and settings
  # hits JAX's caches (milliseconds), so repeated calls do not recompile.
  compiled = lowered.compile()
  start = time.perf_counter()
  out = jax.block_until_ready(compiled(*args))
  return out, time.perf_counter() - start


def lower(
  model: Transformer,
  tokens_BxP,
  lengths_B,
  key,
  max_new_tokens: int,
  draft_tokens: int,
  eos_id: int | None,
  temperature: float = 0.0,
  top_p: float = 1.0,
  trace: bool = False,
):
  """(the speculative program lowered, the arguments it is called with): for `model` (its MoE
  layers dropless) and right-padded prompts, arrays or ShapeDtypeStructs (the in-training
  acceptance eval compiles ahead of time through `evaluate.lowered`); `draft_tokens` as `check`
  returns it."""
  graphdef, state = nnx.split(decode.dropless(model))
  args = (state, tokens_BxP, lengths_B, np.int32(-1 if eos_id is None else eos_id), key)
  settings = dict(
    max_new_tokens=max_new_tokens,
    draft_tokens=draft_tokens,
    temperature=float(temperature),
    top_p=float(top_p),
    trace=trace,
  )
  return _speculative.lower(graphdef, *args, **settings), args


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


@functools.partial(
  jax.jit, static_argnames=("graphdef", "max_new_tokens", "draft_tokens", "temperature", "top_p", "trace")
)
def _speculative(
  graphdef, state, tokens_BxP, lengths_B, stop, key, *, max_new_tokens, draft_tokens, temperature, top_p, trace
) -> SpecState:
  """Prefill, then rounds of draft -> verify -> accept -> emit -> roll back until every row is done."""
  model = decode.for_steps(nnx.merge(graphdef, state))  # on GPUs cast once, not at every round
  b, p = tokens_BxP.shape
  k = draft_tokens
  drafter = drafters.make(model, k)
  s = p + max_new_tokens + 2 * k  # verification reaches n - 1 + K <= P + max_new_tokens + K; MTP.md: the window
  steps_T = jnp.arange(k + 1, dtype=jnp.int32)

  def pick(round_key, j, logits_BxV):
    return sample(logits_BxV, jax.random.fold_in(round_key, j), temperature, top_p)

  # Prefill: the trunk reads the prompts (padding too, left stale by the rollback); its first
  # token comes from plain sampling, so n = prompt length + 1 and L = prompt length. MLA layers
  # up-project their caches there, as `decode.prefill` does; the rounds attend absorbed.
  full = decode.absorbing(model, False)
  trunk = cache_lib.allocate(model.empty_cache(b, s), b)
  logits_BxPxV, hidden_BxPxD, branch_BxPxD, trunk = _trunk(full, tokens_BxP, trunk)
  trunk = cache_lib.rollback(trunk, lengths_B)
  first_B = pick(jax.random.fold_in(key, 0), 0, rows(logits_BxPxV, lengths_B - 1))
  seq_BxS = write_rows(jnp.zeros((b, s), jnp.int32).at[:, :p].set(tokens_BxP), first_B[:, None], lengths_B[:, None])
  zero = jnp.zeros((), jnp.int32)
  start = SpecState(
    seq_BxS,
    count_B=jnp.ones((b,), jnp.int32),
    trunk=trunk,
    rounds=zero,
    row_rounds=zero,
    accepted_K=jnp.zeros((k,), jnp.int32),
    done_B=(first_B == stop) | (max_new_tokens <= 1),
    drafter=drafter.prefill(full, seq_BxS, hidden_BxPxD, branch_BxPxD, lengths_B),
    trace=_empty_trace(max_new_tokens, b, k, logits_BxPxV.shape[-1]) if trace else None,
  )

  def one(state: SpecState) -> SpecState:
    r, count_B, done_B, active_B = state.rounds, state.count_B, state.done_B, ~state.done_B
    round_key = jax.random.fold_in(key, r + 1)
    last_B = state.trunk.length_B  # L = n - 1: t_{n-1} sits at position L, the drafts at L + 1 .. L + K
    pick_now = functools.partial(pick, round_key)
    drafts_BxK, draft_logits_BxKxV, seq_BxS, carried = drafter.draft(state.drafter, state.seq_BxS, last_B, pick_now)

    # Verify: one trunk pass over t_{n-1} and the K drafts, at positions L .. L + K.
    positions_BxT = last_B[:, None] + steps_T[None]
    tokens_BxT = jnp.take_along_axis(seq_BxS, positions_BxT, 1)
    logits_BxTxV, hidden_BxTxD, branch_BxTxD, trunk = _trunk(model, tokens_BxT, state.trunk)
    key_accept = jax.random.fold_in(round_key, k + 1)
    accepted_B, next_B = accept(logits_BxTxV, drafts_BxK, draft_logits_BxKxV, key_accept, temperature, top_p)
    seq_BxS = write_rows(seq_BxS, jnp.where(active_B, next_B, stop)[:, None], (last_B + 1 + accepted_B)[:, None])

    # Emit t_n .. t_{n+a}, cut at max_new_tokens and after the first eos.
    emitted_BxT = jnp.take_along_axis(seq_BxS, jnp.minimum(positions_BxT + 1, s - 1), 1)
    allowed_BxT = (
      (steps_T[None] <= accepted_B[:, None]) & (count_B[:, None] + steps_T[None] < max_new_tokens) & active_B[:, None]
    )
    stops_BxT = allowed_BxT & (emitted_BxT == stop)
    count_B = count_B + jnp.where(stops_BxT.any(1), jnp.argmax(stops_BxT, axis=1) + 1, allowed_BxT.sum(1))
    done_B = done_B | stops_BxT.any(1) | (count_B >= max_new_tokens)

    # Roll back past the rejected drafts: the trunk has now read t_{n-1} and the accepted ones.
    trunk = cache_lib.rollback(trunk, jnp.where(active_B, last_B + 1 + accepted_B, last_B))
    carried = drafter.after_verify(carried, hidden_BxTxD, branch_BxTxD, positions_BxT, accepted_B, trunk.length_B)
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
      count_B=count_B,
      trunk=trunk,
      rounds=r + 1,
      row_rounds=state.row_rounds + active_B.sum(),
      accepted_K=accepted_K,
      done_B=done_B,
      drafter=carried,
      trace=t,
    )

  final = jax.lax.while_loop(lambda state: ~jnp.all(state.done_B), one, start)
  return final.replace(drafter=())  # the drafter's caches stay inside


def _trunk(model: Transformer, tokens_BxT: jax.Array, cache: Cache):
  """(logits, final-normed hidden, branch, cache): `decode.step` plus the state entering the
  last block, which the parallel heads read."""
  hidden_BxTxD, layers, branch_BxTxD = model.decode(
    tokens_BxT, cache_lib.positions(cache, tokens_BxT.shape[1]), cache.layers
  )
  cache = Cache(layers=layers, length_B=cache.length_B + tokens_BxT.shape[1])
  return model.logits(hidden_BxTxD), hidden_BxTxD, branch_BxTxD, cache


def _empty_trace(rounds: int, b: int, k: int, v: int) -> Trace:
  """Room for every round: each but the last emits at least one token of each active row."""
  return Trace(
    jnp.zeros((rounds, b), jnp.int32),
    jnp.zeros((rounds, b), bool),
    jnp.zeros((rounds, b, k), jnp.int32),
    jnp.zeros((rounds, b, k, v), jnp.float32),
  )
