"""The device mesh and the one logical-axis rules table.

Parameters carry logical axis names in their `axes` metadata; activations are pinned with
`constrain(x, names)`. Both go through `spec`, which maps names to mesh axes by the rules in
`mesh.rules`. Model code never names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.experimental.layout import Layout, with_layout_constraint
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from mtp_jax.config import MESH_AXES, MeshConfig

Rules = dict[str, list[str]]
AnyMesh = Mesh | AbstractMesh  # abstract inside a shard_map that makes some axes manual (train.step)
_ACTIVE: contextvars.ContextVar[tuple[AnyMesh, Rules] | None] = contextvars.ContextVar("mesh", default=None)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, sequence, expert, tensor) mesh; sizes of -1 fill the remaining
  devices. With DCN sizes above 1 the mesh spans slices (TPU multi-slice; elsewhere each
  process is one slice): every DCN axis crosses slices and every ICI axis stays inside one."""
  devices = list(jax.devices() if devices is None else devices)
  slices = {getattr(d, "slice_index", None) for d in devices}
  has_slices = len(slices) > 1 and None not in slices  # else (CPU, GPU, one slice): each process is one
  granules = len(slices) if has_slices else len({d.process_index for d in devices})
  ici, dcn = cfg.ici_dcn(len(devices), granules)
  ici_shape, dcn_shape = [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES]
  if math.prod(dcn_shape) > 1:
    grid = mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=not has_slices, allow_split_physical_axes=True
    )
  else:
    try:  # topology-aware on TPU and GPU: keeps the last (busiest) axes on the closest devices
      grid = mesh_utils.create_device_mesh(ici_shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(ici_shape)
  auto = (AxisType.Auto,) * len(MESH_AXES)  # GSPMD propagates layouts between our constraints
  return Mesh(grid, MESH_AXES, axis_types=auto)


def spec(names: Sequence[str | None], shape: Sequence[int], mesh: AnyMesh, rules: Rules) -> PartitionSpec:
  """Logical names -> PartitionSpec. A mesh axis is used at most once per array, and only
  while it divides the dimension, so odd sizes fall back to replication instead of failing.
  Manual axes (inside a shard_map over them) are left out: there shapes are already per shard."""
  used: set[str] = set(mesh.manual_axes)
  out = []
  for name, dim in zip(names, shape, strict=True):
    axes = []
    for ax in rules.get(name, []) if name else []:
      size = mesh.shape[ax]
      if ax in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in axes) * size):
        continue
      axes.append(ax)
      used.add(ax)
    out.append(entry(axes))
  return PartitionSpec(*out)


def axes_of(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, one name or a tuple of them)."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def named(names: Sequence[str | None], shape: Sequence[int], mesh: AnyMesh, rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, spec(names, shape, mesh, rules))


def misfit(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> str | None:
  """Why the rules cannot shard this array as written (a mesh axis that does not divide the
  dimension it is assigned), or None. `spec` would quietly replicate such a dimension; for
  parameters and inputs we refuse instead, so a mesh never silently does less than asked."""
  used: set[str] = set()
  for i, (name, dim) in enumerate(zip(names, shape, strict=True)):
    axes = [ax for ax in rules.get(name, []) if name and ax not in used and mesh.shape[ax] > 1]
    used.update(axes)
    ways = math.prod(mesh.shape[a] for a in axes)
    if dim % ways:
      over = " x ".join(f"{a} ({mesh.shape[a]})" for a in axes)
      return (
        f"dimension {i} ({name}, size {dim}) does not split over mesh axes {over}; change the mesh or mesh.rules.{name}"
      )
  return None


@contextlib.contextmanager
def activate(mesh: AnyMesh, rules: Rules):
  """Makes `constrain` effective while tracing inside this context. Inside a shard_map that
  makes some axes manual, activate the abstract mesh it traces against
  (`jax.sharding.get_abstract_mesh()`): `spec` then leaves those axes out."""
  token = _ACTIVE.set((mesh, rules))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active() -> tuple[AnyMesh, Rules] | None:
  """The (mesh, rules) of the enclosing `activate`, or None: for layers that place work on
  devices themselves (expert-parallel dispatch in shard_map)."""
  return _ACTIVE.get()


def platform(mesh: AnyMesh | None = None) -> str:
  """The backend of `mesh`'s devices (by default the active mesh's), else JAX's default."""
  if mesh is None:
    active = _ACTIVE.get()
    if active is None:
      return jax.default_backend()
    mesh = active[0]
  return (mesh if isinstance(mesh, AbstractMesh) else mesh.abstract_mesh).abstract_device.platform


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout by logical names; a no-op outside `activate`."""
  active = _ACTIVE.get()
  if active is None:
    return x
  return jax.lax.with_sharding_constraint(x, named(names, x.shape, *active))


def fsdp_einsum(
  equation: str, x: jax.Array, x_names: Sequence[str | None], w: jax.Array, w_names: Sequence[str | None]
) -> jax.Array:
  """`jnp.einsum(equation, x, w)`, where `w` is stored split only over mesh axes that split `x`'s
  batch (FSDP storage): in one shard_map, `w` gathered on each device one dimension and one axis
  at a time (`gather`) and multiplied with its rows of `x`, so that the gradient leaves by
  reduce-scatters. Left to the compiler, XLA:TPU summed such weights' whole gradients, and
  gathered those split over several axes by an all-reduce of a zero-padded buffer of every
  device's piece, twice an all-gather's bytes (671B's projections: D over fsdp x expert, or
  heads over fsdp and another dimension over expert; small's over fsdp; benchmarks/RESULTS.md).
  Elsewhere (tensor-parallel splits, `x` split beyond its batch) the compiler places it."""
  active = _ACTIVE.get()
  out_letters = equation.split("->")[1]
  if active is None or out_letters[:1] != equation[:1]:
    return jnp.einsum(equation, x, w)
  mesh, rules = active
  stored, rows = spec(w_names, w.shape, mesh, rules), spec(x_names, x.shape, mesh, rules)
  split = [(d, axes_of(e)) for d, e in enumerate(stored) if e is not None]
  batch = set(axes_of(rows[0]))
  if not split or any(rows[1:]) or not all(set(axes) <= batch for _, axes in split):
    return jnp.einsum(equation, x, w)

  def local(x, w):
    for d, axes in split:
      w = gather(w, axes, d)
    return jnp.einsum(equation, x, w)

  out = PartitionSpec(rows[0], *[None] * (len(out_letters) - 1))
  return jax.shard_map(local, mesh=mesh, in_specs=(rows, stored), out_specs=out, check_vma=False)(x, w)


def gather(x: jax.Array, axes: Sequence[str], dim: int) -> jax.Array:
  """Inside a shard_map: `x` all-gathered along `dim` over the mesh `axes` it is split over, one
  axis at a time, the minor first (its transpose, the gradient's reduce-scatter, goes back the
  same way). Over several axes at once XLA:TPU gathered by an all-reduce of a zero-padded buffer,
  twice the bytes (671B's weights stored with D over fsdp x expert; benchmarks/RESULTS.md).

  An axis that crosses slices (`mesh.dcn`) is gathered between the slices first, then within
  each, and the pieces put back in order: the gradient is then reduce-scattered within the
  slice, over ICI, before its share crosses to the other slices. Gathered in one call, XLA:TPU
  summed the whole gradient within the slice by an all-reduce (4xv6e-256; RESULTS)."""
  active = _ACTIVE.get()
  for a in reversed(axes):
    k = slices_along(active[0], a) if active else 1
    if k == 1:
      x = jax.lax.all_gather(x, a, axis=dim, tiled=True)
      continue
    m = active[0].shape[a] // k  # devices of the axis in one slice; its index is slice * m + j
    between = [[s * m + j for s in range(k)] for j in range(m)]
    within = [[s * m + j for j in range(m)] for s in range(k)]
    for groups in (between, within):
      x = jax.lax.all_gather(x, a, axis=dim, tiled=True, axis_index_groups=groups)
    shape = x.shape  # pieces now ordered (j, s) along dim: put them in index order (s, j)
    x = x.reshape(*shape[:dim], m, k, shape[dim] // (m * k), *shape[dim + 1 :])
    x = jnp.swapaxes(x, dim, dim + 1).reshape(shape)
  return x


@jax.custom_vjp
def keep_layout(x: jax.Array) -> jax.Array:
  """`x` as it is, held in the default (row-major) layout: a consumer that wants another layout
  gets a relayouted copy of this one value, and the compiler cannot move that relayout up into
  whatever `x` was sliced and cast from. Its gradient passes as it comes.

  For one layer's slice of stacked weights: XLA:TPU otherwise laid out the float32 stacks of
  671B's 58 MoE layers anew to suit one matmul of the backward loop, two parameter-sized copies
  held to the optimizer's update (v5p-1024: 3.2 GiB of the peak). Pinning the gradient too moved
  a gradient's reduce-scatter into the microbatch loop. Row-major only: a stored layout XLA:TPU
  chose otherwise (a minor dimension short of whole 128-lane tiles) would be copied
  (benchmarks/RESULTS.md, "the stacked expert weights keep their layout")."""
  return with_layout_constraint(x, Layout(major_to_minor=tuple(range(x.ndim))))


keep_layout.defvjp(lambda x: (keep_layout(x), None), lambda _, g: (g,))


def slices_along(mesh: AnyMesh, axis: str) -> int:
  """The TPU slices a mesh axis's devices span (1 off multi-slice TPU): `make_mesh` lays each
  DCN axis outside its ICI part, so the axis's index runs slice by slice."""
  if isinstance(mesh, AbstractMesh) or mesh.shape[axis] == 1 or mesh.devices.flat[0].platform != "tpu":
    return 1
  line = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), 0).reshape(mesh.shape[axis], -1)[:, 0]
  ids = [getattr(d, "slice_index", None) for d in line]
  if None in ids:
    return 1
  n, k = len(ids), len(set(ids))
  if k == 1 or n % k or any(ids[i] != ids[i - i % (n // k)] for i in range(n)):
    return 1  # one slice, or not in runs of one slice each: gathered in one call
  return k


def lookup_layout(table_shape, tokens_shape) -> tuple[NamedSharding, ...] | None:
  """Layouts for looking up rows of a (vocab, embed) table: the tokens', then the rows' in turn.
  The batch goes over the activation batch axes that do not split the table's embed dimension,
  and the rows are split along embed as the table is. A device then reads only its own slice of
  the table, and the lookup's gradient is a local scatter-add into that slice; the move to the
  activation layout (one all-to-all) is pinned on both passes. Left to itself, XLA gathered every
  device's gradient rows to every device where both data and fsdp split the batch. None outside
  `activate`.

  Inside a shard_map that makes some axes manual (train.step's per-replica microbatches), the
  tokens and the rows first come whole over the other axes, then split as above: each device
  scatter-adds all its replica's gradient rows into its slice of the table, their cotangents
  gathered over those axes (XLA 0.10 chose that itself on tests/test_embed.py's meshes). With
  the tokens split there, jaxlib 0.11 and 0.12 abort partitioning that scatter-add (a failed
  CHECK in XLA's spmd_partitioner_util.cc, ExpandDeviceGroupsWithIota)."""
  active = _ACTIVE.get()
  if active is None:
    return None
  mesh, rules = active
  embed = axes_of(spec(("vocab", "embed"), table_shape, mesh, rules)[1])
  batch, length = (
    entry([a for a in axes_of(e) if a not in embed])
    for e in spec(("act_batch", "act_length"), tokens_shape, mesh, rules)
  )
  specs = [PartitionSpec(batch, length), PartitionSpec(batch, length, entry(embed))]
  if mesh.manual_axes:  # whole over the other axes first (above)
    specs = [PartitionSpec(), PartitionSpec(None, None, entry(embed)), specs[1]]
  return tuple(NamedSharding(mesh, s) for s in specs)


def entry(axes: Sequence[str]):
  """One PartitionSpec entry for mesh axes (the inverse of `axes_of`)."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def tree_shardings(tree, mesh: Mesh, rules: Rules):
  """Shardings for a pytree of (abstract) arrays: nnx Variables by their `axes` metadata,
  everything else replicated."""

  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("axes") or (None,) * leaf.get_value().ndim
      return leaf.replace(named(names, leaf.get_value().shape, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, rules: Rules, shape: Sequence[int]) -> NamedSharding:
  """Sharding of a (batch, length) input array."""
  return named(("act_batch", "act_length"), shape, mesh, rules)


def host_rows(sharding: jax.sharding.Sharding, shape: Sequence[int]) -> list[int]:
  """The rows of a global (batch, ...) array that this process's devices hold, in order: the
  rows its data pipeline reads."""
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
    rows.update(range(*index[0].indices(shape[0])))
  return sorted(rows)


def from_host_rows(local: np.ndarray, rows: list[int], sharding: jax.sharding.Sharding, shape: Sequence[int]):
  """The global array whose `rows` (host_rows) are `local`'s, placed with `sharding`."""
  at = {r: i for i, r in enumerate(rows)}

  def part(index):
    return local[[at[r] for r in range(*index[0].indices(shape[0]))]][(slice(None), *index[1:])]

  return jax.make_array_from_callback(tuple(shape), sharding, part)
