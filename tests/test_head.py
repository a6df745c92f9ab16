"""The output head and loss split by vocabulary on 8 fake devices: the same NLL, hits, argmax and
gradients as one device, without the whole head matrix on any device where the vocabulary splits
over fsdp, and with the head matrix's gradient reduce-scattered where it does not."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtp_jax import sharding
from mtp_jax.config import MeshConfig
from mtp_jax.model.flops import compiled_matmul_flops
from mtp_jax.train import losses

B, L, D, V, CHUNK = 8, 16, 16, 64, 4


def _inputs():
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(D, V)) / 4, jnp.float32)
  t = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32)
  m = jnp.asarray(rng.random((B, L)) > 0.3)
  return h, w, t, m


def _head(h, w, t, m):
  """(NLL sum, its gradients by h and w), hits, argmax: all the head's outputs."""
  value_grad = jax.value_and_grad(lambda h, w: losses.head_cross_entropy(h, w, t, m, CHUNK)[0], (0, 1))
  return value_grad(h, w), losses.head_eval(h, w, t, m, CHUNK)


SPLIT = {"act_vocab": ["tensor", "fsdp"]}


@pytest.mark.parametrize(
  "axes, rules, vocab, gather",
  [
    ({"data": 1, "fsdp": 8}, SPLIT, ("fsdp",), ("fsdp",)),
    ({"data": 2, "fsdp": 4}, SPLIT, ("fsdp",), ("fsdp",)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, SPLIT, ("tensor", "fsdp"), ("fsdp",)),
    ({"data": 2, "fsdp": 2, "sequence": 2}, SPLIT, ("fsdp",), ("fsdp",)),
    (
      {"data": 1, "fsdp": 2, "expert": 4},
      {"act_vocab": ["tensor", "fsdp", "expert"]},
      ("fsdp", "expert"),
      ("fsdp", "expert"),
    ),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {}, ("tensor",), ()),  # the default: the vocabulary over tensor only
    # The head matrix's rows stored over fsdp and expert: gathered over expert inside.
    ({"data": 1, "fsdp": 2, "expert": 4}, {**SPLIT, "embed": ["fsdp", "expert"]}, ("fsdp",), ("fsdp",)),
    ({"data": 8}, SPLIT, (), ()),
  ],
)
def test_the_head_split_by_vocabulary_equals_one_device(axes, rules, vocab, gather):
  h, w, t, m = _inputs()
  (want_nll, want_grads), want_eval = _head(h, w, t, m)
  cfg = MeshConfig(**axes, rules=rules)
  mesh = sharding.make_mesh(cfg)
  with sharding.activate(mesh, cfg.rules):
    split = losses.vocab_split(V, h.shape)
    assert split.vocab == vocab and split.gather == gather
    place = (sharding.named(("act_batch", "act_length", None), h.shape, mesh, cfg.rules),)
    place += (sharding.named(("embed", "vocab"), w.shape, mesh, cfg.rules),)
    # A new function each case: JAX's trace cache knows nothing of the active rules, and two cases share a mesh.
    fn = jax.jit(lambda *a: _head(*a)).lower(*(jax.device_put(x, s) for x, s in zip((h, w), place, strict=True)), t, m)
    fn = fn.compile()
  (nll, grads), (eval_nll, hits, top) = fn(h, w, t, m)
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5)
  np.testing.assert_allclose(eval_nll, want_nll, rtol=1e-5)
  for got, ref in zip(grads, want_grads, strict=True):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  assert float(hits) == float(want_eval[1])
  np.testing.assert_array_equal(top, want_eval[2])  # the first maximum, across vocabulary slices
  text = fn.as_text()
  ways = int(np.prod([mesh.shape[a] for a in vocab]))
  if ways > 1:  # no device holds the whole head matrix or its gradient (only its own rows of it), or whole logits
    assert not re.search(rf"\[{D},{V}\]|,{CHUNK},{V}\]", text), "a whole-vocabulary array on one device"
  if (
    split.gather and split.rows
  ):  # the head matrix's gradient is reduce-scattered to each device's rows, never all-reduced whole
    assert not re.search(rf"= \w+\[{D},{V // ways}\]\S* all-reduce", text)
  one = compiled_matmul_flops(jax.jit(_head).lower(h, w, t, m).compile().as_text()).flops
  assert compiled_matmul_flops(text).flops * mesh.size / one == pytest.approx(1.0, abs=0.05)


def test_the_split_skips_axes_that_do_not_divide_the_vocabulary():
  cfg = MeshConfig(data=1, fsdp=8, tensor=1, rules=SPLIT)
  with sharding.activate(sharding.make_mesh(cfg), cfg.rules):
    assert losses.vocab_split(V + 4, (B, L, D)).vocab == ()  # 68 does not split 8 ways
    assert losses.vocab_split(V, (B, L, D)).vocab == ("fsdp",)
  assert losses.vocab_split(V, (B, L, D)) is None  # no mesh: the one-device program


def test_vocab_split_auto_splits_wherever_fsdp_divides_the_vocabulary(tiny):
  """mesh.vocab_split: auto (as true) adds fsdp to act_vocab wherever fsdp splits the batch and
  divides the vocabulary, and says so; false keeps the head whole."""
  from mtp_jax.train.program import build

  def act_vocab(*overrides):
    program = build(tiny("mesh.data=2", "mesh.fsdp=4", *overrides))
    return program.cfg.mesh.rules["act_vocab"], program.notes

  rules, notes = act_vocab()  # the tests' model: a head of 0.22x the blocks' parameters
  assert rules == ["tensor", "fsdp"]
  assert "the output head's vocabulary splits over fsdp (vocab_split auto)" in notes, notes
  rules, notes = act_vocab("mesh.vocab_split=true")
  assert rules == ["tensor", "fsdp"] and "the output head's vocabulary splits over fsdp (vocab_split true)" in notes
  assert act_vocab("mesh.vocab_split=false")[0] == ["tensor"]
  assert act_vocab("model.vocab_size=322")[0] == ["tensor"]  # 322 does not split 4 ways
  assert act_vocab("mesh.fsdp=1", "mesh.data=8")[0] == ["tensor"]  # no fsdp axis: nothing to split
