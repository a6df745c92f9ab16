"""`mtp-compile --config configs/deepseek-v3-671b.yaml --topology v5p-1024`: does a config fit a pod?

Compiles the full train step for a TPU slice on this machine, with no TPU: libtpu's compile-only
devices (`jax.experimental.topologies`) stand in for the chips, so the memory and FLOPs are the
compiler's own for that pod. Prints per-chip memory against HBM, FLOPs per step, a roofline step
time and the MFU it implies. Exit status 0: fits; 1: does not fit; 2: bad input.

TPU names need libtpu (`pip install 'mtp-jax[tpu-aot]'`); `--topology cpu:8` (8 fake CPU devices)
and `--topology local` (this machine's devices) need nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

from mtp_jax.cli import command_parser, load_config

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
_DEVICE_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p", "TPU v5p": "v5p"}
_DEVICE_KINDS |= {"TPU v6 lite": "v6e", "TPU v6e": "v6e"}

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


class TopologyError(ValueError):
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
    raise TopologyError(f"--topology {topo.name}: libtpu: {str(err).splitlines()[0]}") from None


@dataclasses.dataclass
class Report:
  """What one compile says; bytes and FLOPs are per chip unless named `_per_step`."""

  topology: str
  chips: int
  slices: int
  device_kind: str
  mesh: dict[str, int]
  expert_dispatch: str | None  # gspmd, all_to_all or ragged_all_to_all; None: no experts split over devices
  attention: str  # the attention kernel and why: "splash (auto on TPU)"
  receive_buffer: tuple[float, float] | None  # ragged_all_to_all: (rows received into, worst case) / rows sent
  notes: list[str]  # how the config maps onto the devices, where it is not what was asked
  lower_s: float
  compile_s: float
  grad_accum_steps: int
  memory: dict[str, int] | None  # arguments, outputs, aliased, temporaries, code, total, peak
  needs_bytes: float | None  # XLA:TPU's peak, else the total; the compiler's figure; the state when skipped
  hbm_bytes: float | None
  fits: bool | None
  compiled: bool  # False: skipped, the train state alone is over HBM
  state_bytes: int  # parameters, optimizer state and step: the floor under every other figure
  compiler_error: str | None  # the compiler's out-of-memory line
  params: int
  active_params: int
  tokens_per_step: int
  model_flops_per_step: float  # analytic: train_flops_per_token x tokens, no rematerialisation
  traced_flops: float | None  # matmul FLOPs of the traced program, global shapes split evenly over the chips
  partitioned_flops: float | None  # matmul FLOPs of the compiled program one chip runs: the roofline's
  repeated: str | None  # when a chip runs over 1.15x its share of the traced matmuls: how much, and where
  xla_bytes: float | None  # XLA's HBM bytes accessed, the accumulation loop's body x its count: a floor
  xla_optimal_seconds: float | None  # raw; see _estimate
  peak_flops: float | None
  hbm_bandwidth: float | None
  step_s: float | None  # roofline estimate
  bound: str | None  # "compute" or "memory"
  mfu: float | None


def check(cfg, topo: Topology, *, hbm_gib: float | None = None) -> Report:
  """Builds and compiles the train step for `topo`; raises ConfigError or TopologyError on bad input."""
  from mtp_jax.model import dispatch as moe_dispatch
  from mtp_jax.model.flops import chip_work, cost, traced_matmul_flops
  from mtp_jax.train.metrics import peak_flops
  from mtp_jax.train.program import build
  from mtp_jax.train.program import memory as program_memory

  devs = devices(topo)
  program = build(cfg, devs)
  chip = topo.chip or CHIPS.get(_DEVICE_KINDS.get(devs[0].device_kind, ""))
  hbm = hbm_gib * GiB if hbm_gib else _hbm(chip, devs[0])
  state = state_bytes(program.abstract_state)
  compiled, error, lower_s, compile_s, traced_flops, work = None, None, 0.0, 0.0, None, None
  if not (hbm and state > hbm):  # else no compile can fit: say so now, not after many minutes
    start = time.perf_counter()
    traced = program.step.trace(program.abstract_state, program.abstract_batch())
    traced_flops = traced_matmul_flops(traced.jaxpr, len(devs))
    lowered = traced.lower()
    lower_s = time.perf_counter() - start
    try:
      compiled = lowered.compile()
    except Exception as err:  # XLA:TPU refuses a program that does not fit HBM
      if "RESOURCE_EXHAUSTED" not in str(err):
        raise
      error = str(err).splitlines()[0]
    compile_s = time.perf_counter() - start - lower_s
    if compiled:
      work = chip_work(traced.jaxpr, compiled.as_text(), len(devs))

  accum = program.cfg.train.grad_accum_steps  # resolved: -1 becomes a count for this mesh
  m = cfg.model.moe
  group = moe_dispatch.expert_group(m, program.mesh, cfg.mesh.rules) if m.num_experts else 1
  dispatch, buffer = (program.expert_dispatch if group > 1 else None), None
  if dispatch == "ragged_all_to_all":
    sent = m.top_k * 10**6  # the ratios do not depend on the rows sent; many keep ceil's rounding out of sight
    rows, worst = moe_dispatch.receive_rows(m, group, sent)
    buffer = (rows / sent, worst / sent)
  c = cost(cfg.model, cfg.data.seq_len, cfg.train.trainable)
  tokens = cfg.train.batch_size * cfg.data.seq_len
  memory = program_memory(compiled) if compiled else None
  needs, available = _refusal(error)
  if memory:  # XLA:TPU's peak is what it holds under HBM; elsewhere (CPU) it leaves temporaries out
    needs = memory["peak"] if chip and memory["peak"] else memory["total"]
  elif not compiled and not error:
    needs = state
  if available and hbm_gib is None:
    hbm = available
  counts = _cost(compiled) if compiled else {}
  # XLA counts a while loop's body once, so its FLOPs are no use for a step of scanned layers,
  # query blocks and microbatches (the traced count above is exact). Its HBM bytes, scaled by the
  # accumulation loop's count, are still a floor: the inner loops' bodies count once.
  xla_bytes = counts["bytes accessed"] * accum if "bytes accessed" in counts else None
  report = Report(
    topology=topo.name,
    chips=len(devs),
    slices=topo.slices,
    device_kind=devs[0].device_kind,
    mesh={k: int(v) for k, v in program.mesh.shape.items()},
    expert_dispatch=dispatch,
    attention=program.attention,
    receive_buffer=buffer,
    notes=program.notes,
    lower_s=lower_s,
    compile_s=compile_s,
    grad_accum_steps=accum,
    memory=memory,
    needs_bytes=needs,
    hbm_bytes=hbm,
    fits=(needs <= hbm) if needs is not None and hbm else (False if error else None),
    compiled=compiled is not None or error is not None,
    state_bytes=state,
    compiler_error=error,
    params=c.total_params,
    active_params=c.active_params,
    tokens_per_step=tokens,
    model_flops_per_step=c.train_flops_per_token * tokens,
    traced_flops=traced_flops,
    partitioned_flops=work.partitioned if work else None,
    repeated=work.warning() if work else None,
    xla_bytes=xla_bytes,
    xla_optimal_seconds=counts.get("optimal_seconds"),
    peak_flops=peak_flops(devs[0]),
    hbm_bandwidth=chip.hbm_bandwidth if chip else None,
    step_s=None,
    bound=None,
    mfu=None,
  )
  _estimate(report)
  return report


def state_bytes(abstract_state) -> int:
  """Bytes of the train state on the busiest device, from each array's sharding."""
  import jax

  total = 0
  for x in jax.tree.leaves(abstract_state):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


def _hbm(chip: Chip | None, device) -> float | None:
  if chip:
    return chip.hbm_gib * GiB
  try:  # a local GPU or TPU says how much it has; CPUs do not
    stats = device.memory_stats()
  except Exception:
    stats = None
  return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def _cost(compiled) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list | tuple):  # one per program in older JAX
    analysis = analysis[0] if analysis else None
  return {k: float(v) for k, v in (analysis or {}).items() if k in ("bytes accessed", "optimal_seconds")}


# XLA:TPU refuses with "the total memory required for HLO temporaries (149.06G) exceeds available
# HBM (95.74G)" (libtpu 0.0.42.1; older ones: "Used 120.5G of 95.74G hbm"), G meaning GiB. The
# first figure is the whole need, arguments included, whatever the wording says.
_SIZE = r"([\d.]+)([KMGT]?)"
_REFUSALS = [rf"HLO temporaries \({_SIZE}\) exceeds available HBM \({_SIZE}\)", rf"Used {_SIZE} of {_SIZE} hbm"]
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}


def _refusal(error: str | None) -> tuple[float | None, float | None]:
  """(bytes needed, bytes available) per chip from the compiler's out-of-memory line."""
  for pattern in _REFUSALS:
    if m := re.search(pattern, error or ""):
      return float(m[1]) * _UNITS[m[2]], float(m[3]) * _UNITS[m[4]]
  return None, None


def _estimate(r: Report) -> None:
  """Roofline step time: max(FLOPs / peak, HBM bytes / bandwidth) per chip, with the matmul
  FLOPs of the partitioned program and XLA's floor on HBM bytes.

  XLA:TPU's own `optimal_seconds` is no step time: it sums per-instruction estimates, counts a
  loop body once, and comes out negative for the MoE programs (it seems to add -1 for each async
  call it cannot time). The roofline ignores communication and overlap, so it is a lower bound on
  the step time and the MFU an upper bound."""
  if not (r.partitioned_flops and r.memory and r.peak_flops and r.hbm_bandwidth):  # none for a refused step
    return
  compute, memory = r.partitioned_flops / r.peak_flops, (r.xla_bytes or 0) / r.hbm_bandwidth
  r.step_s, r.bound = max(compute, memory), "compute" if compute >= memory else "memory"
  r.mfu = r.model_flops_per_step / (r.step_s * r.peak_flops * r.chips)


def _size(b: float) -> str:
  for unit, scale in [("GiB", GiB), ("MiB", 2**20)]:
    if b >= scale / 10:
      return f"{b / scale:,.1f} {unit}"
  return f"{b / 2**10:,.1f} KiB"


def _count(n: float) -> str:
  for unit, scale in [("B", 1e9), ("M", 1e6), ("K", 1e3)]:
    if n >= scale:
      return f"{n / scale:,.1f}{unit}"
  return f"{n:,.0f}"


def _seconds(t: float) -> str:
  for unit, scale in [("s", 1.0), ("ms", 1e-3)]:
    if t >= scale:
      return f"{t / scale:,.2f} {unit}"
  return f"{t / 1e-6:,.1f} us"


def _experts(r: Report) -> str:
  """How tokens reach the experts, and for ragged_all_to_all the receive buffer, which can be
  what decides the fit."""
  if not r.receive_buffer:
    return {"gspmd": "gspmd: the compiler moves the tokens", "all_to_all": "all_to_all of capacity buffers"}[
      r.expert_dispatch
    ]
  rows, worst = r.receive_buffer
  if rows == worst:
    return (
      f"ragged_all_to_all: each chip receives into {worst:.3g}x the rows it sends, the worst case "
      "(nothing drops; model.moe.ragged_buffer_factor bounds it)"
    )
  return (
    f"ragged_all_to_all: each chip receives into {rows:.3g}x the rows it sends "
    f"(model.moe.ragged_buffer_factor; the worst case is {worst:.3g}x; overflow is dropped)"
  )


def describe(r: Report) -> list[str]:
  """The report as a few readable lines, the verdict last."""
  slices = f" in {r.slices} slices" if r.slices > 1 else ""
  micro = f" in {r.grad_accum_steps} microbatches" if r.grad_accum_steps > 1 else ""
  lines = [
    f"topology   {r.topology}: {r.chips} chips{slices} ({r.device_kind})",
    "mesh       " + ", ".join(f"{k} {v}" for k, v in r.mesh.items()),
    f"model      {_count(r.params)} parameters ({_count(r.active_params)} active per token); "
    f"{r.tokens_per_step:,} tokens per step{micro}",
    f"state      {_size(r.state_bytes)} per chip: parameters, optimizer state, step",
  ]
  lines.append(f"attention  {r.attention}")
  if r.expert_dispatch:
    lines.append("experts    " + _experts(r))
  lines += [f"note       {note}" for note in r.notes]
  if r.compiled:
    lines.append(f"compile    lowered in {r.lower_s:,.0f} s, compiled in {r.compile_s:,.0f} s")
  if r.memory:
    m = r.memory
    peak = f", peak live {_size(m['peak'])}" if m["peak"] else ""
    share = f" (HBM {_size(r.hbm_bytes)})" if r.hbm_bytes else ""
    lines.append(
      f"memory     per chip: arguments {_size(m['arguments'])}, outputs {_size(m['outputs'])} "
      f"({_size(m['aliased'])} of them over donated arguments), temporaries {_size(m['temporaries'])}, "
      f"code {_size(m['code'])}; sum {_size(m['total'])}{peak}{share}"
    )
  if r.compiler_error:
    lines.append(f"compiler   {r.compiler_error}")
  model = f"{r.model_flops_per_step / r.chips:.3g} model FLOPs (analytic, no rematerialisation)"
  traffic = f"; HBM traffic >= {_size(r.xla_bytes)} (XLA's count, inner loop bodies once)" if r.xla_bytes else ""
  counts = []
  for flops, what in [
    (r.partitioned_flops, "in the matmuls the chip runs (the compiled, partitioned program)"),
    (r.traced_flops, "as traced, an even share of every matmul"),
  ]:
    if flops:
      counts.append(f"{flops:.3g} {what}: {flops * r.chips / r.model_flops_per_step:.2f} x the model's")
  loops = " (loops x their trip counts, rematerialisation included)" if counts else ""
  lines.append(f"flops      per chip per step{loops}: {'; '.join([*counts, model])}{traffic}")
  if r.repeated:
    lines.append(f"warning    {r.repeated}")
  if r.step_s:
    lines.append(
      f"step time  >= {_seconds(r.step_s)}, a roofline: max(FLOPs / "
      f"{r.peak_flops / 1e12:,.0f} TFLOP/s, HBM bytes / {r.hbm_bandwidth / 1e9:,.0f} GB/s), "
      f"{r.bound}-bound; communication and overlap not modelled"
    )
    lines.append(f"MFU        <= {r.mfu:.1%} at that step time: model FLOPs / (step time x peak x chips)")
  if r.fits is None:
    lines.append("fit unknown: no HBM size for these devices (pass --hbm-gib)")
  elif r.fits:
    share = f"{r.needs_bytes / r.hbm_bytes:.0%}"
    lines.append(f"fits: needs {_size(r.needs_bytes)} per chip, the chip has {_size(r.hbm_bytes)} ({share} used)")
  elif not r.compiled:
    lines.append(
      f"does not fit: the train state alone needs {_size(r.state_bytes)} per chip, the chip has "
      f"{_size(r.hbm_bytes)}; not compiled (more chips, more fsdp, or fewer parameters)"
    )
  elif r.needs_bytes is not None and r.hbm_bytes:
    lines.append(f"does not fit: needs {_size(r.needs_bytes)} per chip, the chip has {_size(r.hbm_bytes)}")
  else:
    lines.append("does not fit: the compiler ran out of HBM")
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = command_parser("mtp-compile", "Compile the train step for a TPU topology: memory, FLOPs, step time.")
  parser.add_argument("--topology", required=True, metavar="NAME", help=f"one of: {FORMS}")
  parser.add_argument("--hbm-gib", type=float, metavar="GIB", help="judge the fit against this HBM per chip instead")
  parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
  args = parser.parse_args(argv)
  try:
    topo = parse_topology(args.topology)
  except TopologyError as err:
    print(f"{parser.prog}: {err}", file=sys.stderr)
    return 2
  prepare_environment(topo)  # before JAX starts
  cfg = load_config(parser.prog, args.config, args.overrides)

  from mtp_jax.config import ConfigError

  try:
    report = check(cfg, topo, hbm_gib=args.hbm_gib)
  except (ConfigError, TopologyError) as err:
    print(f"{parser.prog}: {err}", file=sys.stderr)
    return 2
  config = f"--config {args.config} " if args.config else ""
  print(f"{parser.prog} {config}--topology {args.topology} {' '.join(args.overrides)}".rstrip())
  print("\n".join(describe(report)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": args.config, "overrides": args.overrides, **dataclasses.asdict(report)}, f, indent=2)
  return 1 if report.fits is False else 0


if __name__ == "__main__":
  sys.exit(main())
