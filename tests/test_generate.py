"""KV-cached decoding against the uncached forward: logits, greedy tokens, rollback, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.generate import cache as cache_lib
from mtp_jax.generate.decode import generate, prefill, step
from mtp_jax.generate.sample import filtered_probs, sample
from mtp_jax.model import Transformer

B, P, S = 3, 8, 16  # rows, padded prompt length, cache (and reference sequence) length
PROMPT_LENGTHS = np.array([5, 3, 8], np.int32)

# Each config adds a twist: qk_norm and the parallel MTP kind (whose last block is the
# next-token head); capacity-mode MoE, which decoding must replace by dropless (with a factor
# of E / K nothing overflows, so the uncached reference is the same maths); a query latent.
CONFIGS = {
  "gqa": ["model.attention.kind=gqa", "model.attention.qk_norm=true", "model.mtp.kind=parallel"],
  "mla": ["model.attention.kind=mla", "model.moe.mode=capacity", "model.moe.capacity_factor=4"],
  "mla_q_lora": ["model.attention.kind=mla", "model.attention.q_lora_rank=8"],
}


class Decoder:
  """One tiny model with its compiled uncached forward, prefill and steps."""

  def __init__(self, cfg):
    self.model = Transformer(cfg.model, rngs=nnx.Rngs(0))
    for i, (_, moe) in enumerate(self.model.moe_layers()):  # a trained-looking router bias
      moe.router.bias[...] = 0.1 * jax.random.normal(jax.random.key(i), moe.router.bias.shape)
    self.vocab = cfg.model.vocab_size
    graphdef, state = nnx.split(self.model)

    @jax.jit
    def forward(tokens_BxL):
      model = nnx.merge(graphdef, state)
      ones = jnp.ones_like(tokens_BxL)
      return model.logits(model(tokens_BxL, ones, jnp.cumsum(ones, 1) - 1).hidden[0])

    @jax.jit
    def start(tokens_BxP, lengths_B):
      model = nnx.merge(graphdef, state)
      return prefill(model, tokens_BxP, lengths_B, cache_lib.allocate(model.empty_cache(B, S), B))

    @jax.jit
    def advance(tokens_BxT, cache):
      return step(nnx.merge(graphdef, state), tokens_BxT, cache)

    self.forward, self.start, self.advance = forward, start, advance


@pytest.fixture(scope="module", params=list(CONFIGS))
def decoder(request):
  from conftest import tiny_config

  return Decoder(tiny_config("model.init_std=0.2", *CONFIGS[request.param]))


def _tokens(rng, vocab, shape):
  return rng.integers(0, vocab, shape).astype(np.int32)


def _assert_close(got, want, rel, what):
  scale = np.abs(want).max()
  diff = np.abs(np.asarray(got) - np.asarray(want)).max()
  print(f"{what}: max |diff| {diff:.2e}, logits up to {scale:.2f}")
  assert diff <= rel * scale, f"{what}: max |diff| {diff} > {rel} x {scale}"


def test_cached_logits_equal_the_full_forward_at_every_position(decoder):
  rng = np.random.default_rng(0)
  seq_BxS = _tokens(rng, decoder.vocab, (B, S))
  want_BxSxV = np.asarray(decoder.forward(seq_BxS))
  # Right-padded prompts; the padding is junk that must never be seen.
  prompts_BxP = np.where(np.arange(P) < PROMPT_LENGTHS[:, None], seq_BxS[:, :P], _tokens(rng, decoder.vocab, (B, P)))
  _, hidden_BxPxD, cache = decoder.start(prompts_BxP, PROMPT_LENGTHS)
  got = {
    (b, t): decoder.model.logits(hidden_BxPxD[b : b + 1, t : t + 1])[0, 0]
    for b in range(B)
    for t in range(PROMPT_LENGTHS[b])
  }
  for t in [1, 1, 3]:  # one-token steps, then a three-token (verification-sized) step
    pos_BxT = np.asarray(cache.length_B)[:, None] + np.arange(t)
    logits_BxTxV, _, cache = decoder.advance(np.take_along_axis(seq_BxS, pos_BxT, 1), cache)
    got.update({(b, p): logits_BxTxV[b, j] for b in range(B) for j, p in enumerate(pos_BxT[b])})
  np.testing.assert_array_equal(cache.length_B, PROMPT_LENGTHS + 5)
  keys = sorted(got)
  _assert_close(np.stack([got[k] for k in keys]), np.stack([want_BxSxV[k] for k in keys]), 1e-5, "cached vs full")


def _greedy_uncached(decoder, prompts, new):
  """Each prompt continued by argmax of the full forward, re-run for every token."""
  seqs = [list(p) for p in prompts]
  for _ in range(new):
    tokens_BxS = np.zeros((B, S), np.int32)
    for row, s in zip(tokens_BxS, seqs, strict=True):
      row[: len(s)] = s
    logits_BxSxV = np.asarray(decoder.forward(tokens_BxS))
    for b, s in enumerate(seqs):
      s.append(int(logits_BxSxV[b, len(s) - 1].argmax()))
  return [s[len(p) :] for s, p in zip(seqs, prompts, strict=True)]


def test_batched_greedy_generation_equals_uncached_greedy_of_each_prompt(decoder):
  rng = np.random.default_rng(1)
  prompts = [list(_tokens(rng, decoder.vocab, n)) for n in (3, 7, 5)]
  want = _greedy_uncached(decoder, prompts, 6)
  assert generate(decoder.model, prompts, 6) == want
  # A row stops at its eos; the others are unaffected.
  eos = want[0][2]
  stopped = generate(decoder.model, prompts, 6, eos_id=eos)
  assert stopped[0] == want[0][:3]
  for got, full in zip(stopped[1:], want[1:], strict=True):
    assert got == (full[: full.index(eos) + 1] if eos in full else full)


def test_rolled_back_cache_equals_a_fresh_cache_of_the_accepted_tokens(decoder):
  rng = np.random.default_rng(2)
  prompts_BxP = _tokens(rng, decoder.vocab, (B, P))
  draft_Bx3, after_Bx3 = _tokens(rng, decoder.vocab, (B, 3)), _tokens(rng, decoder.vocab, (B, 3))
  accepted_B = np.array([1, 3, 0], np.int32)  # per row, as speculative verification would
  _, _, cache = decoder.start(prompts_BxP, PROMPT_LENGTHS)
  _, _, cache = decoder.advance(draft_Bx3, cache)
  cache = cache_lib.rollback(cache, PROMPT_LENGTHS + accepted_B)
  got_Bx3xV, _, cache = decoder.advance(after_Bx3, cache)
  np.testing.assert_array_equal(cache.length_B, PROMPT_LENGTHS + accepted_B + 3)

  fresh_BxP = prompts_BxP.copy()
  for b in range(B):
    n = PROMPT_LENGTHS[b]
    fresh_BxP[b, n : n + accepted_B[b]] = draft_Bx3[b, : accepted_B[b]]
  _, _, fresh = decoder.start(fresh_BxP, PROMPT_LENGTHS + accepted_B)
  want_Bx3xV, _, _ = decoder.advance(after_Bx3, fresh)
  _assert_close(got_Bx3xV, want_Bx3xV, 1e-6, "rolled back vs fresh")


def test_top_p_keeps_the_smallest_set_reaching_p():
  logits_1xV = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
  for top_p, want in [
    (0.5, [0, 1, 0, 0]),
    (0.8, [0, 0.625, 0, 0.375]),
    (0.81, [0.15 / 0.95, 0.5 / 0.95, 0, 0.3 / 0.95]),
    (1.0, [0.15, 0.5, 0.05, 0.3]),
  ]:
    np.testing.assert_allclose(filtered_probs(logits_1xV, 1.0, top_p)[0], want, rtol=1e-6, atol=1e-7)
  draws = jax.vmap(lambda k: sample(logits_1xV, k, 1.0, 0.8))(jax.random.split(jax.random.key(0), 2000))
  assert set(np.unique(draws)) == {1, 3}
  assert abs(float(np.mean(draws == 1)) - 0.625) < 0.05
  # Temperature 0 is the argmax; a low temperature sharpens towards it.
  np.testing.assert_array_equal(sample(logits_1xV, jax.random.key(0), 0.0), [1])
  assert float(filtered_probs(logits_1xV, 0.05)[0, 1]) > 0.999


def test_sampling_is_reproducible_by_seed(tiny):
  model = Transformer(tiny("model.init_std=0.2").model, rngs=nnx.Rngs(0))
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
  a = generate(model, prompts, 5, temperature=1.0, top_p=0.9, seed=3)
  assert a == generate(model, prompts, 5, temperature=1.0, top_p=0.9, seed=3)
  assert all(len(row) == 5 for row in a)


THREE = ["model.num_layers=3"]  # a dense layer, then a stack of two MoE layers


def _bf16_model(kind, *overrides):
  """A tiny bfloat16-compute model with float32 parameters, every parameter moved off its
  initial value: a norm scale of ones or a zero bias would survive a wrong cast unchanged. Its
  trunk: a dense layer, then a stack of two MoE layers (unless `overrides` say otherwise)."""
  from conftest import tiny_config

  cfg = tiny_config(
    "model.dtype=bfloat16", f"model.attention.kind={kind}", "model.attention.qkv_bias=true", *THREE, *overrides
  )
  graphdef, state = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))
  keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
  return nnx.merge(graphdef, jax.tree.map(lambda x: x + 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state))


def _loop_inputs(traced) -> list:
  """The abstract values every while loop of a traced program takes in (its constants and carry)."""
  out, todo = [], [traced.jaxpr.jaxpr]
  while todo:
    for eqn in todo.pop().eqns:
      if eqn.primitive.name == "while":
        out += [v.aval for v in eqn.invars]
      for p in jax.tree.leaves(list(eqn.params.values()), is_leaf=lambda p: hasattr(p, "eqns") or hasattr(p, "jaxpr")):
        if hasattr(p, "eqns") or hasattr(p, "jaxpr"):
          todo.append(getattr(p, "jaxpr", p))
  return out


def test_the_parallel_kind_held_a_block_at_a_time_gives_the_same_states_and_branch():
  """The parallel MTP kind keeps its last trunk block apart (its next-token head; the extra heads
  branch off the state entering it). Held a block at a time, the stack before that block is
  unstacked and the last block kept: decoding gives the same hidden states, caches and branch,
  bit for bit."""
  from mtp_jax.generate import decode

  model = decode.in_compute_dtype(_bf16_model("gqa", "model.mtp.kind=parallel", "model.num_layers=4"))
  blockwise = model.unstack()
  assert model.runs == ((0, 1), (1, 3), (3, 4)) and blockwise.runs == ((0, 1), (1, 2), (2, 3), (3, 4))

  def decoded(m):
    graphdef, state = nnx.split(m)

    @jax.jit
    def run(state, tokens_BxP):
      m = nnx.merge(graphdef, state)
      caches = cache_lib.allocate(m.empty_cache(B, S), B).layers
      return m.decode(tokens_BxP, jnp.broadcast_to(jnp.arange(P), (B, P)), caches)

    return jax.tree.leaves(run(state, _tokens(np.random.default_rng(5), 320, (B, P))))

  want, got = decoded(model), decoded(blockwise)
  assert len(got) == len(want) > 4  # hidden states, each block's cache, the branch
  for g, w in zip(got, want, strict=True):
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_decoding_reads_weights_cast_once_to_the_compute_dtype_with_the_same_logits(kind, monkeypatch):
  from conftest import tiny_config

  from mtp_jax import sharding
  from mtp_jax.generate import decode, speculative
  from mtp_jax.model.moe import MoE

  model = _bf16_model(kind)
  narrow = decode.in_compute_dtype(model)
  dtypes = {".".join(map(str, p)): v.get_value().dtype for p, v in nnx.to_flat_state(nnx.state(narrow))}
  kept = {n for n in dtypes if n.endswith("scale") or ".router." in n}  # read in float32 at every use
  assert kept and all(dtypes[n] == jnp.float32 for n in kept), dtypes
  assert all(dtypes[n] == jnp.bfloat16 for n in set(dtypes) - kept), dtypes
  assert decode.in_compute_dtype(narrow) is narrow
  f32 = Transformer(tiny_config(f"model.attention.kind={kind}").model, rngs=nnx.Rngs(0))
  assert decode.in_compute_dtype(f32) is f32  # nothing to cast
  # Held a block at a time: each trunk block a stack of its own; so held, the model itself.
  blockwise = narrow.unstack()
  assert narrow.runs == ((0, 1), (1, 3)) and blockwise.runs == ((0, 1), (1, 2), (2, 3)) and not blockwise.scanned
  assert blockwise.unstack() is blockwise
  # Decoding routes every MoE layer dropless, the blocks' too.
  capacity = Transformer(tiny_config("model.moe.mode=capacity", *THREE).model, rngs=nnx.Rngs(0)).unstack()
  modes = [m.cfg.mode for _, m in nnx.iter_graph(decode.dropless(capacity)) if isinstance(m, MoE)]
  assert len(modes) == 3 and set(modes) == {"dropless"}, modes  # two trunk blocks, the MTP module

  # The same logits, to the bit, from a prefill and a two-token step; a norm scale or the router
  # stored in bfloat16 changes them (routing flips).
  def logits(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, tokens_BxP):
      model = nnx.merge(graphdef, state)
      cache = cache_lib.allocate(model.empty_cache(B, S), B)
      last_BxV, _, cache = prefill(model, tokens_BxP, jnp.asarray(PROMPT_LENGTHS), cache)
      return last_BxV, step(model, tokens_BxP[:, :2], cache)[0]

    return run(state, _tokens(np.random.default_rng(3), 320, (B, P)))

  want = logits(model)
  for held in [narrow, blockwise]:  # the layers sliced out of their stacks once: the same blocks
    for got, w in zip(logits(held), want, strict=True):
      assert got.dtype == jnp.bfloat16
      np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(w, np.float32))

  # On a GPU the decoding loops take the weights cast and sliced layer by layer: a float32 weight
  # entering one is converted at every step or round, and a stack is sliced again at every step.
  # On a CPU, whose matmuls widen bfloat16 to float32 anyway, and a TPU, whose XLA hoists the
  # conversion, they take the model's own stacks. Traced only, as if for each platform.
  flat = [(".".join(map(str, p)), v.get_value().shape) for p, v in nnx.to_flat_state(nnx.state(model))]
  cast = {shape for n, shape in flat if n not in kept} - {shape for n, shape in flat if n in kept}
  stacks = {shape for n, shape in flat if n.startswith("layers.") and shape[0] > 1} - {s for n, s in flat if n in kept}
  blocks = {(1, *shape[1:]) for shape in stacks} - {shape for _, shape in flat}  # an MoE block, held alone
  graphdef, state = nnx.split(decode.dropless(model))
  args = (graphdef, state, np.zeros((B, P), np.int32), PROMPT_LENGTHS, np.int32(-1), jax.random.key(0))
  settings = dict(max_new_tokens=4, temperature=0.0, top_p=1.0)
  for platform in ["gpu", "tpu", "cpu"]:
    monkeypatch.setattr(sharding, "platform", lambda mesh=None, platform=platform: platform)
    decode._generate.clear_cache(), speculative._speculative.clear_cache()  # traced afresh
    for program in [
      decode._generate.trace(*args, **settings),
      speculative._speculative.trace(*args, **settings, draft_tokens=1, trace=False),
    ]:
      inputs = [a for a in _loop_inputs(program) if a.shape in cast | blocks]
      gpu = platform == "gpu"
      assert inputs and {a.dtype for a in inputs} == {jnp.dtype(jnp.bfloat16 if gpu else jnp.float32)}, inputs
      assert any(a.shape in stacks for a in inputs) != gpu and any(a.shape in blocks for a in inputs) == gpu, inputs
