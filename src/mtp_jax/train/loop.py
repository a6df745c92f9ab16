"""The training loop: build mesh, state and data, compile once, step, log, checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from mtp_jax import config as config_lib
from mtp_jax import data, sharding, storage
from mtp_jax.config import Config, ConfigError, spec_prompt_len
from mtp_jax.distributed import Watchdog
from mtp_jax.model import attention, dispatch
from mtp_jax.model.flops import ChipWork, chip_work, cost
from mtp_jax.train import evaluate, optimizer, resume, step
from mtp_jax.train.checkpoint import Checkpointer, leaf_name
from mtp_jax.train.metrics import MetricsWriter, mfu
from mtp_jax.train.preemption import Preemption


class TrainingError(RuntimeError):
  """A run that cannot go on (e.g. a non-finite loss), reported as one line."""


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
      f"config error: train.grad_accum_steps: -1 needs train.batch_size ({cfg.train.batch_size}) to split over "
      f"the {ways} batch-sharded devices (mesh axes {cfg.mesh.rules['act_batch']}); set train.grad_accum_steps"
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


# mesh.vocab_split=auto splits the head's vocabulary over fsdp where the head holds at least this
# share of the blocks' parameters (MTP modules included). Measured (benchmarks/RESULTS.md): the
# split lowered the peak at shares 0.62 and 0.33 (small.yaml's widths with a 152K vocabulary and
# 2 or 4 layers, v5p-8) and raised it at 0.115, 0.025 and 0.0014 (the same with 12 layers;
# small.yaml as is, v5p-8; DeepSeek-V3 671B, v5p-1024 and 2xv6e-256).
HEAD_SHARE_TO_SPLIT = 0.25


def _resolve_vocab_split(cfg: Config, mesh) -> tuple[Config, str | None]:
  """`mesh.vocab_split`: the rules with fsdp added to act_vocab, or as they are; and a note."""
  rules, m, fsdp = cfg.mesh.rules, cfg.model, mesh.shape["fsdp"]
  ways = math.prod(mesh.shape[a] for a in rules["act_vocab"] if a != "fsdp")
  if cfg.mesh.vocab_split is False or fsdp == 1 or "fsdp" in rules["act_vocab"] or m.vocab_size % (ways * fsdp):
    return cfg, None
  head = m.vocab_size * m.d_model
  share = head / max(cost(m, cfg.data.seq_len).total_params - head * (1 if m.tie_embeddings else 2), 1)
  if cfg.mesh.vocab_split == "auto" and share < HEAD_SHARE_TO_SPLIT:
    return cfg, None
  why = "true" if cfg.mesh.vocab_split is True else f"auto: the head holds {share:.2f}x the blocks' parameters"
  mesh_cfg = cfg.mesh.model_copy(update={"rules": {**rules, "act_vocab": [*rules["act_vocab"], "fsdp"]}})
  return cfg.model_copy(update={"mesh": mesh_cfg}), f"the output head's vocabulary splits over fsdp (vocab_split {why})"


def _check_mesh(cfg: Config, mesh, abstract_state) -> None:
  """Checks that need the device count: what -1 filled in must still divide the work, and
  every parameter must split the way the rules say."""
  experts, expert_axis = cfg.model.moe.num_experts, mesh.shape["expert"]
  if experts and experts % expert_axis:
    raise ConfigError(
      f"config error: model.moe.num_experts: {experts} is not divisible by the expert axis ({expert_axis} devices)"
    )
  micro = cfg.train.batch_size // cfg.train.grad_accum_steps
  ways = _batch_ways(cfg, mesh)
  if micro % ways:
    raise ConfigError(
      f"config error: train.batch_size: {cfg.train.batch_size} / grad_accum_steps "
      f"{cfg.train.grad_accum_steps} = {micro} sequences per microbatch do not split over the {ways} "
      f"batch-sharded devices (mesh axes {cfg.mesh.rules['act_batch']})"
    )
  why = sharding.misfit(("act_batch", "act_length"), (micro, cfg.data.seq_len), mesh, cfg.mesh.rules)
  if why:
    raise ConfigError(f"config error: mesh: the input batch ({micro} x data.seq_len): {why}")
  for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_state.params, is_leaf=_is_variable):
    names = leaf.get_metadata().get("axes") or (None,) * leaf.get_value().ndim
    why = sharding.misfit(names, leaf.get_value().shape, mesh, cfg.mesh.rules)
    if why:
      raise ConfigError(f"config error: mesh: params.{leaf_name(path)}: {why}")


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _record_config(workdir, cfg: Config, resuming: bool, log) -> None:
  """Writes the run's config to `workdir/config.yaml`; on a resume, first says which model
  settings differ from the saved one (shapes are checked against the checkpoint itself)."""
  saved = workdir / "config.yaml"
  if resuming and saved.is_file():
    try:
      old = yaml.safe_load(saved.read_text())["model"]
    except (yaml.YAMLError, KeyError, TypeError):
      old = None
    changed = _differences(old, cfg.model_dump(mode="json")["model"], "model") if isinstance(old, dict) else []
    if changed:
      log(f"note: resuming with changed model settings: {'; '.join(changed)}")
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    saved.write_text(config_lib.to_yaml(cfg))


def _quiet(*_args, **_kw) -> None:
  """The log of every process but the first."""


def _differences(a, b, prefix) -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}")]
  return [] if a == b else [f"{prefix} {a!r} -> {b!r}"]


def _describe_memory(compiled) -> str:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return "compiled step: memory analysis unavailable on this backend"
  mib = 1 / 2**20
  parts = [
    f"{name} {getattr(analysis, attr, 0) * mib:,.1f} MiB"
    for name, attr in [
      ("arguments", "argument_size_in_bytes"),
      ("outputs", "output_size_in_bytes"),
      ("temporaries", "temp_size_in_bytes"),
      ("code", "generated_code_size_in_bytes"),
    ]
  ]
  return "compiled step memory per device: " + ", ".join(parts)


def _evaluate(program: Program, eval_data, num_batches: int, state, spec: Callable | None = None) -> dict[str, float]:
  """Eval metrics per MTP depth over the first `num_batches` batches of the held-out split, and
  `spec(state)`'s speculative acceptance."""
  it, sums = iter(eval_data), None
  try:
    for _ in range(num_batches):
      out = program.eval_step(state, program.global_batch(next(it)))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  finally:
    it.close()
  values = step.eval_metrics(jax.device_get(sums))
  if spec is not None:
    values.update(spec(state))
  return values


def _spec_eval(cfg: Config, eval_data) -> Callable | None:
  """state -> speculative acceptance on the first held-out prompts (the same every time), or
  None where there is nothing to measure."""
  t = cfg.train
  if not (t.eval_spec_prompts and cfg.model.mtp.depth):
    return None
  eos = cfg.model.eos_id
  it = iter(eval_data)
  try:
    first = next(it)
  finally:
    it.close()
  prompts = evaluate.held_out_prompts(first, t.eval_spec_prompts, spec_prompt_len(t, cfg.data), eos)
  graphdef = step.graphdef_of(cfg)

  def spec(state) -> dict[str, float]:
    model = nnx.merge(graphdef, state.params, state.router_bias)
    return evaluate.speculative_acceptance(model, prompts, t.eval_spec_tokens, eos)

  return spec


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
  notes: list[str]  # things the user should know about how the config maps onto the devices

  def init_state(self) -> step.TrainState:
    return self.init(jax.random.key(self.cfg.train.seed))

  def host_rows(self) -> list[int]:
    """The rows of each global batch this process's devices hold: the ones its pipeline reads."""
    return sharding.host_rows(self.batch_sharding, (self.cfg.train.batch_size, self.cfg.data.seq_len))

  def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global batch from this process's rows of it (`host_rows`, in that order)."""
    shape, rows = (self.cfg.train.batch_size, self.cfg.data.seq_len), self.host_rows()
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

  def compile_and_count(self) -> tuple[Any, ChipWork]:
    """(the compiled step, the matmul FLOPs one device runs against its share)."""
    traced = self.step.trace(self.abstract_state, self.abstract_batch())
    compiled = traced.lower().compile()
    return compiled, chip_work(traced.jaxpr, compiled.as_text(), self.mesh.size)


BATCH_KEYS = ("tokens", "segment_ids", "positions")


def build(cfg: Config, devices: list[jax.Device] | None = None) -> Program:
  mesh = sharding.make_mesh(cfg.mesh, devices)
  cfg = _resolve_accum(cfg, mesh)
  cfg, attention_kernel = _resolve_attention(cfg, mesh)
  cfg, vocab_note = _resolve_vocab_split(cfg, mesh)
  rules = cfg.mesh.rules
  tx = optimizer.make(cfg.optimizer, cfg.train.steps)
  init = step.make_init(cfg, tx)
  abstract = jax.eval_shape(init, jax.random.key(0))
  _check_mesh(cfg, mesh, abstract)
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
    ),
    expert_dispatch=dispatch_kind,
    attention=attention_kernel,
    notes=[n for n in (note, vocab_note) if n],
    eval_step=jax.jit(
      step.make_eval_step(cfg, step.graphdef_of(cfg), mesh),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=None,
    ),
  )


def train(cfg: Config, *, devices: list[jax.Device] | None = None, log=print) -> list[dict]:
  """Runs (or resumes) training to cfg.train.steps; returns the logged metric records.
  In a multi-process job only process 0 logs, shows progress and writes metrics."""
  t = cfg.train
  lead = jax.process_index() == 0
  if not lead:
    log = _quiet
    t = t.model_copy(update={"progress_bar": False})
  workdir = storage.path(t.workdir)
  sources = data.open_sources(cfg.data, "train")  # bad data fails here, before any compile
  # With train.steps below train.eval_every the run evaluates once, at its end, where there is an eval split.
  eval_sources = data.open_sources(cfg.data, "eval", required=t.steps >= t.eval_every) if t.eval_every else []
  if t.eval_every and not eval_sources:
    log("note: no data source has a held-out eval split, and train.steps < train.eval_every: no evaluation")
  data.check_model(sources + eval_sources, cfg.model)
  program = build(cfg, devices)
  mesh = program.mesh
  shard = {"rows": program.host_rows()}  # global batches, of which this host reads its rows
  dataset = data.make_dataset(cfg.data, batch_size=t.batch_size, seed=t.seed, sources=sources, **shard)
  batches = iter(dataset)
  run_eval = None
  if eval_sources:
    eval_data = data.make_dataset(
      cfg.data, batch_size=t.batch_size, seed=t.seed, split="eval", sources=eval_sources, **shard
    )
    spec = _spec_eval(program.cfg, eval_data)
    run_eval = functools.partial(_evaluate, program, eval_data, t.eval_batches, spec=spec)
  with contextlib.ExitStack() as stack:
    stack.callback(batches.close)
    preemption = Preemption()  # from here on, SIGTERM means: save at the next step boundary
    stack.callback(preemption.close)
    d = cfg.distributed
    watchdog = Watchdog(d.step_timeout_s, d.peer_timeout_s)  # a dead peer: an error, not a hang
    stack.callback(watchdog.close)
    ckpt = None
    if cfg.checkpoint.enabled:
      ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
      stack.callback(ckpt.close)  # also after a failed restore: stops Orbax's threads
    begin = resume.choose_start(cfg.checkpoint, workdir / "checkpoints", ckpt, program.abstract_state, batches, log)
    start, origin = begin.step, begin.origin
    _record_config(workdir, cfg, resuming=start > 0, log=log)
    if start >= t.steps:
      log(f"nothing to do: checkpoint step {start} >= train.steps {t.steps}")
      return []
    state = begin.state
    if state is None:
      state = program.init_state()
      if begin.params is not None:
        # What the checkpoint held over the fresh state (new MTP modules keep their initialisation).
        params, bias = begin.params["params"], begin.params["router_bias"]
        state = state.replace(
          params=nnx.merge_state(state.params, params), router_bias=nnx.merge_state(state.router_bias, bias)
        )
    compiled, work = program.compile_and_count()

    c = cost(cfg.model, cfg.data.seq_len, cfg.train.trainable)
    log(
      f"model: {c.total_params:,} parameters ({c.active_params:,} active per token), "
      f"{c.train_flops_per_token / 1e6:,.1f} MFLOPs/token to train; mesh {dict(mesh.shape)}; "
      f"attention {program.attention}"
      + (f", experts via {program.expert_dispatch}" if cfg.model.moe.num_experts and mesh.shape["expert"] > 1 else "")
      + (f", {accum} microbatches per step" if (accum := program.cfg.train.grad_accum_steps) > 1 else "")
    )
    for note in program.notes:
      log(f"note: {note}")
    log(data.describe(cfg.data, sources))
    log(_describe_memory(compiled))
    log(
      f"compiled step per device: {work.partitioned:.3g} matmul FLOPs, {work.ratio:.2f}x its share of the "
      "step's matmuls"
    )
    if warning := work.warning():
      log(f"warning: {warning}")

    writer = MetricsWriter(workdir, enabled=lead)
    stack.callback(writer.close)
    bar = tqdm(
      total=t.steps, initial=start, disable=not t.progress_bar, dynamic_ncols=True, unit="step", file=sys.stderr
    )
    stack.callback(bar.close)
    say = bar.write if t.progress_bar else log
    tokens_per_step = t.batch_size * cfg.data.seq_len
    records: list[dict] = []
    last = {"step": start, "time": time.perf_counter()}

    def report(done: int, metrics) -> None:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.perf_counter()
      tps = (done - last["step"]) * tokens_per_step / max(now - last["time"], 1e-9)
      last.update(step=done, time=now)
      values["tokens_per_sec"] = tps
      values["mfu"] = mfu(tps, c.train_flops_per_token, list(mesh.devices.flat))
      writer.write(done, values)
      records.append({"step": done, **values})
      bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
      if not t.progress_bar:
        log(f"step {done}: loss {values['loss']:.4f}, ntp {values['ntp_loss']:.4f}, {tps:,.0f} tokens/s")

    skipped_before = None  # skipped_steps at the last check

    def check_streak(done: int, metrics) -> int:
      """Reads the non-finite guard's counters of step `done` (a step late, so the device is never
      idle) and returns the first later step whose streak could reach train.max_bad_steps: the
      streak grows by one a step at most, so until then the host need not look."""
      nonlocal skipped_before
      streak, skipped = (int(np.asarray(metrics[k].addressable_data(0))) for k in ("bad_streak", "skipped_steps"))
      new = skipped - (skipped if skipped_before is None else skipped_before)
      skipped_before = skipped
      if streak or new > 0:
        say(f"step {done}: {skipped} update(s) skipped for a non-finite loss or gradient so far, {streak} in a row now")
      if streak >= t.max_bad_steps:
        first = done - streak + 1
        saved = ckpt.latest_step() if ckpt else None
        raise TrainingError(
          f"steps {first}-{done}: {streak} updates in a row skipped for a non-finite loss or gradient "
          f"(train.max_bad_steps={t.max_bad_steps}); the state is still that of step {first - 1}"
          + (f", and checkpoint step {saved} in {ckpt.directory} is intact" if saved is not None else "")
        )
      return done + t.max_bad_steps - streak

    # The first step is read: a resumed state may be mid-streak.
    pending, guard, next_check, preempted = None, None, start + 1, False
    for i in range(start, t.steps):
      batch = program.global_batch(next(batches))
      with jax.transfer_guard("disallow"):
        state, metrics = compiled(state, batch)
      if pending is not None:  # fetch step t-1's metrics only after dispatching step t
        report(*pending)
        pending = None
      if guard is not None:
        next_check = check_streak(*guard)
        guard = None
      done = i + 1
      if done >= next_check or done == t.steps:
        guard = (done, metrics)
      if done % t.log_every == 0 or done == t.steps:
        pending = (done, metrics)
      preempted = preemption.reached(done)
      if ckpt and (done % cfg.checkpoint.every == 0 or done == t.steps or preempted):
        if pending is not None:  # the save waits for this step anyway
          report(*pending)
          pending = None
        ckpt.save(done, state, batches, origin)
        writer.flush()  # the metrics of every step the checkpoint holds are kept (a bucket's file is rewritten)
      if run_eval and (done % t.eval_every == 0 or done == t.steps):
        values = run_eval(state)
        writer.write(done, values)
        records.append({"step": done, **values})
        say(f"eval at step {done}: {evaluate.summary(values)}")
      bar.update(1)
      watchdog.beat(done)
      if preempted:
        break
    if pending is not None:
      report(*pending)
    if guard is not None:
      check_streak(*guard)
    if ckpt:
      ckpt.wait()
    if preempted:
      where = f"saved checkpoint step {done} in {ckpt.directory}" if ckpt else "checkpoints are off: nothing saved"
      log(f"preempted at step {done}: {where}; run the same command again to resume")
  return records
