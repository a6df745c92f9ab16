"""TPU chips and slices: the chip table, the --topology names of `mtp-compile` and launch/gke.sh,
and the devices to compile for (libtpu's compile-only devices, or this machine's)."""

from __future__ import annotations

import dataclasses
import math
import os
import re

from mtp_jax.errors import InputError, first_line

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation, as Cloud TPU names count it and as the compiler budgets it."""

  name: str  # libtpu's, as in "v5p:8x8x8"
  hbm_gib: float  # what libtpu 0.0.42.1 lets one program use (its "available HBM"), a little under the data sheet's
  hbm_bandwidth: float  # bytes/s, from the data sheet
  cores_per_chip: int  # v4-8 and v5p-8 name TensorCores: 4 chips of 2 cores, one JAX device each (megacore)
  dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)


# Data sheets (cloud.google.com/tpu/docs/v4, v5p, v5e, v6e): HBM 32 GiB, 95 GiB, 16 GB, 32 GB;
# bandwidth 1200, 2765, 819, 1638 GB/s. Peak FLOP/s come from train.metrics.peak_flops.
CHIPS = {
  "v4": Chip("v4", 30.75, 1200e9, 2, 3),
  "v5p": Chip("v5p", 95.74, 2765e9, 2, 3),
  "v5e": Chip("v5e", 15.75, 819e9, 1, 2),
  "v6e": Chip("v6e", 31.25, 1638e9, 1, 2),
}
_ALIASES = {"v5litepod": "v5e"}
DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p"}
DEVICE_KINDS |= {"TPU v6 lite": "v6e", "TPU v6e": "v6e"}

# The standard single-slice shapes by chip count (Cloud TPU's v4/v5p and v5e/v6e tables).
_SHAPES_3D = {
  4: (2, 2, 1),
  8: (2, 2, 2),
  16: (2, 2, 4),
  32: (2, 4, 4),
  64: (4, 4, 4),
  128: (4, 4, 8),
  256: (4, 8, 8),
  512: (8, 8, 8),
  768: (8, 8, 12),
  1024: (8, 8, 16),
  2048: (8, 16, 16),
  4096: (16, 16, 16),
  6144: (16, 16, 24),
}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}

FORMS = (
  "v5p-N or v4-N (N TensorCores, 2 per chip), v6e-N, v5e-N or v5litepod-N (N chips), a shape such as "
  "v5p:4x4x8 or v6e:16x16, KxNAME for K slices (2xv5p-256), cpu:N (N fake CPU devices) or local"
)


class TopologyError(InputError):
  """A --topology this command cannot describe, as one line."""


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # as given
  chip: Chip | None = None  # None: CPU or this machine's devices
  shape: tuple[int, ...] = ()  # chips of one slice along each torus axis
  slices: int = 1
  cpu_devices: int = 0  # cpu:N

  @property
  def chips(self) -> int:
    return math.prod(self.shape) * self.slices if self.chip else self.cpu_devices

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

  @property
  def cloud_name(self) -> str:
    """One slice's accelerator type, e.g. v5p-1024."""
    prefix = "v5litepod" if self.chip.name == "v5e" else self.chip.name
    return f"{prefix}-{math.prod(self.shape) * self.chip.cores_per_chip}"


def parse_topology(text: str) -> Topology:
  """`v5p-1024`, `2xv6e-256`, `v5p:8x8x8`, `cpu:8`, `local` -> Topology; TopologyError otherwise."""
  text = text.strip()
  if text == "local":
    return Topology(text)
  if m := re.fullmatch(r"cpu:(\d+)", text):
    if int(m[1]) < 1:
      raise TopologyError(f"--topology {text}: needs at least one device")
    return Topology(text, cpu_devices=int(m[1]))
  m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)*))", text)
  gen = _ALIASES.get(m[2], m[2]) if m else None
  if gen not in CHIPS:
    raise TopologyError(f"--topology {text}: not a TPU slice this command knows; use {FORMS}")
  chip, slices = CHIPS[gen], int(m[1] or 1)
  if slices < 1:
    raise TopologyError(f"--topology {text}: needs at least one slice")
  if m[4]:  # an explicit shape
    shape = tuple(int(s) for s in m[4].split("x"))
    if len(shape) != chip.dims or min(shape) < 1:
      example = "x".join(["4"] * chip.dims)
      raise TopologyError(f"--topology {text}: a {gen} slice has {chip.dims} dimensions, e.g. {gen}:{example}")
    return Topology(text, chip, shape, slices)
  count = int(m[3])
  shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
  chips, rest = divmod(count, chip.cores_per_chip)
  if rest or chips not in shapes:
    known = ", ".join(str(n * chip.cores_per_chip) for n in shapes)
    unit = "TensorCores" if chip.cores_per_chip > 1 else "chips"
    raise TopologyError(
      f"--topology {text}: no standard {m[2]} slice has {count} {unit} (known: {known}); "
      f"give the shape instead, e.g. {gen}:{'x'.join(map(str, shapes[max(shapes)]))}"
    )
  return Topology(text, chip, shapes[chips], slices)


def prepare_environment(topo: Topology) -> None:
  """Set before JAX starts: the fake CPU device count, and libtpu told that no TPU is attached."""
  if topo.cpu_devices:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={topo.cpu_devices}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif topo.chip:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the pod; do not look for a local TPU
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM here: silence libtpu's probe
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # nor ask a GCE metadata server about one
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to lock, so runs may overlap
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", topo.cloud_name)  # else libtpu warns it cannot tell
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # compile-only executables cannot be read back from it


def devices(topo: Topology) -> list:
  """The devices to compile for: compile-only TPU devices, or real local ones."""
  import jax

  if topo.chip is None:
    local = jax.devices()
    if topo.cpu_devices > len(local) or (topo.cpu_devices and local[0].platform != "cpu"):
      raise TopologyError(
        f"--topology {topo.name}: JAX started with {len(local)} {local[0].platform} device(s); "
        "run mtp-compile in a fresh process"
      )
    return local[: topo.cpu_devices] if topo.cpu_devices else local
  from jax.experimental import topologies

  # Each slice is described as one host. The compiled program does not depend on how chips are
  # split among hosts, and a single slice's compile-only devices carry no `slice_index`, so
  # `sharding.make_mesh` would count each of its hosts as a slice.
  kw = {"chips_per_host_bounds": (*topo.shape, 1)[:3]}
  if topo.slices > 1:
    kw["num_slices"] = topo.slices  # devices then carry slice_index, for mesh.dcn
  if topo.chip.cores_per_chip > 1:
    kw["chip_config_name"] = "megacore"  # one device per chip, as JAX runs v4 (v5p's default)
  try:
    return list(topologies.get_topology_desc(topo.libtpu_name, "tpu", **kw).devices)
  except RuntimeError as err:
    if "TPU support not installed" in str(err):
      raise TopologyError(f"--topology {topo.name}: needs libtpu: pip install 'mtp-jax[tpu-aot]'") from None
    raise TopologyError(f"--topology {topo.name}: libtpu: {first_line(err)}") from None
