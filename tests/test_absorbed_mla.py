"""Absorbed MLA decoding (`attention.absorbed_attend`) against up-projecting the cached latent:
the prefill, the logits of decode steps, greedy plain and speculative tokens.

Tolerance: in float32 the two paths compute the same attention with their float sums in another
order. Over the steps below the logits differ by about 2e-6 where they reach about 5, so
max |diff| <= 1e-5 x max |logit| (the bound tests/test_generate.py holds the cache to) leaves
room for the machine's reordering while a wrong fold misses it by orders of magnitude
(`test_a_wrong_w_uk_fold_is_caught`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward_logits, tiny_config
from flax import nnx

from mtp_jax.config import AttentionConfig
from mtp_jax.generate import cache as cache_lib
from mtp_jax.generate import decode
from mtp_jax.generate.speculative import speculative_generate
from mtp_jax.model import Transformer, attention

# Float32 (the tiny default), a query latent, one sequential MTP module (the default kind).
CFG = ("model.init_std=0.2", "model.attention.kind=mla", "model.attention.q_lora_rank=8", "model.mtp.depth=1")
B, P, S = 2, 6, 11  # rows, padded prompt length, cache slots
PROMPT_LENGTHS = np.array([6, 4], np.int32)  # row 1's padding is written, then must stay invisible
STEPS = (1, 1, 3)  # one-token steps, then a verification-sized one; row 0 ends at slot 6 + 5 - 1
REL = 1e-5


def _decoder():
  """A newly jitted (so newly traced) fn(graphdef, state, tokens_BxS) -> (logits of the prefill
  BxPxV, logits of the steps BxTxV): the prompts prefilled, then each row's next tokens of
  `tokens_BxS` read in steps of STEPS tokens."""

  def run(graphdef, state, tokens_BxS):
    model = nnx.merge(graphdef, state)
    cache = cache_lib.allocate(model.empty_cache(B, S), B)
    _, hidden_BxPxD, cache = decode.prefill(model, tokens_BxS[:, :P], jnp.asarray(PROMPT_LENGTHS), cache)
    steps = []
    for t in STEPS:
      pos_BxT = cache.length_B[:, None] + jnp.arange(t)[None]
      logits_BxTxV, _, cache = decode.step(model, jnp.take_along_axis(tokens_BxS, pos_BxT, 1), cache)
      steps.append(logits_BxTxV)
    return model.logits(hidden_BxPxD), jnp.concatenate(steps, 1)

  return jax.jit(run, static_argnums=0)


_DECODE = _decoder()


def _decode(model, tokens_BxS, run=_DECODE):
  return [np.asarray(x) for x in run(*nnx.split(model), tokens_BxS)]


def _step_positions():
  """BxT positions the steps' logits stand for."""
  return PROMPT_LENGTHS[:, None] + np.arange(sum(STEPS))[None]


def _rel_diff(got, want) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


class Models:
  """The same weights decoding absorbed (the default) and up-projected (`absorb=false`), with a
  token sequence and the logits that both decoding paths and the full forward give for it."""

  def __init__(self):
    self.model = Transformer(tiny_config(*CFG).model, rngs=nnx.Rngs(0))
    self.ref = Transformer(tiny_config(*CFG, "model.attention.absorb=false").model, rngs=nnx.Rngs(0))
    self.tokens_BxS = np.random.default_rng(0).integers(0, 320, (B, S)).astype(np.int32)
    self.prefill, self.steps = _decode(self.model, self.tokens_BxS)
    self.ref_prefill, self.ref_steps = _decode(self.ref, self.tokens_BxS)
    graphdef, state = nnx.split(self.model)
    full_BxSxV = np.asarray(forward_logits(graphdef, (state,), self.tokens_BxS)[0])
    self.full_steps = np.take_along_axis(full_BxSxV, _step_positions()[..., None], 1)


@pytest.fixture(scope="module")
def models():
  return Models()


def _mla_flags(model):
  return [m.absorb for _, m in nnx.iter_graph(model) if isinstance(m, attention.MLA)]


def test_absorbed_is_the_default_and_the_config_or_absorbing_turns_it_off(models):
  assert AttentionConfig().absorb
  assert _mla_flags(models.model) == [True] * 3  # the two trunk stacks and the MTP block
  assert _mla_flags(models.ref) == [False] * 3
  for a, b in zip(jax.tree.leaves(nnx.state(models.model)), jax.tree.leaves(nnx.state(models.ref)), strict=True):
    np.testing.assert_array_equal(a, b)  # the knob changes no weight
  assert decode.absorbing(models.model, True) is models.model
  off = decode.absorbing(models.model, False)
  assert _mla_flags(off) == [False] * 3 and _mla_flags(models.model) == [True] * 3
  assert off.layers[0].attn.wkv_b.get_value() is models.model.layers[0].attn.wkv_b.get_value()  # shared, not copied


def test_the_prefill_keeps_the_up_projected_path(models):
  np.testing.assert_array_equal(models.prefill, models.ref_prefill)


def test_decode_step_logits_match_the_up_projected_path_and_the_full_forward(models):
  absorbed_vs_up = _rel_diff(models.steps, models.ref_steps)
  print(
    f"max |logit| {np.abs(models.ref_steps).max():.2f}; max |diff| / that: absorbed vs up-projected "
    f"{absorbed_vs_up:.1e}, absorbed vs full forward {_rel_diff(models.steps, models.full_steps):.1e}"
  )
  assert 0 < absorbed_vs_up <= REL  # 0 would mean both ran the same path
  assert _rel_diff(models.steps, models.full_steps) <= REL
  assert _rel_diff(models.ref_steps, models.full_steps) <= REL


def test_a_wrong_w_uk_fold_is_caught(models, monkeypatch):
  """The comparison above detects a fold of W_uk with its heads rolled by one."""
  real = attention.absorbed_attend

  def wrong(q_BxLxHxK, cache, wkv_b_RxHxK, mask_BxLxS, scale):
    nope = q_BxLxHxK.shape[-1] - cache.k_rope_BxSxK.shape[-1]
    rolled = jnp.concatenate([jnp.roll(wkv_b_RxHxK[..., :nope], 1, axis=1), wkv_b_RxHxK[..., nope:]], -1)
    return real(q_BxLxHxK, cache, rolled, mask_BxLxS, scale)

  monkeypatch.setattr(attention, "absorbed_attend", wrong)
  prefill, steps = _decode(models.model, models.tokens_BxS, _decoder())  # traced anew, with the wrong fold
  np.testing.assert_array_equal(prefill, models.prefill)  # the prefill never folds
  print(f"wrong fold: max |diff| / max |logit| {_rel_diff(steps, models.ref_steps):.1e}")
  assert _rel_diff(steps, models.ref_steps) > 100 * REL


PROMPTS = [[3, 17, 40], [5, 9, 200, 31, 7, 66, 12], [250, 1, 2, 3, 4]]


def _drafting_model(*overrides):
  """A dense tiny MLA model whose MTP module drafts some tokens right (tests/test_speculative.py's
  `_predictable_model`): every FFN output zeroed, attention outputs scaled by 0.2 (so the context
  and the caches matter), the module's projection passing only the embedding half through."""
  model = Transformer(tiny_config(*CFG, "model.moe.num_experts=0", *overrides).model, rngs=nnx.Rngs(0))
  for block in [*model.layers, *(m.block for m in model.mtp)]:
    block.attn.wo[...] = 0.2 * block.attn.wo[...]
    block.ffn.w_down[...] = jnp.zeros_like(block.ffn.w_down[...])
  d = model.mtp[0].eh_proj.shape[1]
  model.mtp[0].eh_proj[...] = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], axis=0)
  return model


def test_greedy_plain_and_speculative_tokens_equal_the_up_projected_path():
  model, ref = _drafting_model(), _drafting_model("model.attention.absorb=false")
  want = decode.generate(ref, PROMPTS, 12)
  assert decode.generate(model, PROMPTS, 12) == want
  got, stats = speculative_generate(model, PROMPTS, 12)
  print(stats)
  assert 0 < stats.acceptance[0] < 1  # rounds that roll the caches back past a rejected draft, and ones that do not
  assert got == want
