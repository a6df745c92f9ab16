"""`model.moe.kernel=mosaic_gpu`: the dropless experts through JAX's Pallas Mosaic GPU grouped
matmuls (`experts.swiglu_mosaic`), against `lax.ragged_dot` and its gradients.

Three ways, as far as each machine allows:
- our wiring (which kernel gets which operands, transposed how, what is zeroed) with the two JAX
  kernels replaced by exact stand-ins that keep their contracts: the same tile checks, rows past
  the groups left as NaN, a group's edge rows masked by multiplying by 0. Any JAX.
- the real kernels in JAX's GPU interpret mode on the CPU. JAX 0.11 has it; the main suite's JAX
  0.10 does not, and says these skipped. CI runs this file again on the GPU image's JAX 0.11.2
  (.ci/run), with MTP_TEST_MOSAIC_INTERPRET=1: there they must run.
- the real kernels on a Hopper GPU (benchmarks/gpu.sh's `train` stage runs this file there first).
"""

import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

from mtp_jax.model import experts

# (rows, rows per expert): empty experts, rows past the groups, one expert taking all; row counts
# the kernels take as they are and ones padded for them (130), or not (6).
CASES = [(200, [40, 0, 90, 50]), (64, [0, 64, 0, 0]), (130, [1, 2, 3, 4]), (6, [2, 0, 3, 0])]


def _inputs(n, groups, d, f, dtype):
  keys = jax.random.split(jax.random.key(0), 5)
  e = len(groups)
  x = jax.random.normal(keys[0], (n, d)).astype(dtype)
  w = tuple(
    (0.1 * jax.random.normal(k, s)).astype(dtype)
    for k, s in zip(keys[1:4], [(e, d, f), (e, d, f), (e, f, d)], strict=True)
  )
  cot = jax.random.normal(keys[4], (n, d)).astype(jnp.float32)
  return x, w, cot, jnp.asarray(groups, jnp.int32)


def _against_ragged_dot(x, w, cot, sizes, rtol, atol, gates=None):
  """Outputs and gradients; with `gates`, the kernels' weighed outputs against ragged_dot's
  outputs times the gates (and the gates' gradient too)."""
  weighed = gates is not None
  gates = gates if weighed else jnp.ones(x.shape[0])

  def reference(x, w, gates):
    return experts.swiglu_ragged_dot(x, w, sizes) * gates[:, None].astype(x.dtype)

  def mosaic(x, w, gates):
    return experts.swiglu_mosaic(x, w, sizes, gates if weighed else None)

  def loss(fn):
    return lambda *args: jnp.sum(cot * fn(*args).astype(jnp.float32))

  argnums = (0, 1, 2) if weighed else (0, 1)
  v_want, g_want = jax.value_and_grad(loss(reference), argnums)(x, w, gates)
  v_got, g_got = jax.value_and_grad(loss(mosaic), argnums)(x, w, gates)
  y = np.asarray(mosaic(x, w, gates), np.float32)
  np.testing.assert_allclose(y, np.asarray(reference(x, w, gates), np.float32), rtol=rtol, atol=atol)
  np.testing.assert_allclose(v_got, v_want, rtol=rtol)
  for a, b in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want), strict=True):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, atol=atol)
  assert not np.any(y[int(sizes.sum()) :])


def _whole_tiles(rows: int) -> bool:
  return rows < 8 or rows % 8 == 0


def _rows_in_groups(sizes, n):
  return (jnp.arange(n) < sizes.sum())[:, None]


def _fake_ragged_dot(lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n, **flags):
  """ragged_dot_mgpu.ragged_dot's contract: (M, K) x (G, K, N), or (G, N, K) transposed; M under
  8 or a multiple of 8 (Mosaic GPU's tiling: compiled for a Hopper, 12 rows are refused); K a
  multiple of block_k; rows past the groups unwritten (NaN here)."""
  assert lhs.dtype == rhs.dtype and block_m and max_concurrent_steps and grid_block_n
  assert _whole_tiles(lhs.shape[0])
  assert set(flags) <= {"transpose_rhs", "load_group_sizes_to_register"}
  if flags.get("transpose_rhs"):
    rhs = rhs.swapaxes(1, 2)
  assert lhs.shape[1] % block_k == 0 and rhs.shape[2] % (block_n * grid_block_n) == 0
  out = jax.lax.ragged_dot(lhs, rhs, group_sizes)
  return jnp.where(_rows_in_groups(group_sizes, lhs.shape[0]), out, jnp.nan).astype(lhs.dtype)


def _fake_transposed_ragged_dot(
  lhs, rhs, *, group_sizes, block_m, block_n, block_k, max_concurrent_steps, grid_block_n
):
  """transposed_ragged_dot_mgpu's contract: (K, M) x (K, N) -> (G, M, N), K ragged; M and N
  multiples of their blocks; the rows of a group's edge blocks that belong to its neighbours
  multiplied by 0 (so a NaN there spreads); K as ragged_dot's M."""
  assert lhs.dtype == rhs.dtype and block_k and max_concurrent_steps and grid_block_n
  assert _whole_tiles(lhs.shape[0])
  assert lhs.shape[1] % block_m == 0 and rhs.shape[1] % block_n == 0
  ends = jnp.cumsum(group_sizes)
  group_K = jnp.searchsorted(ends, jnp.arange(lhs.shape[0]), side="right")
  one_hot_GxK = (group_K[None] == jnp.arange(len(group_sizes))[:, None]).astype(lhs.dtype)
  return jnp.einsum("gk,km,kn->gmn", one_hot_GxK, lhs, rhs).astype(lhs.dtype)


@pytest.mark.parametrize("weighed", [False, True], ids=["unweighed", "weighed"])
@pytest.mark.parametrize("n, groups", CASES)
def test_the_wiring_with_stand_ins_for_the_kernels(monkeypatch, n, groups, weighed):
  monkeypatch.setattr(ragged_dot_mgpu, "ragged_dot", _fake_ragged_dot)
  monkeypatch.setattr(transposed_ragged_dot_mgpu, "transposed_ragged_dot", _fake_transposed_ragged_dot)
  x, w, cot, sizes = _inputs(n, groups, 64, 128, jnp.float32)
  gates = jax.random.uniform(jax.random.key(9), (n,), minval=0.1) if weighed else None
  _against_ragged_dot(x, w, cot, sizes, rtol=1e-5, atol=1e-5, gates=gates)


def test_the_kernels_keep_the_arguments_we_pass():
  """A JAX that renames them fails here, not on a GPU."""
  import inspect

  tiles = {"block_m", "block_n", "block_k", "max_concurrent_steps", "grid_block_n"}
  assert tiles | {"group_sizes", "transpose_rhs"} <= set(inspect.signature(ragged_dot_mgpu.ragged_dot).parameters)
  assert tiles | {"group_sizes"} <= set(inspect.signature(transposed_ragged_dot_mgpu.transposed_ragged_dot).parameters)


# Where the tests below run the real kernels in JAX's GPU interpret mode.
INTERPRETED = pytest.mark.skipif(
  os.environ.get("MTP_TEST_MOSAIC_INTERPRET") != "1"
  and (not hasattr(plgpu, "InterpretGPUParams") or jax.default_backend() != "cpu"),
  reason="needs JAX's Mosaic GPU interpret mode (JAX 0.11) on CPU devices; on a GPU the real kernels run (below)",
)


def _interpret_kernels(monkeypatch):
  """The Mosaic GPU kernels in JAX's GPU interpret mode on these CPU devices."""
  kernel = plgpu.kernel
  monkeypatch.setattr(plgpu, "kernel", lambda *a, **k: kernel(*a, **k, interpret=plgpu.InterpretGPUParams()))
  # The weight gradient's kernel sizes its grid by the device's SM count, which a CPU lacks.
  shim = types.SimpleNamespace(**{k: getattr(jax, k) for k in dir(jax) if not k.startswith("__")})
  shim.devices = lambda *a: [types.SimpleNamespace(core_count=4)]
  monkeypatch.setattr(transposed_ragged_dot_mgpu, "jax", shim)


@INTERPRETED
@pytest.mark.parametrize("n, groups", CASES[:1])
def test_the_real_kernels_in_gpu_interpret_mode(monkeypatch, n, groups):
  _interpret_kernels(monkeypatch)
  x, w, cot, sizes = _inputs(n, groups, 64, 128, jnp.bfloat16)
  _against_ragged_dot(x, w, cot, sizes, rtol=2e-2, atol=2e-2)


@INTERPRETED
def test_a_train_step_with_the_real_kernels_in_gpu_interpret_mode_equals_ragged_dots(monkeypatch, tiny):
  """The whole step: MoE in a layer and in the MTP module, 2 microbatches, bfloat16, 2 steps.
  Without remat: the interpreter's callbacks are effects, which jax.checkpoint refuses."""
  from mtp_jax.train.program import build

  _interpret_kernels(monkeypatch)
  monkeypatch.setattr(experts, "ONLY_ON", {**experts.ONLY_ON, "mosaic_gpu": "cpu"})
  choose = experts.choose
  monkeypatch.setattr(experts, "choose", lambda k, p, **kw: choose(k, p, **{**kw, "capability": 9.0}))
  common = ["model.moe.mode=dropless", "model.dtype=bfloat16", "model.d_model=64", "model.moe.expert_d_ff=64"]
  common += ["model.moe.num_experts=4", "model.moe.top_k=2", "model.mtp.depth=1", "train.remat=none"]
  common += ["train.batch_size=4", "train.grad_accum_steps=2", "data.seq_len=32"]
  runs = []
  for kernel in ("ragged_dot", "mosaic_gpu"):
    program = build(tiny(*common, f"model.moe.kernel={kernel}"), jax.devices()[:1])
    assert program.experts == f"{kernel} (asked for)"
    state, batch = program.init_state(), program.synthetic_batch()
    for _ in range(2):
      state, metrics = program.step(state, batch)
    runs.append((metrics, jax.tree.leaves(state.params)))
  (m0, p0), (m1, p1) = runs
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
  np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-4)
  for a, b in zip(p1, p0, strict=True):
    np.testing.assert_allclose(a, b, atol=5e-4)


def _hopper() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9")


@pytest.mark.skipif(not _hopper(), reason="needs a Hopper GPU (JAX_PLATFORMS=cuda)")
def test_the_real_kernels_on_a_hopper_gpu():
  """At configs/small.yaml's widths (1536 x 512), 64 experts, ~2 microbatch rows per expert."""
  rng = np.random.default_rng(0)
  groups = np.bincount(rng.integers(0, 64, 6000), minlength=64).tolist()
  x, w, cot, sizes = _inputs(6144, groups, 1536, 512, jnp.bfloat16)
  _against_ragged_dot(x, w, cot, sizes, rtol=2e-2, atol=2e-2)


def test_the_kernel_auto_takes_per_backend_and_what_a_named_one_needs():
  hopper = {"dims": (1536, 512), "dtype": "bfloat16", "capability": 9.0}
  assert experts.choose("auto", "cpu", **hopper) == ("blocked", "auto on CPU")
  assert experts.choose("auto", "tpu", **hopper) == ("megablox", "auto on TPU")
  assert experts.choose("auto", "gpu", **hopper) == ("blocked", "auto on GPU")  # XLA:GPU expands ragged_dot
  assert experts.choose("mosaic_gpu", "gpu", **hopper) == ("mosaic_gpu", "asked for")
  assert experts.choose("ragged_dot", "tpu", **hopper) == ("ragged_dot", "asked for")
  for kernel, platform, change, message in [
    ("megablox", "gpu", {}, "is a TPU kernel (these devices are gpu)"),
    ("mosaic_gpu", "cpu", {}, "is a GPU kernel (these devices are cpu)"),
    ("mosaic_gpu", "gpu", {"capability": 10.0}, "needs compute capability 9.x (this GPU's is 10.0)"),
    ("mosaic_gpu", "gpu", {"dtype": "float32"}, "needs model.dtype bfloat16 or float16 (it is float32)"),
    ("mosaic_gpu", "gpu", {"dims": (1536, 96)}, "multiples of 64 (they are 1536 and 96)"),
  ]:
    with pytest.raises(ValueError, match=re.escape(message)):
      experts.choose(kernel, platform, **{**hopper, **change})


def test_auto_decodes_through_the_masked_product_on_a_gpu_and_trains_through_blocks(monkeypatch):
  """At decoding sizes (up to experts.MASKED_ROWS rows) a GPU takes lax.ragged_dot, which XLA:GPU
  runs as one masked product reading each expert once; above, and on the other backends, the
  backend's own (tests/test_compile_gpu.py compares the two steps' HBM traffic)."""
  x, w, _, sizes = _inputs(4096, [40, 0, 90, 0], 64, 64, jnp.float32)

  def traced(platform, rows):
    monkeypatch.setattr(experts.sharding, "platform", lambda mesh=None: platform)
    jaxpr = jax.make_jaxpr(lambda x: experts.swiglu_ragged(x, w, sizes))(x[:rows])
    return {e.primitive.name for e in jaxpr.jaxpr.eqns} & {"ragged_dot_general", "scan"}

  assert traced("gpu", 48) == {"ragged_dot_general"}  # 8 rows verifying 2 drafts each, top-2
  assert traced("gpu", experts.MASKED_ROWS) == {"ragged_dot_general"}
  assert traced("gpu", experts.MASKED_ROWS + 1) == traced("gpu", 4096) == {"scan"}
  assert traced("cpu", 2) == {"scan"}
  assert [experts.native("tpu", rows) for rows in (2, 4096)] == ["megablox"] * 2


def test_a_kernel_these_devices_cannot_run_is_a_config_error_before_anything_compiles(tiny):
  from mtp_jax.config import ConfigError
  from mtp_jax.train.program import build

  with pytest.raises(ConfigError, match=r"model\.moe\.kernel=mosaic_gpu: is a GPU kernel \(these devices are cpu\)"):
    build(tiny("model.moe.mode=dropless", "model.moe.kernel=mosaic_gpu"), jax.devices()[:1])
  program = build(tiny("model.moe.mode=dropless"), jax.devices()[:1])
  assert program.experts == "blocked (auto on CPU)" and program.cfg.model.moe.kernel == "blocked"
  assert build(tiny("model.moe.mode=capacity"), jax.devices()[:1]).experts is None


def test_grouped_matmul_flops_count_each_row_once():
  """What the FLOP counts take for the Mosaic GPU kernels, which carry no estimate: 2 M K N for
  the forward (rows against their group's weights) and the weight gradient (rows against rows,
  into each group's weights); other shapes count nothing."""
  from mtp_jax.model.flops import grouped_matmul_flops

  assert grouped_matmul_flops([(256, 64), (8, 64, 32)], (256, 32)) == 2 * 256 * 64 * 32
  assert grouped_matmul_flops([(256, 64), (256, 32)], (8, 64, 32)) == 2 * 256 * 64 * 32
  assert grouped_matmul_flops([(256, 64), (8, 48, 32)], (256, 32)) == 0.0  # contraction does not match
  assert grouped_matmul_flops([(256, 64)], (256, 32)) == 0.0
