"""The token embedding on 8 fake devices: the same rows and table gradient as one device, and no
device handed the whole batch's rows (or their gradient) to look up or scatter-add; inside a
data replica's shard_map, each device scatter-adds its replica's whole batch."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax import sharding
from mtp_jax.config import MeshConfig
from mtp_jax.model.layers import Embed

B, L, D, V = 8, 16, 32, 64


def _embed_and_grad(table_VxD, tokens_BxL, cot_BxLxD):
  """(the looked-up rows, the table's gradient under the cotangent `cot_BxLxD`)."""

  def lookup(table):
    embed = Embed(V, D, rngs=nnx.Rngs(0), std=0.02, dtype=jnp.float32, param_dtype=jnp.float32)
    embed.table[...] = table
    return embed(tokens_BxL)

  x, pullback = jax.vjp(lookup, table_VxD)
  return x, pullback(cot_BxLxD)[0]


def _inputs():
  """(table, tokens, cotangent), one token repeated in a row: the gradient sums over repeats."""
  rng = np.random.default_rng(0)
  table = jnp.asarray(rng.normal(size=(V, D)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, V, (B, L)), jnp.int32).at[0, :4].set(7)
  cot = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
  return table, tokens, cot


@pytest.mark.parametrize(
  "axes, rules",
  [
    ({"data": 2, "fsdp": 4}, {}),  # what XLA left to itself gathered: the batch over data and fsdp, D over fsdp
    ({"data": 1, "fsdp": 8}, {}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, {}),  # the vocabulary over tensor as well
    ({"data": 2, "fsdp": 2, "sequence": 2}, {}),
    ({"data": 2, "fsdp": 2, "sequence": 2}, {"embed": ["fsdp", "sequence"]}),  # D split by the sequence's axis too
    ({"data": 8}, {}),
  ],
)
def test_the_lookup_equals_one_device_and_moves_no_whole_batch(axes, rules):
  table, tokens, cot = _inputs()
  want_x, want_grad = jax.jit(_embed_and_grad)(table, tokens, cot)  # outside `activate`: no layouts pinned

  cfg = MeshConfig(**axes, rules=rules)
  mesh = sharding.make_mesh(cfg)
  with sharding.activate(mesh, cfg.rules):
    act = sharding.named(("act_batch", "act_length", "act_embed"), cot.shape, mesh, cfg.rules)
    args = (
      jax.device_put(table, sharding.named(("vocab", "embed"), table.shape, mesh, cfg.rules)),
      jax.device_put(tokens, sharding.named(("act_batch", "act_length"), tokens.shape, mesh, cfg.rules)),
      jax.device_put(cot, act),
    )
    # A new function: JAX's trace cache knows nothing of the active mesh and rules.
    fn = jax.jit(lambda *a: _embed_and_grad(*a)).lower(*args).compile()
  x, grad = fn(*args)
  np.testing.assert_array_equal(x, want_x)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)
  assert x.sharding.is_equivalent_to(act, 3)
  # Each device holds B / (the batch's ways) rows; none gathers the batch's rows of D, or a slice of D for all of them.
  gathered = re.findall(rf"= f32\[{B},{L},\d+\]\S* all-gather", fn.as_text())
  assert not gathered, gathered


@pytest.mark.parametrize("axes", [{"data": 2, "fsdp": 2, "expert": 2}, {"data": 2, "sequence": 2, "tensor": 2}])
def test_the_lookup_in_a_replica_keeps_its_tokens_whole(axes):
  """Inside a shard_map manual over data (train.step's per-replica microbatches): the rows and
  table gradient of one device, each device scatter-adding all its replica's gradient rows
  (sharding.lookup_layout: jaxlib 0.11 and 0.12 abort on the split these axes would get)."""
  table, tokens, cot = _inputs()
  want_x, want_grad = jax.jit(_embed_and_grad)(table, tokens, cot)

  cfg = MeshConfig(**axes)
  mesh = sharding.make_mesh(cfg)
  placed = []

  def replica(table, tokens, cot):
    with sharding.activate(jax.sharding.get_abstract_mesh(), cfg.rules):
      placed.append(sharding.lookup_layout(table.shape, tokens.shape))
      x, grad = _embed_and_grad(table, tokens, cot)
    return x, jax.lax.psum(grad, "data")

  rows, whole = jax.sharding.PartitionSpec("data"), jax.sharding.PartitionSpec()
  fn = jax.shard_map(
    replica, mesh=mesh, in_specs=(whole, rows, rows), out_specs=(rows, whole), axis_names={"data"}, check_vma=False
  )
  with sharding.activate(mesh, cfg.rules):
    args = (
      jax.device_put(table, sharding.named(("vocab", "embed"), table.shape, mesh, cfg.rules)),
      jax.device_put(tokens, jax.NamedSharding(mesh, rows)),
      jax.device_put(cot, jax.NamedSharding(mesh, rows)),
    )
    compiled = jax.jit(fn).lower(*args).compile()
  x, grad = compiled(*args)
  np.testing.assert_array_equal(x, want_x)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-6)
  # The tokens whole in the replica (traced once, for the compile): each device scatter-adds all
  # of its replica's gradient rows into its slice of the table.
  assert [layouts[0].spec for layouts in placed] == [whole]
