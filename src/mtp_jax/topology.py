"""TPU chips and slices, and GPU hosts: the tables, the --topology names of `mtp-compile` and
launch/gke.sh, and the devices to compile for (libtpu's or the CUDA plugin's compile-only
devices, or this machine's)."""

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


@dataclasses.dataclass(frozen=True)
class Gpu:
  """An NVIDIA GPU as XLA:GPU compiles for it with none attached (its GpuTargetConfig), and as
  the roofline and the fit verdict count it."""

  name: str  # --topology's
  kind: str  # what CUDA names it: JAX's device_kind
  memory: int  # bytes, the total CUDA reports, of which JAX's allocator takes a share (gpu_memory_share)
  hbm_bandwidth: float  # bytes/s, from the data sheet
  l2_bytes: int


# H100 SXM: 84,929,347,584 bytes as CUDA reports them on one (XLA's and JAX's deviceless examples).
# H200: nvidia-smi shows 143,771 MiB (../.library/device/KINDS.md); CUDA's total is taken as that
# less the 564 MiB by which an H100's falls short of its nvidia-smi figure (81,559 MiB), until a
# GPU session reads it. Bandwidth 3.35 and 4.8 TB/s, L2 50 and 60 MB: data sheets and PyTorch's
# reading there. Peak FLOP/s come from train.metrics.peak_flops, by `kind`.
GPUS = {
  "h100": Gpu("h100", "NVIDIA H100 80GB HBM3", 84_929_347_584, 3.35e12, 50 * 2**20),
  "h200": Gpu("h200", "NVIDIA H200", 143_207 * 2**20, 4.8e12, 60 * 2**20),
}
GPUS_PER_HOST = 8  # an HGX board's NVLink domain


def gpu_target_config(gpu: Gpu) -> str:
  """XLA's GpuTargetConfig for `gpu`, as text: Hopper (compute capability 9.0, 132 SMs), CUDA 13
  and cuDNN 9.12 as the CUDA plugin that jax[cuda13-local] installs needs at least."""
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.hbm_bandwidth)}
  l2_cache_size: {gpu.l2_bytes}
  clock_rate_ghz: 1.98
  device_memory_size: {gpu.memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version {{ major: 13 minor: 0 }}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 12 }}
device_description_str: "{gpu.kind}"
"""


def gpu_memory_share() -> tuple[float, str]:
  """The share of a GPU's memory JAX's allocator may use in a run started from this environment,
  and the setting that says so, read as JAX's GPU client reads them (jaxlib's xla_client, 0.10
  and 0.11): XLA_CLIENT_MEM_FRACTION, or its deprecated name XLA_PYTHON_CLIENT_MEM_FRACTION (JAX
  refuses both at once), 0.75 where neither is set; the whole GPU with
  XLA_PYTHON_CLIENT_ALLOCATOR=platform, which allocates on demand from CUDA, with no pool."""
  if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
    return 1.0, "XLA_PYTHON_CLIENT_ALLOCATOR=platform: no pool, all of it"
  names = [n for n in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION") if os.environ.get(n)]
  if len(names) == 2:
    raise TopologyError("XLA_PYTHON_CLIENT_MEM_FRACTION: beside XLA_CLIENT_MEM_FRACTION, its new name; JAX takes one")
  if not names:
    return 0.75, "XLA_CLIENT_MEM_FRACTION unset: 0.75"
  given = f"{names[0]}={os.environ[names[0]]}"
  try:
    share = float(os.environ[names[0]])
  except ValueError:
    raise TopologyError(f"{given}: not a number") from None
  if not 0 < share <= 1:
    raise TopologyError(f"{given}: not a share between 0 and 1")
  return share, given


FORMS = (
  "v5p-N or v4-N (N TensorCores, 2 per chip), v6e-N, v5e-N or v5litepod-N (N chips), a shape such as "
  "v5p:4x4x8 or v6e:16x16, KxNAME for K slices (2xv5p-256), h100 or h200 (one GPU), h100:N (N GPUs of "
  f"one host, up to {GPUS_PER_HOST}), Kxh100:N (K such hosts), cpu:N (N fake CPU devices) or local"
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
  gpu: Gpu | None = None  # h100:N and the like
  hosts: int = 1  # of gpus_per_host GPUs each
  gpus_per_host: int = 0

  @property
  def chips(self) -> int:
    if self.gpu:
      return self.hosts * self.gpus_per_host
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
  if m := re.fullmatch(rf"(?:(\d+)x)?({'|'.join(GPUS)})(?::(\d+))?", text):
    hosts, per_host = int(m[1] or 1), int(m[3] or 1)
    if hosts < 1 or not 1 <= per_host <= GPUS_PER_HOST:
      raise TopologyError(f"--topology {text}: a host has 1 to {GPUS_PER_HOST} GPUs, and a job at least one host")
    return Topology(text, gpu=GPUS[m[2]], hosts=hosts, gpus_per_host=per_host)
  m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)(?:-(\d+)|:(\d+(?:x\d+)*))", text)
  gen = _ALIASES.get(m[2], m[2]) if m else None
  if gen not in CHIPS:
    raise TopologyError(f"--topology {text}: not a TPU slice or GPU this command knows; use {FORMS}")
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
  """Set before JAX starts: the fake CPU device count; libtpu told that no TPU is attached; the
  CPU as JAX's default backend when compiling for GPUs (the CUDA plugin then skips its checks of
  a local driver and GPU, which a machine without one fails)."""
  if topo.gpu:
    gpu_memory_share()  # the CUDA plugin reads it as JAX starts, and fails with a traceback on a bad one
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"  # compile-only executables cannot be read back from it
  elif topo.cpu_devices:
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
  """The devices to compile for: compile-only TPU or GPU devices, or real local ones."""
  import jax

  if topo.gpu:
    return _gpus(topo)
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


def _gpus(topo: Topology) -> list:
  """Compile-only GPUs from JAX's CUDA plugin: `hosts` processes of `gpus_per_host` each, as a
  job of one process per host runs them (sharding.make_mesh's granules for mesh.dcn)."""
  from jax.experimental import topologies

  try:
    found = topologies.get_topology_desc(
      topo.gpu.name, "cuda", target_config=gpu_target_config(topo.gpu), topology=f"1x{topo.hosts}x{topo.gpus_per_host}"
    )
  except NotImplementedError:  # no CUDA plugin: JAX knows no "cuda" platform
    raise TopologyError(f"--topology {topo.name}: needs JAX's CUDA plugin: pip install 'mtp-jax[gpu-aot]'") from None
  except RuntimeError as err:
    raise TopologyError(f"--topology {topo.name}: JAX's CUDA plugin: {first_line(err)}") from None
  return list(found.devices)
