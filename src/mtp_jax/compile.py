"""What `mtp-compile` reports: the train step compiled for a TPU slice or GPU hosts on this
machine, with no TPU or GPU. libtpu's or the CUDA plugin's compile-only devices
(`jax.experimental.topologies`, see topology.py) stand in for the chips, so the memory and FLOPs
are the compiler's own for that pod: per-chip memory against HBM, FLOPs per step, a roofline step
time and the MFU it implies. The command is cli/compile.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import math
import os
import re
import tempfile
import time

from mtp_jax import hlo
from mtp_jax.errors import first_line
from mtp_jax.topology import CHIPS, DEVICE_KINDS, Chip, GiB, Topology, devices, gpu_memory_share


@dataclasses.dataclass
class Evaluation:
  """One program an evaluation runs, compiled beside the train step."""

  program: str  # "eval step" or "speculative decoding of N prompts (train.eval_spec_prompts)"
  memory: dict[str, int] | None  # None: refused
  own_bytes: float | None  # its need, as Report.needs_bytes: XLA:TPU's peak, else the total
  needs_bytes: float | None  # while it runs: its own, and the train state it does not take (the optimizer's)
  error: str | None  # the compiler's out-of-memory line
  compile_s: float = 0.0


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
  expert_kernel: str | None  # the dropless experts' kernel and why; None: no dropless layer
  receive_buffer: tuple[float, float] | None  # ragged_all_to_all: (rows received into, worst case) / rows sent
  notes: list[str]  # how the config maps onto the devices, where it is not what was asked
  lower_s: float
  compile_s: float
  grad_accum_steps: int
  memory: dict[str, int] | None  # arguments, outputs, aliased, temporaries, code, total, peak
  needs_bytes: float | None  # XLA:TPU's peak, else the total; the compiler's figure; the state when skipped
  hbm_bytes: float | None  # the chip's
  fits: bool | None  # needs_bytes against the chip's HBM, or against hbm_limit where that is less
  compiled: bool  # False: skipped, the train state alone is over HBM
  state_bytes: int  # parameters, optimizer state and step: the floor under every other figure
  compiler_error: str | None  # the compiler's out-of-memory line
  params: int
  active_params: int
  tokens_per_step: int
  model_flops_per_step: float  # analytic: train_flops_per_token x tokens, no rematerialisation
  traced_flops: float | None  # matmul FLOPs of the traced program, global shapes split evenly over the chips
  partitioned_flops: float | None  # matmul FLOPs of the compiled program one chip runs: the roofline's
  recomputed_flops: float | None  # of partitioned_flops: what XLA's own rematerialisation repeats to fit HBM
  repeated: str | None  # when a chip runs over 1.15x its share of the traced matmuls: how much, and where
  collectives: hlo.Collectives | None  # what a chip sends to others per step, by collective
  xla_bytes: float | None  # XLA's HBM bytes accessed, the accumulation loop's body x its count: a floor
  kernel_bytes: float | None  # GPUs, where XLA counts none: what the step's kernels read and write (hlo.kernel_traffic)
  kernel_largest: list | None  # of those: (kernel, its JAX operation, bytes a step), the busiest first
  xla_optimal_seconds: float | None  # raw; see _estimate
  peak_flops: float | None
  hbm_bandwidth: float | None
  step_s: float | None  # roofline estimate
  bound: str | None  # "compute" or "memory"; None where no HBM bytes were counted
  mfu: float | None
  dump: str | None = None  # where XLA wrote the compiled step's dumps (--dump)
  peak_holders: list[tuple[str, float]] | None = None  # from them: what is live at the peak, the largest first
  hbm_allocated: int | None = None  # from them, with host buffers: what XLA put in HBM (the verdict's figure then)
  hbm_limit: float | None = None  # what XLA:TPU (xla_tpu_max_hbm_size_mib) or JAX's GPU allocator may use of it
  hbm_limit_by: tuple[str, str] | None = None  # who may use hbm_limit, and the setting that says so
  host_transfers: tuple[float, float] | None = None  # bytes to the host's memory and back a step (remat_offload)
  # Where the config evaluates (train.eval_every), what each program an evaluation runs needs: the
  # eval step, then the speculative decoding of train.eval_spec_prompts (`Evaluation`).
  evaluation: list[Evaluation] = dataclasses.field(default_factory=list)


def check(cfg, topo: Topology, *, hbm_gib: float | None = None, dump: str | None = None) -> Report:
  """Builds and compiles the train step for `topo`, and what an evaluation runs where the config
  evaluates (train.eval_every); raises ConfigError or TopologyError on bad input. With `dump`,
  XLA writes its dumps of the compiled train step there (the buffer assignment and live ranges
  among them), and the report lists what they say is live at the peak. With values
  offloaded to the host (`train.remat_offload`), the verdict is on what XLA's memory-usage dump
  says it put in HBM: written to `dump`, else to a temporary folder."""
  from mtp_jax.model import dispatch as moe_dispatch
  from mtp_jax.model.flops import chip_work, cost, traced_matmul_flops
  from mtp_jax.train.metrics import peak_flops
  from mtp_jax.train.program import build
  from mtp_jax.train.program import memory as program_memory

  devs = devices(topo)
  program = build(cfg, devs)
  chip = topo.chip or CHIPS.get(DEVICE_KINDS.get(devs[0].device_kind, ""))
  hbm = hbm_gib * GiB if hbm_gib else topo.gpu.memory if topo.gpu else _hbm(chip, devs[0])
  limit, limit_by = _xla_hbm_limit(program.cfg, devs[0], hbm), None
  if limit:
    limit_by = ("XLA", "train.compiler_options.xla_tpu_max_hbm_size_mib")
  elif topo.gpu and not hbm_gib:  # JAX's allocator takes 75% of a GPU unless XLA_CLIENT_MEM_FRACTION says
    share, why = gpu_memory_share()
    limit, limit_by = share * hbm, ("JAX's allocator", why)
  state = state_bytes(program.abstract_state)
  attached = functools.partial(_attached, devs) if topo.gpu else contextlib.nullcontext  # while tracing
  compiled, error, lower_s, compile_s, traced_flops, work, comms, moved = None, None, 0.0, 0.0, None, None, None, None
  traffic = None
  began = time.time()
  room = limit or hbm  # what the step may hold per chip
  # With values offloaded, XLA:TPU's peak counts host buffers with HBM's; what it put in HBM is
  # in its memory-usage report, a dump file, so the step is dumped to a folder of our own where
  # --dump names none.
  offloads = bool(program.cfg.train.remat_offload) and devs[0].platform == "tpu"
  folder = tempfile.TemporaryDirectory(prefix="mtp-compile-") if offloads and not dump else contextlib.nullcontext(dump)
  with folder as dumps:
    if not (room and state > room):  # else no compile can fit: say so now, not after many minutes
      start = time.perf_counter()
      with attached():
        traced = program.step.trace(program.abstract_state, program.abstract_batch())
        lowered = traced.lower()
      traced_flops = traced_matmul_flops(traced.jaxpr, len(devs))
      lower_s = time.perf_counter() - start
      try:
        with _uncached(bool(dumps)):  # a program read back from the persistent cache is not compiled, so not dumped
          compiled = lowered.compile(compiler_options={"xla_dump_to": dumps} if dumps else None)
      except Exception as err:  # XLA:TPU refuses a program that does not fit HBM
        if "RESOURCE_EXHAUSTED" not in str(err):
          raise
        error = first_line(err)
      compile_s = time.perf_counter() - start - lower_s
      if compiled:
        text = compiled.as_text()
        work, comms = chip_work(traced.jaxpr, text, len(devs)), hlo.collectives(text)
        moved = hlo.host_transfers(text) if "S(5)" in text else None  # only offloaded values use the host's memory
        traffic = hlo.kernel_traffic(text) if topo.gpu else None
    memory = program_memory(compiled) if compiled else None
    evaluation = _evaluation(program, attached, chip, state) if compiled and program.cfg.train.eval_every else []
    holders, in_hbm = None, None
    if dumps:

      def newest(suffix: str) -> str | None:  # the step's dump file, not an earlier run's
        found = glob.glob(os.path.join(dumps, f"*jit_train_step*{suffix}"))
        found = sorted((f for f in found if os.path.getmtime(f) >= began), key=os.path.getmtime)
        if found:
          with open(found[-1]) as f:
            return f.read()
        return None

      if dump and (ranges := newest("live-range.txt")):
        holders = peak_holders(ranges)
      if memory and memory["host"] and (usage := newest("memory-usage-report.txt")):
        in_hbm = hbm_allocated(usage)

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
  needs, available = _refusal(error)
  if memory:  # XLA:TPU's peak is what it holds under HBM; elsewhere (CPU) it leaves temporaries out
    needs = memory["peak"] if chip and memory["peak"] else memory["total"]
    if chip and in_hbm:  # XLA's peak counts host buffers with HBM's; its memory-usage report gives HBM's own
      needs = in_hbm
  elif not compiled and not error:
    needs = state
  if available and limit:  # XLA's own figure for what it may use
    limit = available
  elif available and hbm_gib is None:
    hbm = available
  room = limit or hbm
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
    expert_kernel=program.experts,
    receive_buffer=buffer,
    notes=program.notes,
    lower_s=lower_s,
    compile_s=compile_s,
    grad_accum_steps=accum,
    memory=memory,
    needs_bytes=needs,
    hbm_bytes=hbm,
    fits=_fits(needs, evaluation, room, error),
    compiled=compiled is not None or error is not None,
    state_bytes=state,
    compiler_error=error,
    params=c.total_params,
    active_params=c.active_params,
    tokens_per_step=tokens,
    model_flops_per_step=c.train_flops_per_token * tokens,
    traced_flops=traced_flops,
    partitioned_flops=work.partitioned if work else None,
    recomputed_flops=work.recomputed if work else None,
    repeated=work.warning() if work else None,
    collectives=comms,
    xla_bytes=xla_bytes,
    kernel_bytes=traffic.bytes if traffic else None,
    kernel_largest=traffic.largest if traffic else None,
    xla_optimal_seconds=counts.get("optimal_seconds"),
    peak_flops=peak_flops(devs[0]),
    hbm_bandwidth=topo.gpu.hbm_bandwidth if topo.gpu else chip.hbm_bandwidth if chip else None,
    step_s=None,
    bound=None,
    mfu=None,
    dump=dump,
    peak_holders=holders,
    hbm_allocated=in_hbm,
    hbm_limit=limit,
    hbm_limit_by=limit_by,
    host_transfers=moved,
    evaluation=evaluation,
  )
  _estimate(report)
  return report


def _evaluation(program, attached, chip: Chip | None, state: int) -> list[Evaluation]:
  """What an evaluation runs, compiled (`evaluate.lowered`): the eval step on a batch, and where
  the MTP depths draft (train.eval_spec_prompts), the speculative decoding of the longest prompts
  it may be handed; traced inside `attached()`, as the train step is."""
  import jax
  import numpy as np

  from mtp_jax.config import spec_prompt_len
  from mtp_jax.train import evaluate

  cfg = program.cfg
  t = cfg.train
  prompts = ()
  if t.eval_spec_prompts and cfg.model.mtp.depth:
    b, p = t.eval_spec_prompts, spec_prompt_len(t, cfg.data)
    prompts = jax.ShapeDtypeStruct((b, p), np.int32), jax.ShapeDtypeStruct((b,), np.int32)
  with attached():
    lowered = evaluate.lowered(program, *prompts)
  rest = state - state_bytes((program.abstract_state.params, program.abstract_state.router_bias))
  return [_beside_state(name, program_lowered, chip, rest) for name, program_lowered in lowered]


def _beside_state(name: str, lowered, chip: Chip | None, rest: int) -> Evaluation:
  """`lowered` compiled, and what a chip holds while it runs: its own need (as the train step's:
  XLA:TPU's peak, else the total) plus `rest`, the train state it does not take, which stays live
  beside it; where the compiler refuses it, the refusal's figure alone."""
  from mtp_jax.train.program import memory as program_memory

  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as err:
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    error = first_line(err)
    return Evaluation(name, None, None, _refusal(error)[0], error, time.perf_counter() - start)
  memory = program_memory(compiled)
  own = memory["peak"] if chip and memory["peak"] else memory["total"]
  return Evaluation(name, memory, own, own + rest, None, time.perf_counter() - start)


def _fits(needs: float | None, evaluation: list[Evaluation], room: float | None, error) -> bool | None:
  """The verdict: the train step's need, and each evaluation program's, within `room`."""
  if needs is not None and room:
    return needs <= room and not any(e.error or e.needs_bytes > room for e in evaluation)
  return False if error else None


@contextlib.contextmanager
def _attached(devs: list):
  """While tracing for compile-only GPUs: JAX's GPU kernels told that those are attached. At
  trace time cuDNN attention asks the attached GPU's compute capability (without a Hopper it
  refuses MLA's 192-wide heads), Mosaic GPU kernels ask `jax.devices()[0]` for its SMs and
  architecture, and decoding outside a mesh asks `jax.default_backend()` whether to cast its
  weights first (`decode.for_steps`); on this machine the answer would be the CPU's."""
  import jax

  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  except ImportError:  # no cuDNN attention in this JAX: nothing of it to tell
    cudnn_attention = None

  def version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))

  have = version(devs[0].compute_capability)
  told = {(jax, "devices"): lambda *_, **__: list(devs), (jax, "local_devices"): lambda *_, **__: list(devs)}
  told[jax, "default_backend"] = lambda: devs[0].platform  # what code outside a mesh asks (`sharding.platform`)
  if cudnn_attention is not None:
    told[cudnn_attention, "check_compute_capability"] = lambda c: have >= version(c)
    told[cudnn_attention, "is_cuda_compute_capability_equal"] = lambda c: have == version(c)
  was = {(owner, name): getattr(owner, name) for owner, name in told if hasattr(owner, name)}
  for (owner, name), value in told.items():
    setattr(owner, name, value)
  try:
    yield
  finally:
    for owner, name in told:
      if (owner, name) in was:
        setattr(owner, name, was[owner, name])
      else:
        delattr(owner, name)


@contextlib.contextmanager
def _uncached(off: bool):
  """With `off`, JAX's persistent compilation cache off for what runs inside (it decides once
  a process whether to use the cache, unless reset), and back as it was after."""
  if not off:
    yield
    return
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  was = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", was)
    compilation_cache.reset_cache()


_PEAK = re.compile(r"^\s*Stack trace breakdown for peak usage: [\d ]+ bytes$")
_NODE = re.compile(  # one node of its tree: name (share, total: bytes, current: bytes held by this node, ...)
  r"^[\s│]*[├└]── (.+) \([\d.]+%, total: [\d ]+ bytes, current: ([\d ]+) bytes, remaining: [\d ]+ bytes\)$"
)


_DEFAULT_SPACE = re.compile(r"^Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)", re.M)


def hbm_allocated(usage_report: str) -> int | None:
  """The bytes XLA assigned to the device's own memory (its `default` space: HBM on a TPU),
  arguments included, from its memory-usage dump (`*-memory-usage-report.txt`); None where the
  report has no such space."""
  m = _DEFAULT_SPACE.search(usage_report)
  return int(m.group(1)) if m else None


def peak_holders(live_ranges: str) -> list[tuple[str, float]] | None:
  """What XLA's live-range dump (`*-live-range.txt`) says is live at the program's peak: its
  breakdown by operation or argument name, (name, bytes) the largest first; None where the dump
  has no breakdown (XLA writes one on TPU and CPU)."""
  lines = live_ranges.splitlines()
  start = next((i for i, line in enumerate(lines) if _PEAK.match(line)), None)
  if start is None:
    return None
  held = []
  for line in lines[start + 1 :]:
    if m := _NODE.match(line):
      if size := int(m.group(2).replace(" ", "")):
        held.append((m.group(1), float(size)))
    elif line.strip() and "──" not in line and "(100.0%" not in line:
      break
  return sorted(held, key=lambda h: -h[1])


def state_bytes(abstract_state) -> int:
  """Bytes of the train state on the busiest device, from each array's sharding."""
  import jax

  total = 0
  for x in jax.tree.leaves(abstract_state):
    shard = x.sharding.shard_shape(x.shape)
    total += math.prod(shard) * x.dtype.itemsize
  return total


def _xla_hbm_limit(cfg, device, hbm: float | None) -> float | None:
  """The bytes of HBM `train.compiler_options.xla_tpu_max_hbm_size_mib` lets XLA:TPU use, where
  set and less than the chip's `hbm`."""
  mib = cfg.train.compiler_options.get("xla_tpu_max_hbm_size_mib")
  limit = float(mib) * 2**20 if mib is not None and device.platform == "tpu" else None
  return limit if limit and not (hbm and limit >= hbm) else None


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
  FLOPs of the partitioned program and XLA's floor on HBM bytes; on GPUs, where XLA gives no
  count, the bytes its kernels read and write, loops counted (an estimate, not a floor: the
  GPU's L2 cache may serve some of those reads, and a matmul may read its operands more than once).

  XLA:TPU's own `optimal_seconds` is no step time: it sums per-instruction estimates, counts a
  loop body once, and comes out negative for the MoE programs (it seems to add -1 for each async
  call it cannot time). The roofline ignores communication and overlap, so with XLA's floor it is
  a lower bound on the step time and the MFU an upper bound."""
  if not (r.partitioned_flops and r.memory and r.peak_flops and r.hbm_bandwidth):  # none for a refused step
    return
  moved = r.xla_bytes if r.xla_bytes is not None else r.kernel_bytes
  compute, memory = r.partitioned_flops / r.peak_flops, (moved or 0) / r.hbm_bandwidth
  r.step_s = max(compute, memory)
  r.bound = None if moved is None else "compute" if compute >= memory else "memory"
  r.mfu = r.model_flops_per_step / (r.step_s * r.peak_flops * r.chips)


def _against(r: Report) -> str:
  """What the verdict is against, in words: the chip's HBM, or the limit XLA or JAX sets on it."""
  if not r.hbm_limit:
    return f"the chip has {_size(r.hbm_bytes)}" if r.hbm_bytes else "the chip's HBM is unknown"
  chip = f" of the chip's {_size(r.hbm_bytes)}" if r.hbm_bytes else ""
  who, setting = r.hbm_limit_by or ("XLA", "a limit")
  return f"{who} may use {_size(r.hbm_limit)}{chip} ({setting})"


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


def _collectives(c: hlo.Collectives, largest: int = 3) -> list[str]:
  """What a chip sends, by kind, then the largest collectives with the operation they serve:
  where a whole batch's activations or gradients travel, it shows here."""
  if not c.each and not c.unread:
    return ["comms      no collective: each chip runs alone"]
  kinds = ", ".join(f"{kind} {_size(b)} in {_count(n)} calls" for kind, (b, n) in c.by_kind().items())
  how = "(n-1)/n of each collective's data, all-reduce twice"
  if any(k.startswith("dcn ") for k in c.by_kind()):
    how += "; dcn: each buffer handed to the runtime that moves it between slices, once"
  lines = [f"comms      per chip per step, sent ({how}): {kinds}"]
  for x in c.each[:largest]:
    where = f"from {x.op}" if x.op else "no op named"
    lines.append(f"           {_size(x.sent)}: {x.kind} of {x.shape}, {_count(x.calls)} a step, {where}")
  if c.unread:
    unread = ", ".join(f"{op} ({_count(n)} calls)" for op, n in c.unread.items())
    lines.append(f"           not counted above, collectives this reader does not know: {unread}")
  if c.loops_once:
    lines.append(f"           {c.loops_once} loops with no trip count found are counted as running once")
  return lines


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
  lines.append(f"attention  {r.attention}" + (f"; dropless experts {r.expert_kernel}" if r.expert_kernel else ""))
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
    if m.get("host"):
      report = f"its memory-usage report in {r.dump}" if r.dump else "its memory-usage report"
      held = f"XLA put {_size(r.hbm_allocated)} in HBM ({report})" if r.hbm_allocated else "HBM holds less"
      lines.append(
        f"host       per chip: {_size(m['host'])} in host memory (train.remat_offload); the peak counts it, {held}"
      )
  for e in r.evaluation:  # train.eval_every
    what = f"eval       the eval step{micro}" if e.program == "eval step" else f"eval       {e.program}"
    what += f", compiled in {e.compile_s:,.0f} s"
    if e.memory:
      lines.append(
        f"{what}: needs {_size(e.own_bytes)} per chip, {_size(e.needs_bytes)} with the optimizer's state beside it"
      )
    else:
      lines.append(f"{what}: {e.error}")
  if r.host_transfers:
    to, back = r.host_transfers
    busier = max(to, back) / r.step_s / 1e9 if r.step_s else None
    rate = f"; at most {busier:,.1f} GB/s the busier way, over the roofline's step time" if busier else ""
    lines.append(f"host link  per chip per step: {_size(to)} to the host's memory and {_size(back)} back{rate}")
  if r.peak_holders:
    shown = r.peak_holders[:6]
    rest = sum(b for _, b in r.peak_holders[len(shown) :])
    total = _size(sum(b for _, b in r.peak_holders))
    lines.append(f"peak       {total} live at the peak of XLA's live ranges (in {r.dump}), the largest first:")
    lines += [f"           {_size(b)}: {name}" for name, b in shown]
    if rest:
      lines.append(f"           {_size(rest)}: {len(r.peak_holders) - len(shown)} more")
  elif r.dump:
    lines.append(f"peak       XLA wrote no live ranges of the step to {r.dump}")
  if r.compiler_error:
    lines.append(f"compiler   {r.compiler_error}")
  model = f"{r.model_flops_per_step / r.chips:.3g} model FLOPs (analytic, no rematerialisation)"
  traffic = f"; HBM traffic >= {_size(r.xla_bytes)} (XLA's count, inner loop bodies once)" if r.xla_bytes else ""
  if r.kernel_bytes and not r.xla_bytes:
    traffic = f"; HBM traffic ~ {_size(r.kernel_bytes)} (its kernels' operands and results, loops counted; no cache)"
  counts = []
  for flops, what in [
    (r.partitioned_flops, "in the matmuls the chip runs (the compiled, partitioned program)"),
    (r.traced_flops, "as traced, an even share of every matmul"),
  ]:
    if flops:
      counts.append(f"{flops:.3g} {what}: {flops * r.chips / r.model_flops_per_step:.2f} x the model's")
  loops = " (loops x their trip counts, rematerialisation included)" if counts else ""
  lines.append(f"flops      per chip per step{loops}: {'; '.join([*counts, model])}{traffic}")
  again, resent = [], r.collectives.recomputed if r.collectives else 0.0
  if r.recomputed_flops:
    again.append(f"{r.recomputed_flops:.3g} matmul FLOPs ({r.recomputed_flops / r.partitioned_flops:.1%} of them)")
  if resent:
    again.append(f"{_size(resent)} of its sends ({resent / r.collectives.sent:.1%})")
  if again:
    lines.append(
      f"recompute  XLA's own rematerialisation runs {' and '.join(again)} a second time to fit the chip's "
      "memory (counted above): more room (train.remat_offload, more microbatches, more chips) takes it away"
    )
  if r.repeated:
    lines.append(f"warning    {r.repeated}")
  if r.kernel_largest and not r.xla_bytes:
    busiest = "; ".join(f"{_size(b)} in {name} ({op or 'no op named'})" for name, op, b in r.kernel_largest)
    lines.append(f"traffic    the busiest kernels per chip per step: {busiest}")
  if r.collectives:
    lines += _collectives(r.collectives)
  about = ">=" if r.xla_bytes else "~"  # kernel_bytes is an estimate, not a floor (`_estimate`)
  if r.step_s and r.bound:
    lines.append(
      f"step time  {about} {_seconds(r.step_s)}, a roofline: max(FLOPs / "
      f"{r.peak_flops / 1e12:,.0f} TFLOP/s, HBM bytes / {r.hbm_bandwidth / 1e9:,.0f} GB/s), "
      f"{r.bound}-bound; communication and overlap not modelled"
    )
  elif r.step_s:
    lines.append(
      f"step time  >= {_seconds(r.step_s)}: FLOPs / {r.peak_flops / 1e12:,.0f} TFLOP/s alone (XLA gave no count "
      "of HBM bytes for these devices); communication and overlap not modelled"
    )
  if r.step_s:
    about = "<=" if r.xla_bytes or not r.bound else "~"
    lines.append(f"MFU        {about} {r.mfu:.1%} at that step time: model FLOPs / (step time x peak x chips)")
  room, has = r.hbm_limit or r.hbm_bytes, _against(r)
  evaluating = max((e for e in r.evaluation if e.needs_bytes), key=lambda e: e.needs_bytes, default=None)
  evaluation = f" (evaluating, {_size(evaluating.needs_bytes)})" if evaluating else ""
  most = max(r.needs_bytes or 0, evaluating.needs_bytes if evaluating else 0)
  over = [e for e in r.evaluation if e.error or (room and e.needs_bytes > room)]
  if r.fits is None:
    lines.append("fit unknown: no HBM size for these devices (pass --hbm-gib)")
  elif r.fits:
    lines.append(f"fits: needs {_size(r.needs_bytes)} per chip{evaluation}, {has} ({most / room:.0%} used)")
  elif over and r.needs_bytes is not None and room and r.needs_bytes <= room:
    e = over[0]
    needs = f"needs {_size(e.needs_bytes)} per chip" if e.needs_bytes else "the compiler ran out of HBM"
    lines.append(f"does not fit: the train step does; evaluating (train.eval_every), {e.program} {needs}, {has}")
  elif not r.compiled:
    lines.append(
      f"does not fit: the train state alone needs {_size(r.state_bytes)} per chip, {has}; "
      "not compiled (more chips, more fsdp, or fewer parameters)"
    )
  elif r.needs_bytes is not None and room:
    lines.append(f"does not fit: needs {_size(r.needs_bytes)} per chip, {has}")
  else:
    lines.append("does not fit: the compiler ran out of HBM")
  return lines
