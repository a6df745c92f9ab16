"""The routed experts: E SwiGLU FFNs with stacked weights, and the kernels that run them.

Two layouts of the rows reach them (`dispatch.py` makes both):
- fixed buffers, E x C x D (capacity mode): one batched matmul per projection;
- rows sorted by expert with a size per expert (dropless): `swiglu_ragged`.

Shape letters beyond the package legend (model/__init__.py): C buffer slots per expert
(capacity) · N rows · R rows per block · Z blocks (`swiglu_blocked`).
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

# Where `swiglu_ragged` runs the blocked loop, and where megablox's grouped matmuls, instead of
# lax.ragged_dot; read at trace time (benchmarks/moe_experts.py changes them to compare).
BLOCKED_BACKENDS = frozenset({"cpu"})
GMM_BACKENDS = frozenset({"tpu"})


class Experts(nnx.Module):
  """E SwiGLU experts with stacked weights."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f, std = cfg.moe.num_experts, cfg.d_model, cfg.moe.expert_d_ff, cfg.init_std
    pdt = jnp.dtype(cfg.param_dtype)
    self.w_gate = weight(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pdt)
    self.w_up = weight(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pdt)
    self.w_down = weight(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, pdt)
    self.dtype = jnp.dtype(cfg.dtype)

  def weights(self) -> Weights:
    return tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))


def swiglu_batched(x_ExCxD: jax.Array, w: Weights) -> jax.Array:
  """Each expert's SwiGLU over its own fixed-size buffer of rows."""
  x_ExCxD = checkpoint_name(x_ExCxD, "moe_in")
  gate = jnp.einsum("ecd,edf->ecf", x_ExCxD, w[0])
  up = jnp.einsum("ecd,edf->ecf", x_ExCxD, w[1])
  return checkpoint_name(jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w[2]), "moe_out")


def swiglu_ragged(x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array) -> jax.Array:
  """Each expert's SwiGLU over its rows: rows sorted by expert, group_sizes_E of them to each in
  turn, rows past their sum giving zeros. TPUs get megablox's grouped matmuls (`swiglu_gmm`):
  XLA:TPU runs `lax.ragged_dot`'s forward as one, but its weight gradient as a product of every
  row with every expert. GPUs get `lax.ragged_dot`, left to their compiler (docs/scaling.md, "Where the
  experts run"). JAX lowers that for CPU as every row times every expert, masked (E times the
  FLOPs), so there the rows go in blocks of one expert (`swiglu_blocked`)."""
  platform, x_NxD = _platform(), checkpoint_name(x_NxD, "moe_in")
  if platform in BLOCKED_BACKENDS:
    y_NxD = swiglu_blocked(x_NxD, w, group_sizes_E)
  elif platform in GMM_BACKENDS:
    y_NxD = swiglu_gmm(x_NxD, w, group_sizes_E)
  else:
    y_NxD = swiglu_ragged_dot(x_NxD, w, group_sizes_E)
  return checkpoint_name(y_NxD, "moe_out")


def swiglu_ragged_dot(x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array) -> jax.Array:
  """`swiglu_ragged` through `lax.ragged_dot`, on any backend."""
  gate = jax.lax.ragged_dot(x_NxD, w[0], group_sizes_E)
  up = jax.lax.ragged_dot(x_NxD, w[1], group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w[2], group_sizes_E)


def swiglu_gmm(x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array, interpret: bool = False) -> jax.Array:
  """`swiglu_ragged` through megablox's Pallas grouped matmuls (MaxText's TPU kernel): `gmm`
  forward and for the input gradient, `tgmm` for the weight gradient, each touching only its
  own group's rows. Rows past the groups are zeroed on the way in and out (the kernel leaves
  them unwritten). `interpret` runs the kernels on any backend, for tests."""
  from jax.experimental.pallas.ops.tpu.megablox import ops

  n = x_NxD.shape[0]
  rows = -(-n // 16) * 16 if n <= 512 else -(-n // 512) * 512  # whole row tiles (`_gmm_tiles`)
  valid_N = jnp.arange(n) < group_sizes_E.sum()
  x_RxD = jnp.pad(jnp.where(valid_N[:, None], x_NxD, 0), ((0, rows - n), (0, 0)))
  sizes = group_sizes_E.astype(jnp.int32)

  def gmm(lhs, rhs):
    return ops.gmm(lhs, rhs, sizes, lhs.dtype, _gmm_tiles, None, None, False, interpret)

  h_RxF = jax.nn.silu(gmm(x_RxD, w[0])) * gmm(x_RxD, w[1])
  return jnp.where(valid_N[:, None], gmm(h_RxF, w[2])[:n], 0)


def _gmm_tiles(m: int, k: int, n: int) -> tuple[int, int, int]:
  """megablox tiles for an m x k by k x n product, forward or backward (the kernel calls this
  for each): up to 512 rows, and along k and n the largest of 512, 256, 128 that divides the
  dim, else the whole dim (a TPU block is a multiple of 128 lanes or the whole array)."""

  def tile(x: int) -> int:
    return next((t for t in (512, 256, 128) if x % t == 0), x)

  return min(512, m), tile(k), tile(n)


def swiglu_blocked(x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array) -> jax.Array:
  """`swiglu_ragged` as dense blocks: each expert's rows are padded to whole blocks of R rows,
  and a loop multiplies each block by its own expert's weights, read in place (gathering every
  block's weights would copy them: slower than the masked product at decoding sizes). Blocks of
  R = N / 2E rows keep the padding under about half the rows, and the block count Z static:
  sum over experts of ceil(g_e / R) <= (N + min(E, N)(R - 1)) / R."""
  n, d = x_NxD.shape
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
  x_ZxRxD = jnp.zeros((m * r, d), x_NxD.dtype).at[slot_N].set(x_NxD, mode="drop").reshape(m, r, d)
  # Unused blocks (zero rows) take the last expert.
  expert_Z = jnp.minimum(jnp.searchsorted(end_block_E, jnp.arange(m), side="right", method="compare_all"), e - 1)

  def block(_, rows):  # one block per iteration: swiglu_batched with one expert
    x_RxD, i = rows
    return None, swiglu_batched(x_RxD[None], tuple(jax.lax.dynamic_slice_in_dim(wi, i, 1) for wi in w))[0]

  y_ZxRxD = jax.lax.scan(block, None, (x_ZxRxD, expert_Z))[1]
  return y_ZxRxD.reshape(m * r, d).at[slot_N].get(mode="fill", fill_value=0)


def _platform() -> str:
  """The backend the layer is being traced for: the active mesh's, else JAX's default."""
  active = sharding.active()
  return active[0].devices.flat[0].platform if active else jax.default_backend()
