"""The training loop: build mesh, state and data, compile once, step, log, checkpoint."""

from __future__ import annotations

import contextlib
import functools
import sys
import time

import jax
import numpy as np
import yaml
from etils import epath
from flax import nnx
from tqdm import tqdm

from mtp_jax import config as config_lib
from mtp_jax import data, storage
from mtp_jax.config import Config
from mtp_jax.distributed import Watchdog
from mtp_jax.errors import RunError, first_line
from mtp_jax.model.flops import cost
from mtp_jax.train import evaluate, resume, step
from mtp_jax.train.checkpoint import Checkpointer
from mtp_jax.train.metrics import MetricsWriter, mfu
from mtp_jax.train.preemption import Preemption
from mtp_jax.train.program import Program, build, describe_memory, memory


class TrainingError(RunError):
  """A run that cannot go on (e.g. a non-finite loss), reported as one line."""


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
    saved.write_text(config_lib.to_yaml(cfg))


def _made(spec: str) -> epath.Path:
  """train.workdir, made by process 0 once the data is checked and before any compile: one that
  cannot be (a parent that is a file, no permission) is a config error, not a failure minutes in."""
  workdir = storage.path(spec)
  if jax.process_index() == 0:
    try:
      workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
      # The OS's reason alone where it names the folder itself; the whole line where it names
      # another path (a parent) or none (a bucket's errors carry no errno).
      same = err.strerror and str(err.filename) == str(workdir)
      reason = err.strerror if same else first_line(err)
      raise config_lib.ConfigError("train.workdir", f"cannot make {spec}: {reason}") from None
  return workdir


def _quiet(*_args, **_kw) -> None:
  """The log of every process but the first."""


def _differences(a, b, prefix) -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}.{k}")]
  return [] if a == b else [f"{prefix} {a!r} -> {b!r}"]


def _open_sources(cfg: Config, log) -> tuple[list, list]:
  """The train and eval sources, checked against the model: bad data fails here, before any
  compile. With train.steps below train.eval_every the run evaluates once, at its end, where
  there is an eval split, and needs none."""
  t = cfg.train
  sources = data.open_sources(cfg.data, "train")
  eval_sources = data.open_sources(cfg.data, "eval", required=t.steps >= t.eval_every) if t.eval_every else []
  if t.eval_every and not eval_sources:
    log("note: no data source has a held-out eval split, and train.steps < train.eval_every: no evaluation")
  data.check_model(sources + eval_sources, cfg.model)
  return sources, eval_sources


def _open_data(program: Program, sources: list, eval_sources: list):
  """(this host's iterator over the global train batches, the evaluation to run or None)."""
  cfg, t = program.cfg, program.cfg.train
  rows = program.host_rows  # global batches, of which this host reads its rows
  batches = iter(data.make_dataset(cfg.data, batch_size=t.batch_size, seed=t.seed, sources=sources, rows=rows))
  if not eval_sources:
    return batches, None
  eval_data = data.make_dataset(
    cfg.data, batch_size=t.batch_size, seed=t.seed, split="eval", sources=eval_sources, rows=rows
  )
  return batches, evaluate.Evaluator(program, eval_data)


def _starting_state(program: Program, begin: resume.Start) -> step.TrainState:
  """The restored state, or a fresh one with what a params-only restore holds put over it (new
  MTP modules keep their initialisation)."""
  if begin.state is not None:
    return begin.state
  state = program.init_state()
  if begin.params is not None:
    params, bias = begin.params["params"], begin.params["router_bias"]
    state = state.replace(
      params=nnx.merge_state(state.params, params), router_bias=nnx.merge_state(state.router_bias, bias)
    )
  return state


def _log_header(program: Program, sources: list, compiled, work, comms, log) -> None:
  """What runs where: the model, the mesh and kernels, the data, the compiled step's memory,
  matmul work and collectives per device."""
  cfg, mesh = program.cfg, program.mesh
  c = cost(cfg.model, cfg.data.seq_len, cfg.train.trainable)
  log(
    f"model: {c.total_params:,} parameters ({c.active_params:,} active per token), "
    f"{c.train_flops_per_token / 1e6:,.1f} MFLOPs/token to train; mesh {dict(mesh.shape)}; "
    f"attention {program.attention}"
    + (f", dropless experts {program.experts}" if program.experts else "")
    + (f", experts via {program.expert_dispatch}" if cfg.model.moe.num_experts and mesh.shape["expert"] > 1 else "")
    + (f", {accum} microbatches per step" if (accum := cfg.train.grad_accum_steps) > 1 else "")
  )
  for note in program.notes:
    log(f"note: {note}")
  log(data.describe(cfg.data, sources))
  log(describe_memory(memory(compiled)))
  sends = ", ".join(f"{kind} {b / 2**20:,.1f} MiB" for kind, (b, _) in comms.by_kind().items())
  log(
    f"compiled step per device: {work.partitioned:.3g} matmul FLOPs, {work.ratio:.2f}x its share of the step's matmuls"
    + (f" ({work.recomputed:.3g} of them XLA's own recomputation to fit memory)" if work.recomputed else "")
    + (f"; sends {comms.sent / 2**20:,.1f} MiB a step to the others ({sends})" if comms.each else "")
  )
  if warning := work.warning():
    log(f"warning: {warning}")


def _say_if_compiling(run_eval: evaluate.Evaluator, log, kind, err, tb) -> None:
  """At the run's end: a run stopped by a preemption or Ctrl-C while its evaluation compiles says
  why its process is still there (mtp-train's errors end it at once, without waiting)."""
  if (kind is None or issubclass(kind, KeyboardInterrupt)) and (line := run_eval.still_compiling()):
    log(line)


def train(cfg: Config, *, devices: list[jax.Device] | None = None, log=print) -> list[dict]:
  """Runs (or resumes) training to cfg.train.steps; returns the logged metric records.
  In a multi-process job only process 0 logs, shows progress and writes metrics.

  Open the data, choose the starting state, log the header, then step."""
  t = cfg.train
  lead = jax.process_index() == 0
  if not lead:
    log = _quiet
    t = t.model_copy(update={"progress_bar": False})
  sources, eval_sources = _open_sources(cfg, log)  # nothing is written for a run with bad data
  workdir = _made(t.workdir)
  program = build(cfg, devices)
  mesh = program.mesh
  batches, run_eval = _open_data(program, sources, eval_sources)
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
    state = _starting_state(program, begin)
    compiled, work, comms = program.compile_and_count()
    _log_header(program, sources, compiled, work, comms, log)
    if run_eval:
      run_eval.compile_ahead()
      stack.push(functools.partial(_say_if_compiling, run_eval, log))
      if line := run_eval.ready():  # compiled already (on GPUs)
        log(line)
    c = cost(cfg.model, cfg.data.seq_len, cfg.train.trainable)

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
      evaluated = None
      if run_eval and (done % t.eval_every == 0 or done == t.steps):
        began = time.perf_counter()
        values = run_eval(state)
        last["time"] += time.perf_counter() - began  # tokens/s times the train steps alone
        writer.write(done, values)
        records.append({"step": done, **values})
        evaluated = f"eval at step {done}: {evaluate.summary(values)}"
      if run_eval and (line := run_eval.ready()):
        say(line)  # before an evaluation that waited for the compile
      if evaluated:
        say(evaluated)
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
