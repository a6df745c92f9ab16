"""The MoE layer against dense and brute-force references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mtp_jax.model.dispatch import capacity
from mtp_jax.model.experts import swiglu_blocked, swiglu_gmm, swiglu_ragged_dot
from mtp_jax.model.moe import MoE

B, L = 2, 16


def _layer(tiny, *overrides, seed=0):
  cfg = tiny(*overrides)
  return MoE(cfg.model, rngs=nnx.Rngs(seed)), cfg


def _x(cfg, seed=1):
  return jax.random.normal(jax.random.key(seed), (B, L, cfg.model.d_model), jnp.float32)


def _dense_reference(moe: MoE, x_BxLxD, keep_TxK=None):
  """Every expert on every token, weighted by the router's gates (zero where unchosen or dropped)."""
  x_TxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1])
  gates, experts, _, _ = moe.router(x_TxD)
  if keep_TxK is not None:
    gates = gates * keep_TxK
  e = moe.experts
  y_TxExD = jnp.einsum(
    "tef,efd->ted",
    jax.nn.silu(jnp.einsum("td,edf->tef", x_TxD, e.w_gate[...])) * jnp.einsum("td,edf->tef", x_TxD, e.w_up[...]),
    e.w_down[...],
  )
  dense_gates_TxE = jnp.zeros(y_TxExD.shape[:2]).at[jnp.arange(x_TxD.shape[0])[:, None], experts].add(gates)
  y = jnp.einsum("ted,te->td", y_TxExD, dense_gates_TxE).reshape(x_BxLxD.shape)
  return y + moe.shared(x_BxLxD) if moe.shared is not None else y


@pytest.mark.parametrize(
  "overrides",
  [
    ["model.moe.score_func=sigmoid"],
    ["model.moe.score_func=softmax", "model.moe.norm_topk_prob=false", "model.moe.num_shared_experts=0"],
    ["model.moe.n_group=4", "model.moe.topk_group=2", "model.moe.top_k=3", "model.moe.routed_scaling_factor=2.5"],
  ],
)
def test_dropless_equals_dense_reference(tiny, overrides):
  moe, cfg = _layer(tiny, *overrides)
  moe.router.bias[...] = jax.random.normal(jax.random.key(3), (8,)) * 0.1  # selection bias in play
  x = _x(cfg)
  y, aux = moe(x, jnp.ones((B, L), bool))
  np.testing.assert_allclose(y, _dense_reference(moe, x), rtol=1e-5, atol=1e-5)
  assert float(aux.load.sum()) == B * L * cfg.model.moe.top_k and int(aux.dropped) == 0


GMM = functools.partial(swiglu_gmm, interpret=True)


@pytest.mark.parametrize(
  "n, groups",
  [
    (1, [0, 1, 0, 0]),  # one row
    (6, [2, 0, 3, 1]),  # fewer rows than 2E: blocks of one row
    (40, [0, 17, 0, 23]),  # empty experts; blocks of 5 rows, padded
    (40, [40, 0, 0, 0]),  # all rows to one expert
    (40, [3, 0, 9, 11]),  # rows past the groups (an all-to-all's unused buffer) give zeros
  ],
)
@pytest.mark.parametrize(
  "kernel, weighed",
  [(swiglu_blocked, False), (GMM, False), (swiglu_ragged_dot, True), (swiglu_blocked, True), (GMM, True)],
  ids=["blocked", "gmm", "ragged_dot-weighed", "blocked-weighed", "gmm-weighed"],
)
def test_expert_kernels_equal_ragged_dot_and_its_gradients(n, groups, kernel, weighed):
  """The CPU's blocked loop and the TPU's megablox kernels (Pallas, interpreted here); weighed:
  given each row's gate, which they apply to the hidden rows, against ragged_dot's outputs times
  the gates."""
  e, d, f = len(groups), 8, 12
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (n, d))
  w = tuple(0.3 * jax.random.normal(k, s) for k, s in zip(keys[1:4], [(e, d, f), (e, d, f), (e, f, d)], strict=True))
  cot = jax.random.normal(keys[4], (n, d))
  g = jnp.asarray(groups, jnp.int32)
  gates = jax.random.uniform(keys[5], (n,), minval=0.1) if weighed else jnp.ones(n)

  def reference(x, w, gates):
    return swiglu_ragged_dot(x, w, g) * gates[:, None]

  def run(x, w, gates):
    return kernel(x, w, g, gates) if weighed else kernel(x, w, g)

  def loss(fn):
    return lambda *args: jnp.sum(cot * fn(*args))

  argnums = (0, 1, 2) if weighed else (0, 1)
  v_want, g_want = jax.value_and_grad(loss(reference), argnums)(x, w, gates)
  v_got, g_got = jax.value_and_grad(loss(run), argnums)(x, w, gates)
  y = run(x, w, gates)
  np.testing.assert_allclose(y, reference(x, w, gates), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(v_got, v_want, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.any(y[sum(groups) :])


def _brute_force_keep(experts_TxK, cap, num_experts):
  """First choices of every token, then second choices, ...; each in token order."""
  count = np.zeros(num_experts, int)
  keep = np.zeros(experts_TxK.shape, bool)
  for k in range(experts_TxK.shape[1]):
    for t in range(experts_TxK.shape[0]):
      e = experts_TxK[t, k]
      if count[e] < cap:
        keep[t, k], count[e] = True, count[e] + 1
  return keep


@pytest.mark.parametrize("skew", [0.0, 3.0])
def test_capacity_mode_drops_exactly_the_overflow(tiny, skew):
  moe, cfg = _layer(tiny, "model.moe.mode=capacity", "model.moe.capacity_factor=1.0")
  moe.router.kernel[...] = moe.router.kernel[...].at[:, 0].add(skew)  # crowd expert 0
  x = _x(cfg)
  y, aux = moe(x, jnp.ones((B, L), bool))
  _, experts, _, _ = moe.router(x.reshape(B * L, -1))
  cap = capacity(cfg.model.moe, B * L)
  keep = _brute_force_keep(np.asarray(experts), cap, 8)
  assert int(aux.dropped) == int((~keep).sum())
  if skew:
    assert int(aux.dropped) > 0
  np.testing.assert_allclose(y, _dense_reference(moe, x, jnp.asarray(keep)), rtol=1e-5, atol=1e-5)


def test_capacity_mode_with_room_for_all_equals_dropless(tiny):
  moe, cfg = _layer(tiny, "model.moe.mode=capacity", "model.moe.capacity_factor=4.0")
  x = _x(cfg)
  y, aux = moe(x, jnp.ones((B, L), bool))
  assert int(aux.dropped) == 0
  np.testing.assert_allclose(y, _dense_reference(moe, x), rtol=1e-5, atol=1e-5)


def test_group_limited_routing_picks_from_the_best_groups(tiny):
  moe, cfg = _layer(tiny, "model.moe.n_group=4", "model.moe.topk_group=2", "model.moe.top_k=2")
  moe.router.bias[...] = jax.random.normal(jax.random.key(5), (8,)) * 0.3
  x_TxD = _x(cfg).reshape(B * L, -1)
  _, experts, scores, _ = moe.router(x_TxD)
  biased = np.asarray(scores + moe.router.bias[...][None]).reshape(B * L, 4, 2)
  group_score = biased.sum(-1)  # two experts per group: the top-2 sum is the whole group
  for t in range(B * L):
    best_groups = set(np.argsort(-group_score[t])[:2])
    assert {int(e) // 2 for e in experts[t]} <= best_groups
    allowed = [e for g in best_groups for e in (2 * g, 2 * g + 1)]
    expected = sorted(allowed, key=lambda e: -biased.reshape(B * L, 8)[t, e])[:2]
    assert sorted(np.asarray(experts[t]).tolist()) == sorted(expected)


def test_bias_steers_selection_but_never_the_gate_values(tiny):
  moe, cfg = _layer(tiny, "model.moe.norm_topk_prob=false", "model.moe.top_k=1")
  x_TxD = _x(cfg).reshape(B * L, -1)
  moe.router.bias[...] = jnp.zeros(8).at[5].set(10.0)
  gates, experts, scores, _ = moe.router(x_TxD)
  assert (np.asarray(experts) == 5).all()
  np.testing.assert_allclose(gates[:, 0], scores[:, 5], rtol=1e-6)  # the unbiased sigmoid score


def test_aux_free_bias_moves_load_toward_balance(tiny):
  moe, cfg = _layer(tiny, "model.moe.balance_loss_weight=0")
  moe.router.kernel[...] = moe.router.kernel[...].at[:, :2].add(0.1)  # a skewed router:
  x = jax.random.normal(jax.random.key(2), (8, L, cfg.model.d_model)) + 0.5  # experts 0, 1 win
  valid = jnp.ones(x.shape[:2], bool)

  graphdef, state = nnx.split(moe)

  @jax.jit
  def load_of(state, bias):
    m = nnx.merge(graphdef, state)
    m.router.bias[...] = bias
    return m(x, valid)[1].load

  def load(bias):
    return load_of(state, bias)

  def imbalance(lo):
    return float(lo.max() / lo.mean())

  start = imbalance(load(moe.router.bias[...]))
  bias = moe.router.bias[...]
  gamma = 0.003
  for _ in range(200):
    lo = load(bias)
    bias = bias + gamma * jnp.sign(lo.mean() - lo)  # the rule Router.update_bias applies each step
  moe.router.bias[...] = bias
  moe.router.update_bias(lo, gamma)
  np.testing.assert_allclose(moe.router.bias[...], bias + gamma * jnp.sign(lo.mean() - lo))
  assert start > 3  # 2 of 8 experts take everything
  assert imbalance(load(bias)) < 1.25


def test_sequence_balance_loss_matches_the_equations(tiny):
  alpha = 0.01
  moe, cfg = _layer(tiny, f"model.moe.balance_loss_weight={alpha}", "model.moe.z_loss_weight=0.1")
  x = _x(cfg)
  valid = jnp.ones((B, L), bool).at[1, 12:].set(False)  # padding in the second row
  _, aux = moe(x, valid)
  _, experts, scores, logits = moe.router(x.reshape(B * L, -1))
  experts, scores = np.asarray(experts).reshape(B, L, -1), np.asarray(scores).reshape(B, L, -1)
  e, k, expected = 8, 2, []
  for b in range(B):
    t = int(valid[b].sum())
    f = np.array([(experts[b, :t] == i).sum() for i in range(e)]) * e / (k * t)  # eq. 18
    p = (scores[b, :t] / scores[b, :t].sum(-1, keepdims=True)).mean(0)  # eqs. 19-20
    expected.append((f * p).sum())  # eq. 17 without alpha
  np.testing.assert_allclose(aux.balance_loss, alpha * np.mean(expected), rtol=1e-5)
  lse = np.asarray(jax.nn.logsumexp(logits, -1)).reshape(B, L)[np.asarray(valid)]
  np.testing.assert_allclose(aux.z_loss, 0.1 * np.mean(lse**2), rtol=1e-5)
  assert float(aux.load.sum()) == int(valid.sum()) * k
