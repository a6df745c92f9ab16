"""The routed experts: E SwiGLU FFNs with stacked weights, and the kernels that run them.

Two layouts of the rows reach them (`dispatch.py` makes both):
- fixed buffers, E x C x D (capacity mode): one batched matmul per projection;
- rows sorted by expert with a size per expert (dropless): `swiglu_ragged`, through the kernel
  `model.moe.kernel` names (`choose` resolves `auto` for the backend).

Shape letters beyond the package legend (model/__init__.py): C buffer slots per expert
(capacity) · N rows · R rows per block · Z blocks (`swiglu_blocked`) · M, K, N2 a grouped
product's rows, contraction and output widths (`_mosaic_gmm`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mtp_jax import sharding
from mtp_jax.config import ModelConfig
from mtp_jax.model.layers import weight

Weights = tuple[jax.Array, jax.Array, jax.Array]  # w_gate ExDxF, w_up ExDxF, w_down ExFxD
# Their logical axes, in that order (the rules table maps them to mesh axes).
WEIGHT_AXES = (("experts", "embed", "expert_mlp"),) * 2 + (("experts", "expert_mlp", "embed"),)

# `model.moe.kernel=auto` per backend; ragged_dot elsewhere. XLA lowers lax.ragged_dot for CPU, and
# for GPU too (jax 0.10.2 and 0.11.2), as every row times every expert, masked: E times the FLOPs,
# and on GPU an N x E*F buffer (small.yaml dropless on an H200, compiled with none attached:
# 27x the model's matmul FLOPs and 104.5 GiB, against blocked's 1.46x and 43.4 GiB;
# benchmarks/RESULTS.md). Hence the blocked loop there (benchmarks/moe_experts.py measures the
# choice on CPU) until a GPU has measured mosaic_gpu against it (issue 22's benchmarks/gpu.sh).
NATIVE = {"cpu": "blocked", "gpu": "blocked", "tpu": "megablox"}
ONLY_ON = {"megablox": "tpu", "mosaic_gpu": "gpu"}  # kernels that run on one backend alone
# Decoding on a GPU: up to this many rows, `auto` takes ragged_dot. Its masked product reads each
# expert's weights once, in place, and its E-fold FLOPs cost less than that read while the rows
# stay under the GPU's ridge point (peak FLOP/s over HBM bytes/s: about 200 for an H100 or H200 in
# bfloat16). The blocked loop's kernels copy each block's weights out before its matmul, and the
# layer's whole expert stack into the loop: compiled for an H200, a decoding step of
# speculative.py's 2.8B model moves 1.7-5.6x its parameters' bytes blocked, 0.8-0.9x masked
# (benchmarks/decode_traffic.py; RESULTS, 2026-12-07 (seventh)). Blocks win only with many experts
# and few rows (small.yaml at batch 1, 64 experts: about 11% less).
MASKED_ROWS = 128


def native(platform: str, rows: int) -> str:
  """What `auto` runs `rows` token-slots through on devices of `platform` (see MASKED_ROWS)."""
  if platform == "gpu" and rows <= MASKED_ROWS:
    return "ragged_dot"
  return NATIVE.get(platform, "ragged_dot")


def choose(kernel: str, platform: str, *, dims: tuple[int, int], dtype: str, capability: float | None = None):
  """(kernel, why): what runs the dropless experts on devices of `platform` (`capability`: a
  GPU's compute capability; `dims`: d_model and one device's share of expert_d_ff). A kernel
  asked for by name that cannot run there is a ValueError naming why."""
  if kernel == "auto":
    return NATIVE.get(platform, "ragged_dot"), f"auto on {platform.upper()}"
  if ONLY_ON.get(kernel, platform) != platform:
    raise ValueError(
      f"is a {ONLY_ON[kernel].upper()} kernel (these devices are {platform}); use auto, ragged_dot or blocked"
    )
  if kernel == "mosaic_gpu":
    if int(capability or 0) != 9:
      raise ValueError(f"runs JAX's Hopper kernels: it needs compute capability 9.x (this GPU's is {capability})")
    if dtype not in ("bfloat16", "float16"):
      raise ValueError(f"needs model.dtype bfloat16 or float16 (it is {dtype})")
    if any(d % 64 for d in dims):
      raise ValueError(f"needs d_model and a device's expert_d_ff multiples of 64 (they are {dims[0]} and {dims[1]})")
  return kernel, "asked for"


class Experts(nnx.Module):
  """E SwiGLU experts with stacked weights."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f, std = cfg.moe.num_experts, cfg.d_model, cfg.moe.expert_d_ff, cfg.init_std
    pdt = jnp.dtype(cfg.param_dtype)
    self.w_gate = weight(rngs, (e, d, f), WEIGHT_AXES[0], std, pdt)
    self.w_up = weight(rngs, (e, d, f), WEIGHT_AXES[1], std, pdt)
    self.w_down = weight(rngs, (e, f, d), WEIGHT_AXES[2], std, pdt)
    self.dtype = jnp.dtype(cfg.dtype)

  def weights(self) -> Weights:
    return tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))


def swiglu_batched(x_ExCxD: jax.Array, w: Weights, gates_ExC: jax.Array | None = None) -> jax.Array:
  """Each expert's SwiGLU over its own fixed-size buffer of rows; with `gates_ExC`, each row's
  output times its gate (`_hidden`)."""
  x_ExCxD = checkpoint_name(x_ExCxD, "moe_in")
  gate = jnp.einsum("ecd,edf->ecf", x_ExCxD, w[0])
  up = jnp.einsum("ecd,edf->ecf", x_ExCxD, w[1])
  return checkpoint_name(jnp.einsum("ecf,efd->ecd", _hidden(gate, up, gates_ExC), w[2]), "moe_out")


def _hidden(gate: jax.Array, up: jax.Array, gates: jax.Array | None) -> jax.Array:
  """SwiGLU's hidden rows silu(gate) up, each times its row's gate where given (float32 gates,
  the product rounded once to the rows' dtype). Weighing a row before the down projection is the
  same product as weighing its output, but the gates' gradient then reads the hidden rows, not
  the outputs, so a rematerialised layer's recompute skips the down projection; and the
  multiply and its backward are expert_d_ff wide, not d_model (DeepSeek-V3 on TPU: 4% fewer
  matmul FLOPs a step; benchmarks/RESULTS.md, "the gates weigh the hidden rows")."""
  h = jax.nn.silu(gate) * up
  return h if gates is None else (h.astype(jnp.float32) * gates[..., None]).astype(h.dtype)


def swiglu_ragged(
  x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array, kernel: str = "auto", gates_N: jax.Array | None = None
) -> jax.Array:
  """Each expert's SwiGLU over its rows: rows sorted by expert, group_sizes_E of them to each in
  turn, rows past their sum giving zeros; with `gates_N`, each row's output times its gate
  (`_hidden`). `kernel` (`model.moe.kernel`, resolved by `choose`; `auto` here takes the
  backend's own for this many rows, as decoding does: `native`): `blocked` (`swiglu_blocked`),
  `megablox` (`swiglu_gmm`: XLA:TPU runs `lax.ragged_dot`'s forward as a grouped matmul but its
  weight gradient as a product of every row with every expert), `mosaic_gpu` (`swiglu_mosaic`)
  or `ragged_dot` (`swiglu_ragged_dot`, left to the compiler; docs/scaling.md, "Where the
  experts run"). A named kernel that cannot run on the backend being traced for (a run trained
  on one backend, decoded on another) gives way to the backend's own."""
  platform, x_NxD = sharding.platform(), checkpoint_name(x_NxD, "moe_in")
  if kernel == "auto" or ONLY_ON.get(kernel, platform) != platform:
    kernel = native(platform, x_NxD.shape[0])
  run = {
    "blocked": swiglu_blocked,
    "megablox": swiglu_gmm,
    "mosaic_gpu": swiglu_mosaic,
    "ragged_dot": swiglu_ragged_dot,
  }
  return checkpoint_name(run[kernel](x_NxD, w, group_sizes_E, gates_N), "moe_out")


def swiglu_ragged_dot(
  x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array, gates_N: jax.Array | None = None
) -> jax.Array:
  """`swiglu_ragged` through `lax.ragged_dot`, on any backend."""
  gate = jax.lax.ragged_dot(x_NxD, w[0], group_sizes_E)
  up = jax.lax.ragged_dot(x_NxD, w[1], group_sizes_E)
  return jax.lax.ragged_dot(_hidden(gate, up, gates_N), w[2], group_sizes_E)


def swiglu_gmm(
  x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array, gates_N: jax.Array | None = None, interpret: bool = False
) -> jax.Array:
  """`swiglu_ragged` through megablox's Pallas grouped matmuls (MaxText's TPU kernel): `gmm`
  forward and for the input gradient, `tgmm` for the weight gradient, each touching only its
  own group's rows. Rows past the groups (and their gates) are zeroed on the way in and out (the
  kernel leaves them unwritten). `interpret` runs the kernels on any backend, for tests."""
  from jax.experimental.pallas.ops.tpu.megablox import ops

  n = x_NxD.shape[0]
  rows = -(-n // 16) * 16 if n <= 512 else -(-n // 512) * 512  # whole row tiles (`_gmm_tiles`)
  valid_N = jnp.arange(n) < group_sizes_E.sum()
  x_RxD = jnp.pad(jnp.where(valid_N[:, None], x_NxD, 0), ((0, rows - n), (0, 0)))
  sizes = group_sizes_E.astype(jnp.int32)

  def gmm(lhs, rhs):
    return ops.gmm(lhs, rhs, sizes, lhs.dtype, _gmm_tiles, None, None, False, interpret)

  # A gate's gradient reads its row's hidden activations and their cotangent, which the kernels
  # leave unwritten past the groups: zeroed there, the where passes none of it back.
  gates_R = None if gates_N is None else jnp.pad(jnp.where(valid_N, gates_N, 0), (0, rows - n))
  h_RxF = _hidden(gmm(x_RxD, w[0]), gmm(x_RxD, w[1]), gates_R)
  return jnp.where(valid_N[:, None], gmm(h_RxF, w[2])[:n], 0)


def _gmm_tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
  """megablox tiles for an m x k by k x n product, forward or backward (the kernel calls this
  for each): up to 512 rows, and along k and n the largest of 512, 256, 128 that divides the
  dim, else the whole dim (a TPU block is a multiple of 128 lanes or the whole array)."""

  def tile(x: int) -> int:
    return next((t for t in (512, 256, 128) if x % t == 0), x)

  return min(512, m), tile(k), tile(n)


def swiglu_mosaic(
  x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array, gates_N: jax.Array | None = None
) -> jax.Array:
  """`swiglu_ragged` through JAX's Pallas Mosaic GPU grouped matmuls for Hopper
  (jax.experimental.pallas.ops.gpu): `ragged_dot` forward and, with the weights transposed, for
  the input gradient; `transposed_ragged_dot` for the weight gradient, each touching only its
  own group's rows (`_mosaic_gmm`). Rows past the groups (and their gates) are zeroed on the way
  in and out (the kernels leave them unwritten), and padded to a multiple of 8: the kernels take
  fewer than 8 rows or a multiple of 8 (a decoding step of 2 tokens, top-6, has 12)."""
  n = x_NxD.shape[0]
  rows = n if n < 8 else -(-n // 8) * 8
  valid_R = (jnp.arange(rows) < group_sizes_E.sum())[:, None]
  sizes = group_sizes_E.astype(jnp.int32)
  x_RxD = jnp.where(valid_R, jnp.pad(x_NxD, ((0, rows - n), (0, 0))), 0)
  gates_R = (
    None if gates_N is None else jnp.where(valid_R[:, 0], jnp.pad(gates_N, (0, rows - n)), 0)
  )  # as in `swiglu_gmm`
  h_RxF = _hidden(_mosaic_gmm(x_RxD, w[0], sizes), _mosaic_gmm(x_RxD, w[1], sizes), gates_R)
  return jnp.where(valid_R, _mosaic_gmm(h_RxF, w[2], sizes), 0)[:n]


@jax.custom_vjp
def _mosaic_gmm(x_MxK: jax.Array, w_ExKxN2: jax.Array, sizes_E: jax.Array) -> jax.Array:
  """Rows times their group's matrix, M x N2 (rows past the groups: whatever the kernel left)."""
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

  width = w_ExKxN2.shape[2]
  return ragged_dot_mgpu.ragged_dot(x_MxK, w_ExKxN2, group_sizes=sizes_E, block_n=_tile(width), **_MOSAIC)


def _mosaic_gmm_fwd(x_MxK, w_ExKxN2, sizes_E):
  return _mosaic_gmm(x_MxK, w_ExKxN2, sizes_E), (x_MxK, w_ExKxN2, sizes_E)


def _mosaic_gmm_bwd(res, g_MxN2):
  from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu, transposed_ragged_dot_mgpu

  x_MxK, w_ExKxN2, sizes_E = res
  k, n = w_ExKxN2.shape[1:]
  valid_M = (jnp.arange(x_MxK.shape[0]) < sizes_E.sum())[:, None]
  # Rows past the groups are zeroed: the weight gradient's kernel masks a group's edge rows by
  # multiplying by 0, which would keep a NaN left there (as the products before leave them).
  x_MxK, g_MxN2 = jnp.where(valid_M, x_MxK, 0), jnp.where(valid_M, g_MxN2, 0).astype(x_MxK.dtype)
  # Input gradient: each row's cotangent times its group's matrix transposed (N2 contracted).
  dx_MxK = ragged_dot_mgpu.ragged_dot(
    g_MxN2, w_ExKxN2, group_sizes=sizes_E, transpose_rhs=True, block_n=_tile(k), **_MOSAIC
  )
  # Weight gradient: per group, its rows of x transposed times their cotangents (the rows contracted).
  dw_ExKxN2 = transposed_ragged_dot_mgpu.transposed_ragged_dot(
    x_MxK, g_MxN2, group_sizes=sizes_E, **{**_MOSAIC, "block_m": _tile(k), "block_n": _tile(n)}
  )
  return jnp.where(valid_M, dx_MxK, 0), dw_ExKxN2, None


_mosaic_gmm.defvjp(_mosaic_gmm_fwd, _mosaic_gmm_bwd)

# The Mosaic GPU kernels' tiles: 128-row output tiles (by `_tile` columns), 64-wide steps along
# the contraction, four steps in flight: about 160 KiB of the 227 KiB of shared memory an H100 or
# H200 SM has. Not tuned on a GPU yet (the kernels' own main() searches these).
_MOSAIC = {"block_m": 128, "block_k": 64, "max_concurrent_steps": 4, "grid_block_n": 1}


def _tile(width: int) -> int:
  """An output tile's width along a dim of `width` (`choose` admits multiples of 64 only)."""
  return 128 if width % 128 == 0 else 64


def swiglu_blocked(
  x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array, gates_N: jax.Array | None = None
) -> jax.Array:
  """`swiglu_ragged` as dense blocks: each expert's rows are padded to whole blocks of R rows,
  and a loop multiplies each block by its own expert's weights, sliced inside the loop (gathering
  every block's weights up front would copy them all: slower than the masked product at decoding
  sizes on the CPU; XLA:GPU copies each block's slice out before its matmul, see MASKED_ROWS). Blocks of
  R = N / 2E rows keep the padding under about half the rows, and the block count Z static:
  sum over experts of ceil(g_e / R) <= (N + min(E, N)(R - 1)) / R."""
  n = x_NxD.shape[0]
  e = group_sizes_E.shape[0]
  r = max(1, n // (2 * e))
  m = (n + min(e, n) * (r - 1)) // r
  blocks_E = (group_sizes_E + r - 1) // r
  end_row_E, end_block_E = jnp.cumsum(group_sizes_E), jnp.cumsum(blocks_E)
  row_N = jnp.arange(n, dtype=group_sizes_E.dtype)
  expert_N = jnp.searchsorted(end_row_E, row_N, side="right", method="compare_all")  # E past the last group
  ex_N = jnp.minimum(expert_N, e - 1)
  # A row's slot: its expert's first block, then its place in its group; past the groups, out of range.
  slot_N = (end_block_E - blocks_E)[ex_N] * r + row_N - (end_row_E - group_sizes_E)[ex_N]
  slot_N = jnp.where(expert_N < e, slot_N, m * r)

  def to_blocks(a):  # rows (or their gates) to their slots, Z x R
    return jnp.zeros((m * r, *a.shape[1:]), a.dtype).at[slot_N].set(a, mode="drop").reshape(m, r, *a.shape[1:])

  # Unused blocks (zero rows) take the last expert.
  expert_Z = jnp.minimum(jnp.searchsorted(end_block_E, jnp.arange(m), side="right", method="compare_all"), e - 1)

  def block(_, rows):  # one block per iteration: swiglu_batched with one expert
    i, x_RxD, *gates_R = rows
    w_i = tuple(jax.lax.dynamic_slice_in_dim(wi, i, 1) for wi in w)
    return None, swiglu_batched(x_RxD[None], w_i, gates_R[0][None] if gates_R else None)[0]

  blocks = [to_blocks(x_NxD)] + ([] if gates_N is None else [to_blocks(gates_N)])
  y_ZxRxD = jax.lax.scan(block, None, (expert_Z, *blocks))[1]
  return y_ZxRxD.reshape(m * r, -1).at[slot_N].get(mode="fill", fill_value=0)
