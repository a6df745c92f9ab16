"""Expert-parallel dispatch (all_to_all, ragged_all_to_all in shard_map) against one device."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from flax import nnx
from moe_layer import B, L, assert_same, forward_and_grads, inputs

from mtp_jax import sharding
from mtp_jax.config import ConfigError
from mtp_jax.model import dispatch as moe_lib
from mtp_jax.model.experts import swiglu_ragged
from mtp_jax.model.moe import MoE, RouterBias
from mtp_jax.model.transformer import remat_policy
from mtp_jax.train.program import build

ROOMY = "model.moe.capacity_factor=4"  # = E / K: C_local >= local tokens, so nothing drops
MESHES = {
  "data2_expert4": ["mesh.data=2", "mesh.expert=4"],
  "fsdp2_expert2_tensor2": ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=2", "mesh.tensor=2"],
}


def emulated_ragged_all_to_all(
  operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, axis_index_groups=None
):
  """jax.lax.ragged_all_to_all's documented semantics from all_gather, for CPU. The receiver
  writes recv_sizes rows; sizes that disagree with what the senders send poison the result."""
  assert axis_index_groups is None
  me = jax.lax.axis_index(axis_name)
  operand_PxNxD = jax.lax.all_gather(operand, axis_name)
  # [sender, receiver]
  src_PxP, sent_PxP, dst_PxP = (jax.lax.all_gather(a, axis_name) for a in (input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(output.shape[0])
  result = output
  for s in range(operand_PxNxD.shape[0]):
    start, size = dst_PxP[s, me], recv_sizes[s]
    hit = (rows >= start) & (rows < start + size)
    take = jnp.clip(src_PxP[s, me] + rows - start, 0, operand.shape[0] - 1)
    result = jnp.where(hit.reshape(-1, *[1] * (operand.ndim - 1)), operand_PxNxD[s][take], result)
  agree = jnp.all(sent_PxP[:, me] == recv_sizes)
  return jnp.where(agree, result, jnp.nan)


@pytest.fixture
def emulated(monkeypatch):
  monkeypatch.setattr(moe_lib, "ragged_all_to_all", emulated_ragged_all_to_all)


def _mesh(cfg):
  return sharding.make_mesh(cfg.mesh, jax.devices())


@pytest.mark.parametrize("mesh", MESHES)
def test_all_to_all_equals_one_device(mesh):
  cfg = tiny_config("model.moe.mode=capacity", ROOMY, "model.moe.dispatch=all_to_all", *MESHES[mesh])
  many = forward_and_grads(cfg, _mesh(cfg))
  one = forward_and_grads(cfg)
  assert int(many[1].dropped) == 0
  assert_same(one, many)
  # With nothing dropped, capacity buffers compute the dropless layer (which also runs padding).
  valid = np.asarray(inputs(cfg)[2])
  dropless = forward_and_grads(tiny_config())[0]
  np.testing.assert_allclose(np.asarray(many[0])[valid], np.asarray(dropless)[valid], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh", ["data2_expert4", "data8"])
def test_capacity_drops_by_each_devices_own_buffers(mesh):
  """Overflow is decided per device (per source device under all_to_all): the layer equals
  one-device capacity mode run on each device's own tokens, and `dropped` totals every
  device's drops (docs/scaling.md, "Where the experts run")."""
  cfg = tiny_config(
    "model.moe.mode=capacity", "model.moe.capacity_factor=1.0", *{**MESHES, "data8": ["mesh.data=8"]}[mesh]
  )
  layer = MoE(cfg.model, rngs=nnx.Rngs(0))
  layer.router.kernel[...] = layer.router.kernel[...].at[:, 0].add(0.5)  # crowd expert 0
  x, _, valid = inputs(cfg)
  mesh = _mesh(cfg)
  assert moe_lib.dispatch_plan(cfg.model.moe, mesh, cfg.mesh.rules, (B, L))[0] == (
    "all_to_all" if mesh.shape["expert"] > 1 else "local"
  )

  @jax.jit
  def sharded(x):
    with sharding.activate(mesh, cfg.mesh.rules):
      return layer(x, valid)

  y, aux = sharded(x)
  blocks = [layer(x[i : i + 1], valid[i : i + 1]) for i in range(B)]  # act_batch splits B 8 ways
  assert int(aux.dropped) == sum(int(a.dropped) for _, a in blocks) > 0
  np.testing.assert_allclose(y, jnp.concatenate([y for y, _ in blocks]), rtol=1e-5, atol=1e-6)
  # The buffers there and back, and their gates there.
  assert sharded.lower(x).as_text().count("stablehlo.all_to_all") == (3 if mesh.shape["expert"] > 1 else 0)


@pytest.mark.parametrize("save, wide", [((), 5), (("moe_in",), 4)], ids=["full", "full_keeping_moe_in"])
@pytest.mark.parametrize(
  "overrides",
  [["model.moe.mode=capacity", ROOMY, "model.moe.dispatch=all_to_all"], ["model.moe.dispatch=ragged_all_to_all"]],
  ids=["all_to_all", "ragged_all_to_all"],
)
def test_a_rematerialised_layer_exchanges_only_what_its_backward_needs(monkeypatch, overrides, save, wide):
  """The gates weigh the rows where the experts run (experts._hidden), so nothing
  in the backward pass reads what comes back: with the layer rematerialised, the D-wide rows
  are exchanged 5 times a step, not 6 (forward there and back, the recompute there only, the
  backward pass's two transposes), and the gates, one number a row, 3 times. Keeping the rows
  that came (`moe_in`, train.remat_save) spares the recompute its exchange: 4. The layer and its
  gradients equal the layer without remat. (The real ragged_all_to_all is lowered, not run; the
  values come from the emulation.)"""
  cfg = tiny_config(*overrides, *MESHES["data2_expert4"])
  mesh = _mesh(cfg)
  graphdef, params, bias = nnx.split(MoE(cfg.model, rngs=nnx.Rngs(0)), nnx.Param, RouterBias)
  x, cot, valid = inputs(cfg)

  def step(remat: bool):  # a new function each time: jax.checkpoint keeps the trace of one it saw
    def layer(params, x):
      with sharding.activate(mesh, cfg.mesh.rules):
        return nnx.merge(graphdef, params, bias)(x, valid)[0]

    layer = jax.checkpoint(layer, policy=remat_policy("full", save)) if remat else layer
    return jax.jit(jax.value_and_grad(lambda p, x: jnp.sum(layer(p, x) * cot), argnums=(0, 1)))

  monkeypatch.setattr(moe_lib, "ragged_all_to_all", lambda *a, **kw: jax.lax.ragged_all_to_all(*a, **kw))
  text = step(remat=True).lower(params, x).as_text()
  # Each exchange's first operand: what it sends (rows x D, or one gate a row; the integer sizes
  # and offsets left out).
  sent = re.findall(r'(?:"stablehlo.all_to_all"|@ragged_all_to_all)\(.*: \(tensor<([0-9x]+)xf32>', text)
  wide_sent = [dims for dims in sent if dims.endswith(f"x{cfg.model.d_model}")]
  assert (len(wide_sent), len(sent) - len(wide_sent)) == (wide, 3), sent
  # w_gate's and w_up's rows as each device holds them keep their layout, in the forward pass
  # and the recompute; w_down's and the gradients are left to the compiler (dispatch.routed_experts).
  pinned = re.findall(r"@LayoutConstraint\(.*: \(tensor<([0-9x]+)x", text)
  m = cfg.model
  local = f"{m.moe.num_experts // mesh.shape['expert']}x{m.d_model}x{m.moe.expert_d_ff}"  # D and F whole on this mesh
  assert pinned == [local] * 4, pinned

  monkeypatch.setattr(moe_lib, "ragged_all_to_all", emulated_ragged_all_to_all)
  (loss, grads), (loss_remat, grads_remat) = step(remat=False)(params, x), step(remat=True)(params, x)
  np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh", MESHES)
def test_ragged_all_to_all_equals_one_device_dropless(emulated, mesh):
  cfg = tiny_config("model.moe.dispatch=ragged_all_to_all", "model.moe.z_loss_weight=0.01", *MESHES[mesh])
  assert moe_lib.dispatch_plan(cfg.model.moe, _mesh(cfg), cfg.mesh.rules, (B, L)) == ("ragged_all_to_all", None)
  assert_same(forward_and_grads(cfg), forward_and_grads(cfg, _mesh(cfg)))


def _shared_keep(experts_BxLxK: np.ndarray, rows: int) -> np.ndarray:
  """Which token-slots a receive buffer of `rows` keeps, one batch row and one expert per
  device: device r receives expert r's rows from every source; when more than `rows` arrive,
  each source keeps the same share (the floors of a cumulative split, in float32 as the layer
  computes them) as the head of its rows, in token order."""
  keep = np.ones(experts_BxLxK.shape, bool)
  for dest in range(experts_BxLxK.shape[0]):
    sources, tokens, choices = np.nonzero(experts_BxLxK == dest)  # source-major, then token order
    sizes = np.bincount(sources, minlength=experts_BxLxK.shape[0])
    if sizes.sum() <= rows:
      continue
    end = np.cumsum(sizes)
    quota = np.diff(np.floor(end.astype(np.float32) * (np.float32(rows) / np.float32(end[-1]))), prepend=0)
    rank = np.arange(len(sources)) - (end - sizes)[sources]  # place among its source's rows
    lost = rank >= quota[sources]
    keep[sources[lost], tokens[lost], choices[lost]] = False
  return keep


def test_ragged_all_to_all_with_a_bounded_buffer_drops_an_equal_share_of_every_source(emulated):
  """ragged_buffer_factor=1: a device receives at most as many rows as it sends. With every
  token choosing expert 0, its device gets 8x that; each source keeps the same share, the first
  rows of it: the layer and its input gradient equal the one-device layer with the dropped
  choices' gates zeroed, and `dropped` counts the dropped slots of valid tokens."""
  factor = "model.moe.ragged_buffer_factor=1"
  cfg = tiny_config("model.moe.dispatch=ragged_all_to_all", factor, "mesh.data=1", "mesh.expert=8")
  m = cfg.model.moe
  mesh = _mesh(cfg)
  assert moe_lib.dispatch_plan(m, mesh, cfg.mesh.rules, (B, L)) == ("ragged_all_to_all", None)
  layer = MoE(cfg.model, rngs=nnx.Rngs(0))
  layer.router.bias[...] = layer.router.bias[...].at[0].set(10.0)  # selection only: gates are unbiased
  x, cot, valid = inputs(cfg)

  def sharded(x):
    with sharding.activate(mesh, cfg.mesh.rules):
      y, aux = layer(x, valid)
    return jnp.sum(y * cot), (y, aux)

  (_, (y, aux)), dx = jax.jit(jax.value_and_grad(sharded, has_aux=True))(x)

  experts_TxK = layer.router(x.reshape(B * L, -1))[1]
  experts_BxLxK = np.asarray(experts_TxK).reshape(B, L, m.top_k)
  keep_BxLxK = _shared_keep(experts_BxLxK, rows=L * m.top_k)
  w = layer.experts.weights()

  def reference(x):
    x_TxD = x.reshape(B * L, -1)
    y_TxD, _ = moe_lib._routed(
      m,
      x_TxD,
      experts_TxK,
      layer.router(x_TxD)[0] * keep_BxLxK.reshape(B * L, -1),
      valid.reshape(-1).astype(jnp.int32),
      lambda rows, gates, group_sizes_E: (swiglu_ragged(rows, w, group_sizes_E), None),
    )
    y = y_TxD.reshape(x.shape) + layer.shared(x)
    return jnp.sum(y * cot), y

  (_, y_ref), dx_ref = jax.jit(jax.value_and_grad(reference, has_aux=True))(x)
  assert int(aux.dropped) == int((~keep_BxLxK & np.asarray(valid)[..., None]).sum()) > 0
  to_expert0 = experts_BxLxK == 0
  assert (to_expert0.sum((1, 2)) == L).all()  # 8 sources x 16 rows for expert 0's buffer of 32
  assert ((keep_BxLxK & to_expert0).sum((1, 2)) == 4).all()  # 4 kept from each
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("factor", [0, 1.25])
def test_the_real_ragged_all_to_all_traces_and_differentiates(monkeypatch, factor):
  """CPU cannot run jax.lax.ragged_all_to_all, but it can lower it: shapes, device-varying
  types and the transpose rule of the real collective are checked here, with a worst-case
  receive buffer and a bounded one."""
  monkeypatch.setattr(moe_lib, "ragged_all_to_all", lambda *a, **kw: jax.lax.ragged_all_to_all(*a, **kw))
  cfg = tiny_config(*MESHES["fsdp2_expert2_tensor2"], f"model.moe.ragged_buffer_factor={factor}")
  mesh = _mesh(cfg)
  layer = MoE(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params, bias = nnx.split(layer, nnx.Param, RouterBias)
  x, _, valid = inputs(cfg)

  def loss(params, x):
    with sharding.activate(mesh, cfg.mesh.rules):
      return jnp.sum(nnx.merge(graphdef, params, bias)(x, valid)[0])

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  assert text.count("ragged_all_to_all") >= 4  # there and back, forward and backward


@pytest.fixture(scope="module")
def train_runs():
  """Three train steps on one device and on fsdp=2 x expert=4, all_to_all dispatch, from the
  same initial state (initialised once: compiling the initialiser costs as much as the step)."""
  overrides = ["model.moe.mode=capacity", ROOMY, "model.moe.dispatch=all_to_all", "model.mtp.depth=0"]
  out, initial = {}, None
  for name, mesh, devices in [
    ("one", ["mesh.data=1"], jax.devices()[:1]),
    ("eight", ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4"], None),
  ]:
    program = build(tiny_config(*overrides, *mesh), devices)
    lowered = program.step.lower(program.abstract_state, program.abstract_batch())
    compiled = lowered.compile()
    if initial is None:
      initial = jax.device_get(program.init_state())
    state, batch = jax.device_put(initial, program.state_shardings), program.synthetic_batch()
    history = []
    for _ in range(3):
      state, metrics = compiled(state, batch)
      history.append(jax.device_get(metrics))
    out[name] = (lowered.as_text(), history, program)
  return out


def test_train_steps_with_all_to_all_match_one_device(train_runs):
  (_, one, _), (text, eight, program) = train_runs["one"], train_runs["eight"]
  assert dict(program.mesh.shape)["expert"] == 4
  # The program before partitioning: GSPMD adds all-to-alls of its own only later, so these
  # are ours. One MoE layer: there and back, forward and backward.
  assert text.count("stablehlo.all_to_all") >= 4
  keys = ("loss", "ntp_loss", "balance_loss", "grad_norm", "expert_load_max_over_mean")
  for a, b in zip(one, eight, strict=True):
    assert float(b["dropped_fraction"]) == 0.0
    for k in keys:
      np.testing.assert_allclose(b[k], a[k], rtol=2e-5, err_msg=k)


def test_one_device_has_no_all_to_all(train_runs):
  assert "all_to_all" not in train_runs["one"][0]


def _plan(*overrides, shape=(B, L)):
  cfg = tiny_config(*overrides)
  return moe_lib.dispatch_plan(cfg.model.moe, _mesh(cfg), cfg.mesh.rules, shape)


def test_dispatch_plan_on_cpu():
  expert4 = MESHES["data2_expert4"]
  with pytest.raises(ConfigError) as err:
    _plan("model.moe.dispatch=ragged_all_to_all", *expert4)
  message = str(err.value)
  assert message.startswith("config error: model.moe.dispatch: ragged_all_to_all") and "\n" not in message
  kind, note = _plan(*expert4)  # auto, dropless
  assert kind == "gspmd" and note.startswith("model.moe.dispatch=auto: ragged_all_to_all is not implemented on")
  assert "\n" not in note
  assert _plan("model.moe.mode=capacity", *expert4) == ("all_to_all", None)
  assert _plan("model.moe.mode=capacity", "model.moe.dispatch=gspmd", *expert4) == ("gspmd", None)
  # No expert axis: nothing to send; each device computes its own tokens.
  assert _plan("model.moe.mode=capacity", "mesh.data=8") == ("local", None)
  kind, note = _plan("model.moe.mode=capacity", "model.moe.dispatch=all_to_all", "mesh.data=8")
  assert kind == "local" and "not split over any mesh axis" in note
  kind, note = _plan("model.moe.dispatch=gspmd", "mesh.data=8")  # asked for: the whole microbatch everywhere
  assert kind == "gspmd" and "every device computes the experts of the whole microbatch" in note
  # Tokens not split over the expert axis (it would have to carry them): gspmd, with a note.
  kind, note = _plan("model.moe.mode=capacity", "mesh.rules.act_batch=[data]", *expert4)
  assert kind == "gspmd" and "the tokens are not split over the expert mesh axis" in note
  # Two sequences cannot split four ways over expert: the layer would fall back at that shape.
  assert _plan("model.moe.mode=capacity", *expert4, shape=(2, L))[0] == "gspmd"
