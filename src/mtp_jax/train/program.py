"""A config made concrete for some devices: the mesh, the shardings, the state initialiser and the
jitted train and eval steps, with what the config resolves to on them (accumulation, attention
kernel, the head's vocabulary split), checked before anything compiles.

Shared by the training loop, mtp-compile, mtp-import, the benchmarks and the tests, none of
which needs the loop's progress bar, watchdog or preemption handling to get a program.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mtp_jax import hlo, sharding
from mtp_jax.config import Config, ConfigError
from mtp_jax.data.packing import BATCH_KEYS
from mtp_jax.errors import first_line
from mtp_jax.model import attention, dispatch, experts
from mtp_jax.model.flops import ChipWork, chip_work
from mtp_jax.train import optimizer, step
from mtp_jax.train.checkpoint import leaf_name


def _batch_ways(cfg: Config, mesh) -> int:
  """Devices a microbatch is split over: the mesh axes of the `act_batch` rule."""
  return math.prod(mesh.shape[a] for a in cfg.mesh.rules.get("act_batch", []))


def _resolve_accum(cfg: Config, mesh) -> Config:
  """`train.grad_accum_steps=-1`: one sequence per batch-sharded device per microbatch, so one
  config serves every slice size (a 15,360-sequence batch: 30 microbatches on v5p-1024, 15 on
  v5p-2048)."""
  if cfg.train.grad_accum_steps != -1:
    return cfg
  ways = _batch_ways(cfg, mesh)
  if cfg.train.batch_size % ways:
    raise ConfigError(
      "train.grad_accum_steps",
      f"-1 needs train.batch_size ({cfg.train.batch_size}) to split over "
      f"the {ways} batch-sharded devices (mesh axes {cfg.mesh.rules['act_batch']}); set train.grad_accum_steps",
    )
  train = cfg.train.model_copy(update={"grad_accum_steps": cfg.train.batch_size // ways})
  return cfg.model_copy(update={"train": train})


def _resolve_attention(cfg: Config, mesh) -> tuple[Config, str]:
  """`model.attention.impl` for this mesh's devices, and why (`attention.choose`)."""
  split = sharding.spec(("act_length",), (cfg.data.seq_len,), mesh, cfg.mesh.rules)[0] is not None
  a, device = cfg.model.attention, mesh.devices.flat[0]
  capability = getattr(device, "compute_capability", None)  # a GPU's, as "9.0"
  impl, why = attention.choose(
    a.impl,
    device.platform,
    cfg.data.seq_len,
    sequence_split=split,
    qk_dim=a.qk_nope_head_dim + a.qk_rope_head_dim if a.kind == "mla" else a.head_dim,
    dtype=cfg.model.dtype,
    capability=float(capability) if capability else None,
  )
  model = cfg.model.model_copy(update={"attention": a.model_copy(update={"impl": impl})})
  return cfg.model_copy(update={"model": model}), f"{impl} ({why})"


def _resolve_experts(cfg: Config, mesh) -> tuple[Config, str | None]:
  """`model.moe.kernel` for this mesh's devices, and why (`experts.choose`); no note where no
  layer runs dropless experts."""
  m, device = cfg.model, mesh.devices.flat[0]
  if not m.moe.num_experts or m.moe.mode != "dropless":
    return cfg, None
  capability = getattr(device, "compute_capability", None)
  ways = math.prod(mesh.shape[a] for a in cfg.mesh.rules.get("expert_mlp", []))  # a device's share of the width
  try:
    kernel, why = experts.choose(
      m.moe.kernel,
      device.platform,
      dims=(m.d_model, m.moe.expert_d_ff // ways),
      dtype=m.dtype,
      capability=float(capability) if capability else None,
    )
  except ValueError as err:
    raise ConfigError(f"model.moe.kernel={m.moe.kernel}", str(err)) from None
  model = m.model_copy(update={"moe": m.moe.model_copy(update={"kernel": kernel})})
  return cfg.model_copy(update={"model": model}), f"{kernel} ({why})"


def _resolve_vocab_split(cfg: Config, mesh) -> tuple[Config, str | None]:
  """`mesh.vocab_split`: the rules with fsdp added to act_vocab, or as they are; and a note."""
  rules, m, fsdp = cfg.mesh.rules, cfg.model, mesh.shape["fsdp"]
  ways = math.prod(mesh.shape[a] for a in rules["act_vocab"] if a != "fsdp")
  if cfg.mesh.vocab_split is False or fsdp == 1 or "fsdp" in rules["act_vocab"] or m.vocab_size % (ways * fsdp):
    return cfg, None
  mesh_cfg = cfg.mesh.model_copy(update={"rules": {**rules, "act_vocab": [*rules["act_vocab"], "fsdp"]}})
  how = "true" if cfg.mesh.vocab_split is True else "auto"
  return cfg.model_copy(update={"mesh": mesh_cfg}), f"the output head's vocabulary splits over fsdp (vocab_split {how})"


_PLATFORM_OPTION = re.compile(r"xla_(tpu|gpu|cpu)_")


def compiler_options(cfg: Config, mesh) -> dict[str, Any]:
  """`train.compiler_options` that apply on this mesh's platform (xla_tpu_* on TPU only, and so
  on; null ones not at all), checked by compiling a trivial program with them for these devices:
  XLA names the first option it does not know, and the run stops there, before the step's long
  compile."""
  platform = mesh.devices.flat[0].platform
  options = {
    k: v
    for k, v in cfg.train.compiler_options.items()
    if v is not None and ((m := _PLATFORM_OPTION.match(k)) is None or m[1] == platform)
  }
  if options:
    probe = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, jax.sharding.PartitionSpec()))
    try:
      jax.jit(lambda x: x + 1, compiler_options=options).lower(probe).compile()
    except jax.errors.JaxRuntimeError as err:
      raise ConfigError("train.compiler_options", f"XLA on {platform}: {first_line(err)}") from None
  return options


def _check_mesh(cfg: Config, mesh, abstract_state) -> None:
  """Checks that need the device count: what -1 filled in must still divide the work, and
  every parameter must split the way the rules say."""
  experts, expert_axis = cfg.model.moe.num_experts, mesh.shape["expert"]
  if experts and experts % expert_axis:
    raise ConfigError("model.moe.num_experts", f"{experts} is not divisible by the expert axis ({expert_axis} devices)")
  micro = cfg.train.batch_size // cfg.train.grad_accum_steps
  ways = _batch_ways(cfg, mesh)
  if micro % ways:
    raise ConfigError(
      "train.batch_size",
      f"{cfg.train.batch_size} / grad_accum_steps "
      f"{cfg.train.grad_accum_steps} = {micro} sequences per microbatch do not split over the {ways} "
      f"batch-sharded devices (mesh axes {cfg.mesh.rules['act_batch']})",
    )
  why = sharding.misfit(("act_batch", "act_length"), (micro, cfg.data.seq_len), mesh, cfg.mesh.rules)
  if why:
    raise ConfigError("mesh", f"the input batch ({micro} x data.seq_len): {why}")
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params, is_leaf=_is_variable):
    names = leaf.get_metadata().get("axes") or (None,) * leaf.get_value().ndim
    why = sharding.misfit(names, leaf.get_value().shape, mesh, cfg.mesh.rules)
    if why:
      raise ConfigError("mesh", f"params.{leaf_name(path)}: {why}")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def memory(compiled) -> dict[str, int] | None:
  """The compiled step's memory per device, in bytes (None where the backend does not say)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  out = {
    "arguments": m.argument_size_in_bytes,
    "outputs": m.output_size_in_bytes,
    "aliased": m.alias_size_in_bytes,  # outputs written over donated arguments: counted once
    "temporaries": m.temp_size_in_bytes,
    "code": m.generated_code_size_in_bytes,
  }
  out["total"] = out["arguments"] + out["outputs"] - out["aliased"] + out["temporaries"] + out["code"]
  # XLA's peak of live buffers, arguments included. XLA:TPU holds this, not the sum above, under
  # HBM: it compiled a step whose sum was 98.7 GiB and peak 90.1 GiB for a 95.74 GiB v5p chip.
  out["peak"] = getattr(m, "peak_memory_in_bytes", 0)
  # Buffers in host memory (train.remat_offload's values). XLA:TPU counts the ones live at its
  # peak in the peak above, so with host buffers that peak is over what HBM holds.
  out["host"] = getattr(m, "host_temp_size_in_bytes", 0) or 0
  return out


def describe_memory(mem: dict[str, int] | None) -> str:
  """One line of `memory(compiled)` for the start-up log."""
  if mem is None:
    return "compiled step: memory analysis unavailable on this backend"
  names = ("arguments", "outputs", "temporaries", "code") + (("host",) if mem.get("host") else ())
  parts = [f"{name} {mem[name] / 2**20:,.1f} MiB" for name in names]
  return "compiled step memory per device: " + ", ".join(parts)


@dataclasses.dataclass
class Program:
  """Everything derived from a config before the first step: mesh, shardings, the state
  initialiser and the jitted step. Shared by the loop, the benchmarks and the tests."""

  cfg: Config
  mesh: Mesh
  abstract_state: Any  # ShapeDtypeStructs carrying their shardings
  state_shardings: Any
  batch_sharding: NamedSharding
  init: Callable[[jax.Array], step.TrainState]  # jitted: the state is born sharded
  step: Any  # jitted train_step, state donated
  eval_step: Any  # jitted: (state, batch) -> per-depth sums
  expert_dispatch: str  # how tokens reach experts: local, all_to_all, ragged_all_to_all or gspmd
  attention: str  # the attention kernel and why: "splash (auto on TPU)"
  experts: str | None  # the dropless experts' kernel and why: "megablox (auto on TPU)"; None: no dropless layer
  notes: list[str]  # things the user should know about how the config maps onto the devices

  def init_state(self) -> step.TrainState:
    return self.init(jax.random.key(self.cfg.train.seed))

  @functools.cached_property
  def host_rows(self) -> list[int]:
    """The rows of each global batch this process's devices hold: the ones its pipeline reads
    (worked out once, not at every step)."""
    return sharding.host_rows(self.batch_sharding, (self.cfg.train.batch_size, self.cfg.data.seq_len))

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global batch from this process's rows of it (`host_rows`, in that order)."""
    shape, rows = (self.cfg.train.batch_size, self.cfg.data.seq_len), self.host_rows
    return {k: sharding.from_host_rows(v, rows, self.batch_sharding, shape) for k, v in local.items()}

  def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (self.cfg.train.batch_size, self.cfg.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.batch_sharding) for k in BATCH_KEYS}

  def synthetic_batch(self, seed: int = 0) -> dict[str, jax.Array]:
    """Random tokens of the step's shape, one document per row, placed with the batch
    sharding: a fixed input for benchmarks, where data loading is not being measured."""
    b, length = self.cfg.train.batch_size, self.cfg.data.seq_len
    rng = np.random.default_rng(seed)
    host = {
      "tokens": rng.integers(0, self.cfg.model.vocab_size, (b, length)).astype(np.int32),
      "segment_ids": np.ones((b, length), np.int32),
      "positions": np.tile(np.arange(length, dtype=np.int32), (b, 1)),
    }
    return {k: jax.device_put(v, self.batch_sharding) for k, v in host.items()}

  def compile(self):
    return self.step.lower(self.abstract_state, self.abstract_batch()).compile()

  def compile_and_count(self) -> tuple[Any, ChipWork, hlo.Collectives]:
    """(the compiled step, the matmul FLOPs one device runs against its share, what it sends)."""
    traced = self.step.trace(self.abstract_state, self.abstract_batch())
    compiled = traced.lower().compile()
    text = compiled.as_text()
    return compiled, chip_work(traced.jaxpr, text, self.mesh.size), hlo.collectives(text)


def build(cfg: Config, devices: list[jax.Device] | None = None) -> Program:
  mesh = sharding.make_mesh(cfg.mesh, devices)
  cfg = _resolve_accum(cfg, mesh)
  cfg, attention_kernel = _resolve_attention(cfg, mesh)
  cfg, experts_kernel = _resolve_experts(cfg, mesh)
  cfg, vocab_note = _resolve_vocab_split(cfg, mesh)
  rules = cfg.mesh.rules
  tx = optimizer.make(cfg.optimizer, cfg.train.steps)
  init = step.make_init(cfg, tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  _check_mesh(cfg, mesh, abstract)
  options = compiler_options(cfg, mesh)
  options_note = f"XLA options for the steps: {', '.join(f'{k}={v}' for k, v in options.items())}" if options else None
  micro_BxL = (cfg.train.batch_size // cfg.train.grad_accum_steps, cfg.data.seq_len)
  dispatch_kind, note = dispatch.dispatch_plan(cfg.model.moe, mesh, rules, micro_BxL)
  state_shardings = sharding.tree_shardings(abstract, mesh, rules)
  batch_sharding = sharding.batch_sharding(mesh, rules, (cfg.train.batch_size, cfg.data.seq_len))
  train_step = step.make_train_step(
    cfg, step.graphdef_of(cfg), tx, mesh, optimizer.schedule(cfg.optimizer, cfg.train.steps)
  )
  return Program(
    cfg=cfg,
    mesh=mesh,
    abstract_state=jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings
    ),
    state_shardings=state_shardings,
    batch_sharding=batch_sharding,
    init=jax.jit(init, out_shardings=state_shardings),
    step=jax.jit(
      train_step,
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, None),
      donate_argnums=0,
      compiler_options=options or None,
    ),
    expert_dispatch=dispatch_kind,
    attention=attention_kernel,
    experts=experts_kernel,
    notes=[n for n in (note, vocab_note, options_note) if n],
    eval_step=jax.jit(
      step.make_eval_step(cfg, step.graphdef_of(cfg), mesh),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=None,
      compiler_options=options or None,
    ),
  )
