"""Self-speculative decoding against plain decoding: greedy tokens, caches after rollback,
the sampled distribution, errors and statistics."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward_logits, tiny_config
from flax import nnx
from scipy import stats as scipy_stats

from mtp_jax.generate import cache as cache_lib
from mtp_jax.generate import decode, speculative
from mtp_jax.generate.decode import generate, prefill
from mtp_jax.generate.sample import filtered_probs
from mtp_jax.generate.speculative import speculative_generate
from mtp_jax.model import Transformer

PROMPTS = [[3, 17, 40], [5, 9, 200, 31, 7, 66, 12], [250, 1, 2, 3, 4]]  # different lengths in one batch


def _model(*overrides, seed=0):
  return Transformer(tiny_config("model.init_std=0.2", *overrides).model, rngs=nnx.Rngs(seed))


# kind, attention, depth, draft_tokens, reuse: fewer, as many and more drafts than the depth.
CASES = [
  ("sequential", "mla", 2, None, False),
  ("sequential", "gqa", 2, 1, False),
  ("sequential", "gqa", 1, 3, True),
  ("parallel", "gqa", 2, None, False),
  ("parallel", "mla", 2, 1, False),
]


@pytest.mark.parametrize("kind,attention,depth,draft_tokens,reuse", CASES)
def test_greedy_speculative_equals_greedy_plain(kind, attention, depth, draft_tokens, reuse):
  model = _model(f"model.mtp.kind={kind}", f"model.attention.kind={attention}", f"model.mtp.depth={depth}")
  want = generate(model, PROMPTS, 9)
  got, stats = speculative_generate(model, PROMPTS, 9, draft_tokens=draft_tokens, reuse=reuse)
  print(kind, attention, depth, draft_tokens, stats)
  assert got == want
  eos = want[1][3]  # row 1 stops at its 4th token; the others wherever eos first appears
  stopped, _ = speculative_generate(model, PROMPTS, 9, draft_tokens=draft_tokens, reuse=reuse, eos_id=eos)
  assert stopped == generate(model, PROMPTS, 9, eos_id=eos)
  assert stopped[1] == want[1][:4]


def _predictable_model(attention_scale=0.0):
  """A model whose next token is a fixed function of the current one, and whose MTP modules know
  it: every block's attention and FFN outputs are zeroed (so each block is the identity), and
  each module's projection passes only the embedding half through. Module k then sees
  RMSNorm(Emb(t_{i+k})), exactly what the trunk's head sees when predicting t_{i+k+1}, so its
  drafts are accepted because they are right, not because acceptance is forced. A nonzero
  `attention_scale` keeps that much of each attention output, so context (and every cache)
  matters again and only some drafts are right."""
  model = _model("model.moe.num_experts=0", "model.attention.kind=gqa", "model.mtp.depth=2")
  for block in [*model.layers, *(m.block for m in model.mtp)]:  # a stack: every block of it
    block.attn.wo[...] = attention_scale * block.attn.wo[...]
    block.ffn.w_down[...] = jnp.zeros_like(block.ffn.w_down[...])
  for module in model.mtp:
    d = module.eh_proj.shape[1]
    module.eh_proj[...] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], axis=0)
  return model


def test_trunk_cache_after_rejections_equals_a_plain_cache_of_the_accepted_tokens():
  model = _predictable_model(attention_scale=0.2)
  out, _ = speculative.run(model, PROMPTS, 12, draft_tokens=3, reuse=True)
  row_rounds, accepted_K = int(out.row_rounds), np.asarray(out.accepted_K)
  print("accepted per position", accepted_K, "of", row_rounds)
  assert 0 < accepted_K[0] < row_rounds  # some drafts accepted, some rejected
  length_B = np.asarray(out.trunk.length_B)
  seq_BxL = np.asarray(out.seq_BxS)[:, : length_B.max()]
  empty = cache_lib.allocate(model.empty_cache(len(PROMPTS), out.seq_BxS.shape[1]), len(PROMPTS))
  fresh = prefill(model, seq_BxL, length_B, empty)[2]
  for got, want in zip(jax.tree.leaves(out.trunk.layers), jax.tree.leaves(fresh.layers), strict=True):
    for b, n in enumerate(length_B):
      np.testing.assert_allclose(got[b, :n], want[b, :n], rtol=1e-5, atol=1e-6)
  assert speculative_generate(model, PROMPTS, 12, draft_tokens=3, reuse=True)[0] == generate(model, PROMPTS, 12)


def test_accepted_drafts_cut_forward_passes_and_stats_match_the_tokens():
  model = _predictable_model()
  want = generate(model, PROMPTS, 10)
  got, stats = speculative_generate(model, PROMPTS, 10, draft_tokens=3, reuse=True)
  print(stats, stats.passes_per_token)
  assert got == want
  assert all(0.0 <= a <= 1.0 for a in stats.acceptance)
  assert min(stats.acceptance) > 0.9
  assert stats.passes_per_token < 0.5
  # Each row-round emits its accepted drafts plus one token, less what max_new_tokens cut off
  # in a row's last round (at most the 3 drafts).
  made = stats.forward_passes + stats.mean_accepted * stats.forward_passes
  assert stats.decoded_tokens <= made + 1e-9 < stats.decoded_tokens + 3 * len(PROMPTS) + 1
  assert stats.new_tokens == sum(map(len, got)) == 30
  # Acceptance is nested: a draft is accepted only after all earlier ones were.
  assert all(x >= y for x, y in itertools.pairwise(stats.acceptance))
  plain_tokens, plain = speculative.plain_generate_with_stats(model, PROMPTS, 10)
  assert plain_tokens == want and plain.passes_per_token == 1.0


@pytest.mark.parametrize(
  "kind,attention,shared", [("sequential", "mla", False), ("parallel", "gqa", False), ("sequential", "gqa", True)]
)
def test_every_draft_is_the_training_forwards_prediction_at_its_depth(kind, attention, shared):
  """Draft j of a round, whose committed tokens are t_0 .. t_{n-1}, must be what the training
  forward's depth j predicts at position n - 2 over those tokens followed by the round's
  earlier drafts (which sequential depth j reads as Emb(t_{n-2+j})). Sampled drafts and
  frequent rejections exercise the chain, the rollback and the recomputed window. One module
  shared by the depths (model.mtp.share_weights) drafts every depth, as training applies it."""
  share = f"model.mtp.share_weights={shared}"
  model = _model(f"model.mtp.kind={kind}", f"model.attention.kind={attention}", "model.mtp.depth=2", share)
  assert len(model.mtp) == (1 if shared else 2)
  max_new = 10
  out, _ = speculative.run(model, PROMPTS, max_new, temperature=1.0, seed=3, trace=True)
  t = jax.device_get(out.trace)
  seq_BxS, k = np.asarray(out.seq_BxS), t.drafts_RxBxK.shape[2]
  rounds, rows = np.nonzero(t.active_RxB)
  assert len(rounds) >= 2 * len(PROMPTS) and np.asarray(out.accepted_K)[0] < len(rounds)  # rejections happened
  length = max(map(len, PROMPTS)) + max_new + k
  tokens_NxS = np.zeros((len(rounds), length), np.int32)
  for i, (r, b) in enumerate(zip(rounds, rows, strict=True)):
    last = t.last_RxB[r, b]  # t_{n-1} sits at position last; the drafts follow it
    tokens_NxS[i, : last + 1 + k] = np.concatenate([seq_BxS[b, : last + 1], t.drafts_RxBxK[r, b]])
  ones = jnp.ones_like(tokens_NxS)  # one document; what follows the drafts cannot be attended to
  hidden = decode.dropless(model)(tokens_NxS, ones, jnp.cumsum(ones, 1) - 1).hidden
  query_N = t.last_RxB[rounds, rows] - 1
  for j in range(1, k + 1):
    want_NxV = model.logits(hidden[j][np.arange(len(rounds)), query_N][:, None])[:, 0]
    got_NxV = t.logits_RxBxKxV[rounds, rows, j - 1]
    print(j, "max |diff|", np.abs(got_NxV - want_NxV).max())
    np.testing.assert_allclose(got_NxV, want_NxV, rtol=1e-4, atol=1e-4)


def _exact_joint(model, prompt, temperature, top_p, vocab):
  """P(first three new tokens) under plain sampling, from the uncached forward over every prefix."""
  pairs = np.array(list(itertools.product(range(vocab), repeat=2)), np.int32)
  tokens_NxL = np.concatenate([np.tile(np.array(prompt, np.int32), (len(pairs), 1)), pairs], axis=1)
  graphdef, state = nnx.split(model)
  logits_NxLxV = forward_logits(graphdef, (state,), tokens_NxL)[0]
  p = len(prompt)
  probs = [np.asarray(filtered_probs(logits_NxLxV[:, p - 1 + i], temperature, top_p)) for i in range(3)]
  joint = np.zeros((vocab,) * 3)
  for n, (a, b) in enumerate(pairs):
    joint[a, b] = probs[0][n, a] * probs[1][n, b] * probs[2][n]
  return joint.reshape(-1)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_sampled_speculative_tokens_follow_the_plain_sampling_distribution(kind):
  vocab, rows, temperature, top_p, prompt = 8, 4000, 0.8, 0.9, [1, 2, 3]
  cfg = tiny_config(f"model.mtp.kind={kind}", "model.mtp.depth=2", "model.init_std=0.5").model
  # A vocabulary of 8 (below the byte-level data's 257, which only training needs) keeps 512 cells.
  model = Transformer(cfg.model_copy(update={"vocab_size": vocab, "eos_id": vocab - 1}), rngs=nnx.Rngs(0))
  want = _exact_joint(model, prompt, temperature, top_p, vocab)
  got, stats = speculative_generate(model, [prompt] * rows, 3, temperature=temperature, top_p=top_p, seed=1)
  print(kind, stats)
  assert 0.05 < stats.acceptance[0] < 0.95  # both the accept and the residual path are exercised
  cells = np.array([a * vocab * vocab + b * vocab + c for a, b, c in got])
  observed = np.bincount(cells, minlength=vocab**3)
  # Pearson's chi-square, cells expected below 5 pooled into one. Under the null hypothesis
  # (speculative sampling draws from the plain distribution) the statistic is asymptotically
  # chi-square with (cells - 1) degrees of freedom, so this threshold fails a correct
  # implementation with probability 1e-3.
  expected = rows * want
  big = expected >= 5
  obs = np.append(observed[big], observed[~big].sum())
  exp = np.append(expected[big], expected[~big].sum())
  assert observed[want == 0].sum() == 0, "a token outside the top-p nucleus was produced"
  chi2 = float(((obs - exp) ** 2 / np.maximum(exp, 1e-12)).sum())
  threshold = scipy_stats.chi2.ppf(1 - 1e-3, len(obs) - 1)
  print(f"chi2 {chi2:.1f} over {len(obs)} cells, threshold {threshold:.1f}")
  assert chi2 < threshold


def test_settings_that_cannot_draft_are_refused():
  model = _model("model.mtp.depth=1")
  with pytest.raises(ValueError, match="exceeds the MTP depth 1; pass reuse=True"):
    speculative_generate(model, PROMPTS, 4, draft_tokens=2)
  with pytest.raises(ValueError, match=r"model\.mtp\.depth=0"):
    speculative_generate(_model("model.mtp.depth=0"), PROMPTS, 4)
  with pytest.raises(ValueError, match="parallel heads"):
    speculative_generate(_model("model.mtp.kind=parallel"), PROMPTS, 4, draft_tokens=2, reuse=True)
