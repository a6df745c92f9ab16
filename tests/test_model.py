"""Causality, document isolation and MTP wiring of the model's forward pass."""

import functools
import typing

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward_logits
from flax import nnx

from mtp_jax.config.run import TrainConfig
from mtp_jax.model import Transformer
from mtp_jax.model.flops import cost

DEPTH = 2


def _forward(cfg):
  """jitted (tokens, segment_ids, positions) -> logits, M+1 x B x L x V."""
  graphdef, state = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0)))

  @jax.jit
  def run(tokens, segment_ids, positions):
    model = nnx.merge(graphdef, state)
    out = model(tokens, segment_ids, positions)
    return jnp.stack([model.logits(h) for h in out.hidden])

  return run


def _perturbations(length, vocab, seed=0):
  """Row 0 is a base sequence; row 1 + j changes only token j."""
  rng = np.random.default_rng(seed)
  base = rng.integers(0, vocab, length)
  rows = np.tile(base, (length + 1, 1))
  for j in range(length):
    rows[1 + j, j] = (base[j] + 1 + rng.integers(0, vocab - 1)) % vocab
  return jnp.asarray(rows, jnp.int32)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_changing_token_j_never_changes_an_earlier_output(tiny, attn, kind):
  cfg = tiny(f"model.attention.kind={attn}", f"model.mtp.kind={kind}", f"model.mtp.depth={DEPTH}")
  length = cfg.data.seq_len
  tokens = _perturbations(length, cfg.model.vocab_size)
  ones = jnp.ones_like(tokens)
  logits = np.asarray(_forward(cfg)(tokens, ones, jnp.cumsum(ones, 1) - 1))
  for depth in range(DEPTH + 1):
    # A sequential module k reads the embedding of token t+k, so its output at t is "at"
    # position t+k; parallel heads and the trunk read nothing past t.
    reach = depth if kind == "sequential" else 0
    for j in range(length):
      changed = np.abs(logits[depth, 1 + j] - logits[depth, 0]).max(-1)  # per position
      first = max(j - reach, 0)
      np.testing.assert_array_equal(changed[:first], 0, err_msg=f"depth {depth} saw token {j} early")
      assert changed[first] > 0, f"depth {depth} at position {first} ignores token {j}"


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_packed_documents_are_isolated_and_positions_restart(tiny, kind):
  cfg = tiny("model.attention.kind=mla", f"model.mtp.kind={kind}", f"model.mtp.depth={DEPTH}")
  length, split = cfg.data.seq_len, 6
  rng = np.random.default_rng(1)
  doc1, doc2 = rng.integers(1, 300, split), rng.integers(1, 300, length - split)
  packed = np.concatenate([doc1, doc2])
  seg = np.array([1] * split + [2] * (length - split))
  pos = np.concatenate([np.arange(split), np.arange(length - split)])
  alone = np.concatenate([doc2, np.zeros(split, int)])  # doc 2 first, then padding
  alone_seg = np.array([1] * (length - split) + [0] * split)
  other = packed.copy()
  other[:split] = rng.integers(1, 300, split)  # a different first document
  tokens = jnp.asarray(np.stack([packed, other, alone]), jnp.int32)
  segs = jnp.asarray(np.stack([seg, seg, alone_seg]), jnp.int32)
  positions = jnp.asarray(np.stack([pos, pos, np.arange(length)]), jnp.int32)
  logits = np.asarray(_forward(cfg)(tokens, segs, positions))
  np.testing.assert_array_equal(logits[:, 0, split:], logits[:, 1, split:])
  np.testing.assert_allclose(logits[:, 0, split:], logits[:, 2, : length - split], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "overrides",
  [
    [],
    ["model.attention.kind=mla", "model.attention.q_lora_rank=8"],
    ["model.mtp.kind=parallel", "model.mtp.depth=3", "model.tie_embeddings=true"],
    ["model.moe.num_experts=0", "model.mtp.depth=0"],
    ["model.mtp.use_moe=false", "model.moe.num_shared_experts=0"],
  ],
)
def test_flop_model_counts_every_parameter(tiny, overrides):
  cfg = tiny(*overrides)
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert cost(cfg.model, cfg.data.seq_len).total_params == real


def _logits_after(cfg, edit):
  """Per-depth logits of one random batch after `edit(model)` changes some weights."""
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  edit(model)
  tokens = jax.random.randint(jax.random.key(3), (2, cfg.data.seq_len), 0, cfg.model.vocab_size)
  graphdef, state = nnx.split(model)
  return np.asarray(forward_logits(graphdef, (state,), tokens))


def _scale(model, i):
  """Scales trunk block i's attention norm by 1.5 (in its stack, the other blocks left alone)."""
  r, j = next((r, i - a) for r, (a, b) in enumerate(model.runs) if a <= i < b)
  norm = model.layers[r].attn_norm
  norm.scale[...] = norm.scale[...].at[j].mul(1.5)


def _bump(norm):
  norm.scale[...] = norm.scale[...].at[0].mul(3.0)


def test_parallel_heads_branch_before_the_last_trunk_block(tiny):
  cfg = tiny("model.mtp.kind=parallel", f"model.mtp.depth={DEPTH}", "model.num_layers=3")
  base = _logits_after(cfg, lambda m: None)
  last = _logits_after(cfg, lambda m: _scale(m, 2))
  np.testing.assert_array_equal(base[1:], last[1:])  # extra heads never see the last block
  assert np.abs(base[0] - last[0]).max() > 0  # the next-token head is the last block
  shared = _logits_after(cfg, lambda m: _scale(m, 1))
  assert all(np.abs(base[d] - shared[d]).max() > 0 for d in range(DEPTH + 1))


def test_sequential_depth_one_reads_the_final_normed_state(tiny):
  cfg = tiny("model.mtp.kind=sequential", f"model.mtp.depth={DEPTH}", "model.tie_embeddings=true")
  base = _logits_after(cfg, lambda m: None)

  # The main model's final norm feeds module 1 (through hnorm, which removes a uniform scale,
  # so perturb one channel), and each module's own norm feeds only its own prediction.
  final = _logits_after(cfg, lambda m: _bump(m.final_norm))
  assert all(np.abs(base[d] - final[d]).max() > 0 for d in range(DEPTH + 1))
  own = _logits_after(cfg, lambda m: _bump(m.mtp[0].norm))
  np.testing.assert_array_equal(base[[0, 2]], own[[0, 2]])  # module 2 reads module 1's block output, pre-norm
  assert np.abs(base[1] - own[1]).max() > 0


def test_attention_in_query_blocks_equals_whole_attention():
  """Strided query blocks, each rematerialised: the same outputs and gradients as whole
  attention, for grouped heads and packed documents."""
  from mtp_jax.model.attention import attend, mask

  b, length, h, g, kdim, vdim = 2, 32, 4, 2, 8, 6
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (b, length, h, kdim))
  k = jax.random.normal(keys[1], (b, length, g, kdim))
  v = jax.random.normal(keys[2], (b, length, g, vdim))
  segments = jnp.asarray([[1] * 12 + [2] * 20, [1] * 32])
  m = mask(segments)
  cot = jax.random.normal(keys[3], (b, length, h, vdim))

  @functools.partial(jax.jit, static_argnums=0)
  def run(chunk):
    f = lambda q, k, v: jnp.sum(attend(q, k, v, m, kdim**-0.5, chunk) * cot)
    return attend(q, k, v, m, kdim**-0.5, chunk), jax.grad(f, argnums=(0, 1, 2))(q, k, v)

  whole, whole_grads = run(0)
  for chunk in (8, 16):
    out, grads = run(chunk)
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-6)
    for a, w in zip(grads, whole_grads, strict=True):
      np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "dim, theta, scaling",
  [
    # DeepSeek-V3's published rope_scaling, on its 64 RoPE dims
    (64, 10000.0, dict(factor=40, original_max_position_embeddings=4096, mscale=1.0, mscale_all_dim=1.0)),
    # Qwen3's recipe (no mscale keys: the cos/sin carry 0.1 ln 4 + 1), the ramp's ends not rounded
    (128, 1e6, dict(factor=4, original_max_position_embeddings=32768, beta_fast=16, truncate=False)),
  ],
)
def test_yarn_frequencies_are_transformers(dim, theta, scaling):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

  from mtp_jax.config import RopeScaling
  from mtp_jax.model.layers import Rope

  hf = transformers.PretrainedConfig(
    hidden_size=dim, num_attention_heads=1, head_dim=dim, max_position_embeddings=1 << 20
  )
  hf.rope_parameters = {"rope_type": "yarn", "rope_theta": theta, **scaling}
  theirs, their_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
  ours, our_factor = Rope(dim, theta, RopeScaling(**scaling)).frequencies()
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
  assert our_factor == pytest.approx(their_factor, rel=1e-12)
  plain, _ = Rope(dim, theta).frequencies()
  ratio = ours / plain  # the fast dimensions kept, the slow ones stretched by the factor
  assert ratio[0] == 1 and ratio[-1] == pytest.approx(1 / scaling["factor"], rel=1e-5)


def test_a_shared_mtp_module_is_one_module_applied_at_every_depth(tiny):
  """model.mtp.share_weights: the depths' logits are those of separate modules holding one
  module's weights, and only that one module is stored (and counted)."""
  over = ("model.mtp.depth=3", "model.init_std=0.2")
  shared = Transformer(tiny(*over, "model.mtp.share_weights=true").model, rngs=nnx.Rngs(0))
  separate = Transformer(tiny(*over).model, rngs=nnx.Rngs(0))
  assert len(shared.mtp) == 1 and len(separate.mtp) == 3
  for module in separate.mtp:  # the same draws came first, so the trunk and module 1 already agree
    nnx.update(module, nnx.state(shared.mtp[0]))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 320, (2, 16)), jnp.int32)
  ones = jnp.ones_like(tokens)
  a, b = (m(tokens, ones, jnp.cumsum(ones, 1) - 1) for m in (shared, separate))
  assert len(a.hidden) == 4 and set(a.aux) == set(b.aux)
  for x, y in zip(a.hidden, b.hidden, strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  cfg = tiny(*over, "model.mtp.share_weights=true").model
  real = sum(x.size for x in jax.tree.leaves(nnx.state(shared, nnx.Param)))
  assert cost(cfg, 16).total_params == real


def test_partial_rotary_turns_the_first_dims_as_glm_does(tiny):
  """model.attention.partial_rotary_factor: RoPE (rotate-half) on each head's first dims, the rest
  passed through, as transformers' Glm4Moe applies it."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from transformers.models.glm4_moe import modeling_glm4_moe as glm

  from mtp_jax.model import attention

  over = ("model.attention.head_dim=16", "model.attention.partial_rotary_factor=0.5", "model.attention.rope_theta=500")
  gqa = attention.GQA(tiny(*over).model, rngs=nnx.Rngs(0))
  hf = transformers.Glm4MoeConfig(
    hidden_size=64,
    num_attention_heads=4,
    partial_rotary_factor=0.5,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
  )
  x_BxLxHxK = np.random.default_rng(0).normal(size=(2, 12, 4, 16)).astype(np.float32)
  positions = np.tile(np.arange(12), (2, 1))
  xt = torch.from_numpy(x_BxLxHxK).transpose(1, 2)
  cos, sin = glm.Glm4MoeRotaryEmbedding(hf)(xt, torch.from_numpy(positions))
  theirs, _ = glm.apply_rotary_pos_emb(xt, xt, cos, sin)
  ours = np.asarray(gqa._rope(jnp.asarray(x_BxLxHxK), jnp.asarray(positions)))
  np.testing.assert_allclose(ours, theirs.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(ours[..., 8:], x_BxLxHxK[..., 8:])


def test_qkv_biases_are_parameters_that_act_and_are_not_decayed(tiny):
  from mtp_jax.train import optimizer, step

  cfg = tiny("model.attention.qkv_bias=true", "model.init_std=0.2")
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  _, params, _ = step.split(model)
  assert cost(cfg.model, cfg.data.seq_len).total_params == sum(x.size for x in jax.tree.leaves(params))
  decays = optimizer.decay_mask(params)
  bias = decays["layers"][0]["attn"]["bias"]
  assert not any(bias[n].get_value() for n in ("q", "k", "v")) and decays["layers"][0]["attn"]["wq"].get_value()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 320, (2, 16)), jnp.int32)
  ones = jnp.ones_like(tokens)
  before = model(tokens, ones, jnp.cumsum(ones, 1) - 1).hidden[0]
  for n in ("q", "k", "v"):
    b = model.layers[0].attn.bias[n]
    b[...] = b[...] + 0.5
  after = model(tokens, ones, jnp.cumsum(ones, 1) - 1).hidden[0]
  assert np.abs(np.asarray(after - before)).max() > 1e-2


@pytest.mark.parametrize("mode", ["capacity", "dropless"])
def test_train_remat_save_names_every_checkpoint_name_the_blocks_carry(tiny, mode):
  """train.remat_save offers exactly the checkpoint names a block's forward carries, and
  train.remat_offload those and a scanned stack's `layer_in`, so none they offer keeps nothing
  and a renamed one is noticed."""
  cfg = tiny(f"model.moe.mode={mode}", "model.num_layers=3")  # two MoE layers: a stack scanned
  tokens = jnp.zeros((1, 8), jnp.int32)

  def carried(scan_layers: bool) -> set[str]:
    graphdef, state = nnx.split(Transformer(cfg.model, rngs=nnx.Rngs(0), scan_layers=scan_layers))
    return set(names(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens, tokens + 1, tokens).hidden)(state).jaxpr))

  def names(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "name":
        yield eqn.params["name"]
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        yield from names(sub)

  def offered(field: str) -> set[str]:
    return set(typing.get_args(typing.get_args(TrainConfig.model_fields[field].annotation)[0]))

  assert carried(scan_layers=False) == offered("remat_save")
  assert carried(scan_layers=True) == offered("remat_offload") == offered("remat_save") | {"layer_in"}
