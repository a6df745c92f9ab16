"""sharding.fsdp_einsum: a weight stored split along two dimensions over the axes that split the
batch, gathered and multiplied in one shard_map on 8 CPU devices, against the plain product."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from mtp_jax import hlo, sharding
from mtp_jax.config import MESH_AXES

X_NAMES, W_NAMES = ("act_batch", None, None, None), ("heads", None, "embed")  # an output projection
RULES = {"heads": ["fsdp"], "embed": ["expert"], "act_batch": ["fsdp", "expert"]}  # as 671B's


def test_a_weight_split_two_ways_over_the_batch_axes_is_gathered_and_reduce_scattered_back():
  """H over fsdp 2 and D over expert 4: the value and gradients equal the plain product's, the
  weight arrives by all-gathers, and its gradient leaves by reduce-scatters, with no all-reduce
  of the whole weight (left to the compiler, XLA sums the whole gradient, and on TPU gathers
  the weight by an all-reduce of a zero-padded buffer)."""
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, 2, 1, 4, 1), MESH_AXES)
  w = jax.random.normal(jax.random.key(0), (4, 8, 16))
  x = jax.random.normal(jax.random.key(1), (8, 3, 4, 8))

  def loss(x, w, split: bool):
    if not split:
      return jnp.sum(jnp.tanh(jnp.einsum("blhv,hvd->bld", x, w)) ** 2)
    with sharding.activate(mesh, RULES):
      return jnp.sum(jnp.tanh(sharding.fsdp_einsum("blhv,hvd->bld", x, X_NAMES, w, W_NAMES)) ** 2)

  want = jax.value_and_grad(loss, argnums=(0, 1))(x, w, False)
  w_split = jax.device_put(w, sharding.named(W_NAMES, w.shape, mesh, RULES))
  x_split = jax.device_put(x, NamedSharding(mesh, sharding.spec(X_NAMES, x.shape, mesh, RULES)))
  assert tuple(w_split.sharding.spec) == ("fsdp", None, "expert")
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  got = step(x_split, w_split, True)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, h in zip(got[1], want[1], strict=True):
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-6)
  comms = hlo.collectives(step.lower(x_split, w_split, True).compile().as_text())
  assert {"all-gather", "reduce-scatter"} <= set(comms.by_kind()), comms.each
  assert all(c.sent < w.size * 4 for c in comms.each if c.kind == "all-reduce"), comms.each
