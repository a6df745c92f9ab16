"""One train step, many ways: sharded meshes, microbatches, remat, scanned layers and bfloat16
compute against the plain single-device step."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STEP_KEYS, fixed_batch, run_steps
from flax import nnx

from mtp_jax.train import step
from mtp_jax.train.program import build

_ONE_DEVICE = {}  # the one-device reference's metrics by overrides, computed once


@pytest.mark.parametrize(
  "mesh, overrides, sharded",
  [
    (  # two microbatches, each replica over data summing its own (step._per_replica), around the
      # layers' own shard_maps: the head's over fsdp (vocab_split), the experts', and the output
      # projection's, stored as 671B stores it (heads over fsdp, D over expert: fsdp_einsum)
      [
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.expert=2",
        "train.grad_accum_steps=2",
        "mesh.rules.heads=[tensor,fsdp]",
        "mesh.rules.embed=[fsdp,expert]",
      ],
      [],
      (("layers", 1, "ffn", "experts", "w_gate"), "experts", "expert"),
    ),
    (
      ["mesh.data=2", "mesh.expert=2", "mesh.tensor=2", "train.grad_accum_steps=2"],
      # All-to-all capacity is per device: with factor E/K = 2 nothing drops, on either side.
      ["model.attention.kind=mla", "model.moe.mode=capacity", "model.moe.capacity_factor=2", "model.mtp.kind=parallel"],
      (("layers", 0, "attn", "wkv_b"), "heads", "tensor"),
    ),
    (  # the sequence (context) axis: activations split along the sequence, attention sees it whole,
      # in strided query blocks that keep the split
      ["mesh.data=2", "mesh.fsdp=2", "mesh.sequence=2", "train.attention_chunk_len=4"],
      [],  # against whole attention on one device: the first case's reference
      (("layers", 0, "attn", "wq"), "embed", "fsdp"),
    ),
  ],
)
def test_sharded_mesh_matches_one_device(tiny, mesh, overrides, sharded):
  overrides = ["model.mtp.depth=2", "model.moe.num_experts=4", "train.batch_size=16", *overrides]
  key = tuple(overrides)
  if key not in _ONE_DEVICE:
    _ONE_DEVICE[key] = run_steps(tiny(*overrides, "mesh.data=1"), devices=jax.devices()[:1])[0]
  one = _ONE_DEVICE[key]
  program = build(tiny(*overrides, *mesh))
  path, name, axis = sharded
  leaf = program.abstract_state.params
  for key in path:
    leaf = leaf[key]
  names = leaf.get_metadata()["axes"]
  assert leaf.get_value().sharding.spec[names.index(name)] == axis  # the weight really is split
  assert program.batch_sharding.spec[1] == ("sequence" if "mesh.sequence=2" in mesh else None)
  eight, _ = run_steps(program.cfg)
  for a, b in zip(one, eight, strict=True):
    for k in STEP_KEYS:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)


def test_remat_does_not_change_the_step(tiny):
  """On one device, where each program compiles quickest: remat with a sharded stack is
  test_scanned_layers_equal_unrolled_layers, an offload over 4 chips test_compile's v5p-8
  program. (Microbatches against none: test_sharded_mesh_matches_one_device's first two meshes
  and test_scanned_layers_equal_unrolled_layers.)"""
  one, common = jax.devices()[:1], ("model.mtp.depth=2", "train.batch_size=16", "mesh.data=1")
  base, _ = run_steps(tiny(*common), steps=2, devices=one)
  for overrides in (
    ["train.remat=full", "train.loss_chunk_len=8", "train.remat_offload=[moe_out]"],  # host memory: the same values
    ["train.remat=save_attn_moe"],
    ["train.remat=dots_no_batch", "train.remat_save=[attn_context,moe_in]"],
  ):
    other, _ = run_steps(tiny(*common, *overrides), steps=2, devices=one)
    for a, b in zip(base, other, strict=True):
      for k in STEP_KEYS:
        np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=f"{overrides} {k}")


def test_microbatch_gradients_are_added_where_they_are_made(tiny):
  """Summed as `acc + grad(loss)(params)`, each microbatch's gradient of a scanned stack is
  written into a buffer of its own, held beside the sum until the add. Differentiating the sum
  itself (`loss_fn`'s `acc`, `model.accumulate`) adds each layer's gradient into the sum's row in
  the backward loop: the same sums, and the compiled loop holds at least every scanned stack's
  float32 worth less (2 dense, then 3 MoE layers; full remat; one device)."""
  cfg = tiny("model.num_layers=5", "model.first_k_dense=2", "train.remat=full", "mesh.data=1", "model.mtp.depth=1")
  graphdef, params, bias = step.split(step.build_model(cfg))
  batch = {k: jnp.asarray(v) for k, v in fixed_batch(cfg).items()}
  denominators = step.target_counts(batch, 1)
  mbs = jax.tree.map(lambda x: x.reshape(2, -1, *x.shape[1:]), batch)
  loss = functools.partial(step.loss_fn, frozen=nnx.State({}), graphdef=graphdef, cfg=cfg, mtp_lambda=0.3, parts=2)

  def summed(into_acc, params, bias, mbs):
    def add(acc, mb):
      kw = {"bias": bias, "batch": mb, "denominators": denominators}
      if into_acc:
        return jax.grad(lambda acc: loss(params, acc=acc, **kw), has_aux=True)(acc)[0], None
      return jax.tree.map(jnp.add, acc, jax.grad(loss, has_aux=True)(params, **kw)[0]), None

    return jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), mbs)[0]

  got, temps = {}, {}
  for into_acc in (False, True):
    compiled = jax.jit(functools.partial(summed, into_acc)).lower(params, bias, mbs).compile()
    got[into_acc], temps[into_acc] = compiled(params, bias, mbs), compiled.memory_analysis().temp_size_in_bytes
  # The same sums, to float32 rounding at each leaf's scale: where the add meets the gradient's
  # matmul XLA may fuse the two, rounding once instead of twice (3e-7 of the scale seen here).
  for a, b in zip(jax.tree.leaves(got[False]), jax.tree.leaves(got[True]), strict=True):
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-6 * np.abs(a).max())
  assert any(np.any(g != 0) for g in jax.tree.leaves(got[True]["layers"][1]))
  stacks = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
  assert temps[False] - temps[True] >= stacks, (temps, stacks)


@pytest.mark.parametrize("when", ["step", "microbatch"])
def test_replicas_sum_their_gradients_once_a_step(tiny, when):
  """Over data 8 with 2 microbatches each replica keeps its gradient until the step's end: the
  compiled step all-reduces once (no all-reduce in the microbatch loop), one float32 gradient's
  worth. With train.data_grad_sum=microbatch the compiler sums each microbatch's as it is made."""
  program = build(tiny("train.batch_size=16", "train.grad_accum_steps=2", "mesh.data=8", f"train.data_grad_sum={when}"))
  _, _, comms = program.compile_and_count()
  reduces = [c for c in comms.each if c.kind == "all-reduce"]
  if when == "microbatch":
    assert max(c.calls for c in reduces) == 2, reduces
    return
  assert reduces and all(c.calls == 1 for c in reduces), reduces
  grad_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(program.abstract_state.params))
  one_sum = 2 * 7 / 8 * grad_bytes  # what each of 8 devices sends to all-reduce it once
  assert one_sum <= comms.by_kind()["all-reduce"][0] < 1.1 * one_sum


def test_scanned_layers_equal_unrolled_layers(tiny):
  """2 dense then 3 MoE layers: two scans, sharded over fsdp and expert, with remat, in two
  microbatches whose gradients the scans add into their sum (`model.accumulate`); the router
  bias moves after step 1, so step 2 also checks each layer got its own bias and load back."""
  cfg = (
    "model.num_layers=5",
    "model.first_k_dense=2",
    "train.remat=full",
    "mesh.data=2",
    "mesh.fsdp=2",
    "mesh.expert=2",
    "model.moe.bias_update_rate=0.01",
    "train.batch_size=16",
  )
  scanned, s_state = run_steps(tiny(*cfg, "train.grad_accum_steps=2"), steps=2)
  unrolled, u_state = run_steps(tiny(*cfg, "train.scan_layers=false"), steps=2)
  per_layer = [f"moe/layer_{i}/load_max_over_mean" for i in (2, 3, 4)]
  for a, b in zip(scanned, unrolled, strict=True):
    assert a.keys() == b.keys()
    for k in ("loss", "ntp_loss", "mtp_loss_1", "balance_loss", "grad_norm", *per_layer):
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, err_msg=k)
  for x, y in zip(jax.tree.leaves(s_state), jax.tree.leaves(u_state), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_bfloat16_compute_tracks_float32(tiny):
  one = jax.devices()[:1]
  f32, _ = run_steps(tiny("model.mtp.depth=1", "mesh.data=1"), steps=2, devices=one)
  bf16, state = run_steps(tiny("model.mtp.depth=1", "mesh.data=1", "model.dtype=bfloat16"), steps=2, devices=one)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(state.params))  # master weights stay fp32
  for a, b in zip(f32, bf16, strict=True):
    for k in ("loss", "ntp_loss", "mtp_loss_1"):
      np.testing.assert_allclose(a[k], b[k], rtol=1e-2, err_msg=k)
  # bfloat16 parameters: what the step gives back, read from its abstract evaluation (the
  # compiled step's output types, without compiling it; it compiles for GPUs in test_compile_gpu).
  program = build(tiny("model.mtp.depth=1", "mesh.data=1", "model.dtype=bfloat16", "model.param_dtype=bfloat16"), one)
  state, _ = jax.eval_shape(program.step, program.abstract_state, program.abstract_batch())
  dtypes = {jax.tree_util.keystr(k): v.dtype for k, v in jax.tree_util.tree_leaves_with_path(state.params)}
  assert {d for k, d in dtypes.items() if "router" not in k} == {jnp.dtype(jnp.bfloat16)}
  assert {d for k, d in dtypes.items() if "router" in k} == {jnp.dtype(jnp.float32)}  # routing stays fp32
