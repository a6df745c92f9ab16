"""The output head and loss split by vocabulary on 8 fake devices: the same NLL, hits, argmax and
gradients as one device, without the whole head matrix on any device where the vocabulary splits
over fsdp, and with the head matrix's gradient reduce-scattered where it does not."""

import collections
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import needs_libtpu

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
  nll_K, hits_K, (top,) = losses.head_eval((h,), w, (t,), (m,), CHUNK)
  return value_grad(h, w), (nll_K[0], hits_K[0], top)


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
      ("expert", "fsdp"),  # expert sliced from the whole vocabulary, then fsdp's share moved from the stored rows
      ("fsdp", "expert"),
    ),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {}, ("tensor",), ()),  # the default: the vocabulary over tensor only
    # The head matrix's rows stored over fsdp and expert: fsdp's share of the vocabulary moved
    # from the rows by an all-to-all, then the rows gathered over expert, inside.
    ({"data": 1, "fsdp": 2, "expert": 4}, {**SPLIT, "embed": ["fsdp", "expert"]}, ("fsdp",), ("fsdp",)),
    (  # both moved from the rows
      {"data": 1, "fsdp": 2, "expert": 4},
      {"act_vocab": ["tensor", "fsdp", "expert"], "embed": ["fsdp", "expert"]},
      ("fsdp", "expert"),
      ("fsdp", "expert"),
    ),
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
  gathered = [a for a in sharding.axes_of(split.stored[0]) if a not in vocab]
  if split.gather and gathered:  # the head matrix's gradient is reduce-scattered to its rows, never all-reduced whole
    assert not re.search(rf"= \w+\[{D},{V // ways}\]\S* all-reduce", text)
  one = compiled_matmul_flops(jax.jit(_head).lower(h, w, t, m).compile().as_text()).flops
  assert compiled_matmul_flops(text).flops * mesh.size / one == pytest.approx(1.0, abs=0.05)


def test_the_depths_share_one_gathered_head_matrix():
  """`head_losses` runs every MTP depth through one shard_map: the head matrix is gathered once
  and its gradient, summed over the depths, leaves once (the head stored as 671B stores it: one
  all-to-all each way, where a shard_map per depth made two; XLA:TPU then sent the gradient
  twice a microbatch). Each depth's sums equal its own `head_cross_entropy`."""
  h, w, t, m = _inputs()
  cfg = MeshConfig(data=1, fsdp=2, expert=4, rules={**SPLIT, "embed": ["fsdp", "expert"]})
  with sharding.activate(sharding.make_mesh(cfg), cfg.rules):
    h2, t2 = h[:, ::-1] * 0.5, jnp.roll(t, 1, axis=1)
    nll_K, hits_K = jax.jit(lambda h, w: losses.head_losses((h, h2), w, (t, t2), (m, m), CHUNK))(h, w)
    one = jax.jit(lambda h, w, t: losses.head_cross_entropy(h, w, t, m, CHUNK))
    each = [one(x, w, y) for x, y in ((h, t), (h2, t2))]
    grads = jax.grad(lambda h, w: jnp.sum(losses.head_losses((h, h2), w, (t, t2), (m, m), CHUNK)[0]), (0, 1))
    jaxpr = jax.make_jaxpr(grads)(h, w).jaxpr
  np.testing.assert_allclose(nll_K, [n for n, _ in each], rtol=1e-6)
  np.testing.assert_array_equal(hits_K, [c for _, c in each])
  names = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.append(eqn.primitive.name)
      for v in eqn.params.values():
        for sub in v if isinstance(v, tuple | list) else [v]:
          sub = getattr(sub, "jaxpr", sub)  # a closed jaxpr's own
          if hasattr(sub, "eqns"):
            walk(sub)

  walk(jaxpr)
  # One shard_map and its transpose; one all-to-all and its transpose.
  assert names.count("shard_map") == 2 and names.count("all_to_all") == 2, collections.Counter(names)


@needs_libtpu
def test_the_head_stays_as_stored_through_the_optimizer_on_a_tpu():
  """The head matrix stored with its D rows over fsdp x expert (as 671B stores it) and split by
  vocabulary over fsdp in the loss: its gradient leaves the loss's shard_map as stored
  (`losses._all_rows`), so the optimizer's update moves nothing between layouts. Left to
  XLA:TPU, that move ran through whole float32 head matrices on every chip (671B on v5p-1024:
  two of 3.5 GiB, at the step's peak; benchmarks/RESULTS.md). Read from a one-layer step
  compiled for v5p-16: no [D, V] array anywhere in it."""
  code = """if True:
    from mtp_jax import topology as C, config
    topo = C.parse_topology("v5p-16")
    C.prepare_environment(topo)
    from mtp_jax.train.program import build
    over = ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "mesh.rules={embed: [fsdp, expert]}"]
    over += ["model.num_layers=1", "model.mtp.depth=0", "train.grad_accum_steps=1"]
    program = build(config.load("configs/tiny.yaml", over), C.devices(topo))
    assert "the output head's vocabulary splits over fsdp (vocab_split auto)" in program.notes, program.notes
    head = program.abstract_state.params["head"]
    assert tuple(head.sharding.spec) == (("fsdp", "expert"), None), head.sharding
    text = program.step.lower(program.abstract_state, program.abstract_batch()).compile().as_text()
    assert "all-to-all" in text  # the head's move of rows for its share of the vocabulary
    print(sum(f"[{head.shape[0]},{head.shape[1]}]" in line for line in text.splitlines()))
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().splitlines()[-1] == "0", out.stdout


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
