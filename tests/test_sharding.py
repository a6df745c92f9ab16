"""sharding.fsdp_einsum: a weight stored split over axes that split the batch (one axis, or two
along one dimension or two), gathered and multiplied in one shard_map on 8 CPU devices, against
the plain product."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from mtp_jax import hlo, sharding
from mtp_jax.config import MESH_AXES

RULES = {"heads": ["fsdp"], "embed": ["fsdp", "expert"], "act_batch": ["fsdp", "expert"]}  # as 671B's
CASES = {  # x's axes, the weight's, the product, the weight's shape
  "two dimensions": (("act_batch", None, None, None), ("heads", None, "embed"), "blhv,hvd->bld", (4, 8, 16)),
  "one dimension": (("act_batch", None, None), ("embed", "mlp"), "bld,df->blf", (16, 8)),
  "one axis": (("act_batch", None, None), ("heads", "mlp"), "blh,hf->blf", (4, 8)),
}
SPLITS = {  # how each is stored, and the device groups of its gathers and reduce-scatters
  "two dimensions": (("fsdp", None, "expert"), [2, 2, 4, 4]),
  "one dimension": ((("fsdp", "expert"), None), [2, 2, 4, 4]),
  "one axis": (("fsdp", None), [2, 2]),
}


def _against_plain(case: str, fsdp: int, expert: int) -> tuple[str, jax.Array]:
  """`fsdp_einsum` on a data 1 x fsdp x expert mesh of 8 CPU devices, its value and gradients
  checked against the plain product's; the compiled step's text, and the weight."""
  x_names, w_names, equation, w_shape = CASES[case]
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(1, fsdp, 1, expert, 1), MESH_AXES)
  w = jax.random.normal(jax.random.key(0), w_shape)
  x = jax.random.normal(jax.random.key(1), (8, 3, *w_shape[: len(x_names) - 2]))

  def loss(x, w, split: bool):
    if not split:
      return jnp.sum(jnp.tanh(jnp.einsum(equation, x, w)) ** 2)
    with sharding.activate(mesh, RULES):
      return jnp.sum(jnp.tanh(sharding.fsdp_einsum(equation, x, x_names, w, w_names)) ** 2)

  want = jax.value_and_grad(loss, argnums=(0, 1))(x, w, False)
  w_split = jax.device_put(w, sharding.named(w_names, w.shape, mesh, RULES))
  x_split = jax.device_put(x, NamedSharding(mesh, sharding.spec(x_names, x.shape, mesh, RULES)))
  assert tuple(w_split.sharding.spec) == SPLITS[case][0]
  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
  got = step(x_split, w_split, True)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for g, h in zip(got[1], want[1], strict=True):
    # float32 sums in another order: the first case within 1e-6 as it always was; the others
    # within 1e-6 of their gradient's largest magnitude (their errors here: 0.6-0.7 of that)
    atol = 1e-6 if case == "two dimensions" else 1e-6 * float(np.abs(h).max())
    np.testing.assert_allclose(g, h, rtol=1e-5, atol=atol)
  return step.lower(x_split, w_split, True).compile().as_text(), w


def _moving_groups(text: str) -> list[int]:
  """The device counts of the compiled program's all-gathers and reduce-scatters, sorted."""
  module = hlo.parse(text)
  moving = [i for body in module.computations.values() for i in body if i.opcode in ("all-gather", "reduce-scatter")]
  return sorted(hlo.group_size(i.rest, module.partitions) for i in moving)


@pytest.mark.parametrize("case", CASES)
def test_a_weight_split_over_batch_axes_is_gathered_and_reduce_scattered_back(case):
  """On fsdp 2 x expert 4 (an output projection's H over fsdp and D over expert; a dense
  weight's D over both, or its rows over fsdp alone): the value and gradients equal the plain
  product's, the weight arrives by all-gathers over one mesh axis at a time, and its gradient
  leaves by reduce-scatters, with no all-reduce of the whole weight (left to the compiler, XLA
  sums the whole gradient, and on TPU gathers the weight by an all-reduce of a zero-padded
  buffer)."""
  text, w = _against_plain(case, fsdp=2, expert=4)
  comms = hlo.collectives(text)
  assert {"all-gather", "reduce-scatter"} <= set(comms.by_kind()), comms.each
  assert all(c.sent < w.size * 4 for c in comms.each if c.kind == "all-reduce"), comms.each
  # One mesh axis at a time (2 or 4 devices, never all 8): over both at once XLA:TPU gathered by an all-reduce.
  assert _moving_groups(text) == SPLITS[case][1]


def test_an_axis_across_slices_is_gathered_between_them_then_within(monkeypatch):
  """fsdp 4 as 2 slices of 2 (a multi-slice mesh's fsdp, `mesh.dcn.fsdp=2`; CPU devices carry no
  slice, so `slices_along` is told): the weight is gathered between the slices, then within
  each, and put back in order, so its gradient is reduce-scattered within the slice first.
  Values and gradients equal the plain product's, and no collective spans the whole fsdp axis
  (over it in one call, XLA:TPU summed the whole gradient within each slice)."""
  monkeypatch.setattr(sharding, "slices_along", lambda mesh, axis: 2 if axis == "fsdp" else 1)
  text, _ = _against_plain("one dimension", fsdp=4, expert=2)
  # expert (2), then fsdp between the slices (2) and within them (2): each way
  assert _moving_groups(text) == [2] * 6


def test_keep_layout_pins_the_value_row_major_and_leaves_its_gradient_free():
  """`keep_layout` is the identity, value and gradient; the program holds the value row-major
  (one LayoutConstraint, result layout {2,1,0}) and leaves its cotangent to the compiler
  (pinned too, XLA:TPU moved a gradient's reduce-scatter into the microbatch loop)."""
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))

  def loss(x, pin: bool):
    return jnp.sum(jnp.sin(sharding.keep_layout(x) if pin else x) ** 2)

  step = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  got, want = step(x, True), step(x, False)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  pins = [line for line in step.lower(x, True).as_text().splitlines() if "@LayoutConstraint" in line]
  assert len(pins) == 1 and "result_layouts = [dense<[2, 1, 0]>" in pins[0], pins
