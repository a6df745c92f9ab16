"""The MoE layer and its gradients, compiled on a mesh or on one device: what the dispatch
tests (test_expert_parallel.py, test_moe_local.py) compare."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp_jax import sharding
from mtp_jax.model.moe import MoE, RouterBias

B, L = 8, 16


def inputs(cfg):
  x = jax.random.normal(jax.random.key(1), (B, L, cfg.model.d_model), jnp.float32)
  cot = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
  valid = jnp.ones((B, L), bool).at[3, 10:].set(False)  # padding is routed but not counted
  return x, cot, valid


def compiled(cfg, mesh=None):
  """(the compiled layer with gradients w.r.t. (params, x), its arguments), on the mesh or on
  one device; it returns ((loss, (y, aux)), grads)."""
  layer = MoE(cfg.model, rngs=nnx.Rngs(0))
  layer.router.bias[...] = jax.random.normal(jax.random.key(3), (cfg.model.moe.num_experts,)) * 0.05
  graphdef, params, bias = nnx.split(layer, nnx.Param, RouterBias)
  x, cot, valid = inputs(cfg)

  def loss(params, x):
    y, aux = nnx.merge(graphdef, params, bias)(x, valid)
    return jnp.sum(y * cot) + aux.balance_loss + aux.z_loss, (y, aux)

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  if mesh is None:
    return jax.jit(grad_fn).lower(params, x).compile(), (params, x)
  rules = cfg.mesh.rules

  def sharded(params, x):
    with sharding.activate(mesh, rules):
      return grad_fn(params, x)

  x_sharding = sharding.named(("act_batch", "act_length", "act_embed"), x.shape, mesh, rules)
  fn = jax.jit(sharded, in_shardings=(sharding.tree_shardings(params, mesh, rules), x_sharding))
  return fn.lower(params, x).compile(), (params, x)


def forward_and_grads(cfg, mesh=None):
  """(y, aux, grads w.r.t. (params, x)) of the MoE layer, on the mesh or on one device."""
  fn, args = compiled(cfg, mesh)
  (_, (y, aux)), grads = fn(*args)
  return y, aux, grads


def assert_same(one, many):
  y1, aux1, g1 = one
  y2, aux2, g2 = many
  np.testing.assert_allclose(y2, y1, rtol=1e-5, atol=1e-6)
  for k in ("balance_loss", "z_loss", "load", "dropped"):
    np.testing.assert_allclose(aux2[k], aux1[k], rtol=1e-5, err_msg=k)
  flat1, flat2 = jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g2)
  assert len(flat1) == len(flat2) == 8  # router; 3 routed-expert and 3 shared-expert weights; x
  for (path, a), b in zip(flat1, flat2, strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
