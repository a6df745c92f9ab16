"""Where a run starts: `checkpoint.restore_from`, else its own latest checkpoint, else fresh.

The order is written down in `choose_start`, and each branch logs which it took and why. A
run records the `restore_from` it began from in every checkpoint it writes, which is how a
relaunched job knows it has already applied it: a preempted fine-tuning job resumes its own
progress instead of going back to the checkpoint it started from.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from mtp_jax import storage
from mtp_jax.config import CheckpointConfig
from mtp_jax.train.checkpoint import Checkpointer, CheckpointError, Damaged


@dataclasses.dataclass
class Start:
  state: object | None  # None: initialise fresh
  step: int
  origin: dict | None  # {"restore_from": ..., "params_only": ...}: recorded in every later checkpoint
  params: object | None = None  # params-only: (params, router_bias) to put into a fresh state


def resolve(spec: str, own):
  """`checkpoint.restore_from` -> (checkpoints directory, step). A number is a step of this
  run; a path is a run directory, its checkpoints/ directory (latest step) or one step."""
  key = f"checkpoint.restore_from: {spec}"
  if spec.strip().isdigit():
    directory, step = own, int(spec)
  else:
    path = storage.path(spec)
    if not path.exists():
      raise CheckpointError(f"{key}: no such file or directory")
    if (path / "checkpoints").is_dir():
      path = path / "checkpoints"
    if _is_step(path):
      directory, step = path.parent, int(path.name)
    else:
      steps = sorted(int(p.name) for p in path.iterdir() if _is_step(p)) if path.is_dir() else []
      if not steps:
        raise CheckpointError(f"{key}: holds no complete checkpoint")
      directory, step = path, steps[-1]
  if not _is_step(directory / str(step)):
    raise CheckpointError(f"{key}: there is no complete checkpoint {directory / str(step)}")
  return directory, step


def _is_step(path) -> bool:
  """A complete Orbax step: saves in flight or cut short carry a temporary name, or in a bucket
  lack the object that marks them complete."""
  done = "commit_success.txt" if storage.is_remote(path) else "_CHECKPOINT_METADATA"
  return path.name.isdigit() and (path / done).is_file()


def choose_start(cfg: CheckpointConfig, own_dir, own: Checkpointer | None, abstract_state, data_iterator, log) -> Start:
  """Where a run starts, in this order, saying which and why:
  1. `restore_from`, unless this run's own latest checkpoint already continues from it (so a
     relaunched job resumes instead of going back; a rollback moves later steps aside);
  2. the latest complete checkpoint in `own_dir` (falling back past damaged ones);
  3. fresh initialisation.
  `own` is None when checkpoints are off: nothing of the run's own is read or written."""
  spec = cfg.restore_from
  latest = own.latest_step() if own else None
  data_iterator = data_iterator if cfg.restore_data else None
  if spec is not None:
    directory, step = resolve(spec, own_dir)
    origin = {"restore_from": spec, "params_only": cfg.load_params_only}
    if latest is not None and _origin_of(own) == origin:
      log(f"checkpoint.restore_from={spec} was applied before: this run's checkpoints continue from it")
      return _resume_latest(own, cfg.strict, abstract_state, data_iterator, log)
    same_run = own is not None and directory == own.directory
    if latest is not None and (cfg.load_params_only or not same_run):
      raise CheckpointError(
        f"train.workdir already holds checkpoints (latest step {latest} in {own.directory}) of a run that did not "
        f"start from checkpoint.restore_from={spec}; use an empty train.workdir"
      )
    reader = own if same_run else Checkpointer(directory, read_only=True)
    try:
      start = _restore_explicit(reader, step, cfg.load_params_only, abstract_state, data_iterator, origin, log)
    finally:
      if reader is not own:
        reader.close()
    for later in [s for s in own.steps() if s > step] if same_run else []:
      log(f"rolled back to step {step}: checkpoint step {later} moved to {own.set_aside(later, 'rolled-back')}")
    return start
  if latest is None:
    why = "checkpoints are off" if own is None else f"{own.directory} holds no checkpoint"
    log(f"starting from fresh initialisation: {why}")
    return Start(state=None, step=0, origin=None)
  return _resume_latest(own, cfg.strict, abstract_state, data_iterator, log)


def _origin_of(ckpt: Checkpointer) -> dict | None:
  """The `restore_from` record of the run's latest readable checkpoint."""
  for step in reversed(ckpt.steps()):
    try:
      return ckpt.run_record(step)["origin"]
    except Exception:
      continue  # unreadable: the resume finds and reports the damage
  return None


def _restore_explicit(reader: Checkpointer, step, params_only, abstract_state, data_iterator, origin, log) -> Start:
  where = reader.directory / str(step)
  try:
    if params_only:
      params, bias, new = _held_modules(reader.saved(step), abstract_state)
      loaded, _ = reader.restore(step, {"params": params, "router_bias": bias}, partial=True)
      log(f"loaded parameters from {where} (checkpoint.load_params_only): a new run from step 0, fresh optimizer")
      if new:
        log(f"MTP module(s) {', '.join(str(k + 1) for k in new)} are not in {where}: initialised afresh")
      return Start(state=None, step=0, origin=origin, params=loaded)
    state, _ = reader.restore(step, abstract_state)
    _restore_data(reader, step, data_iterator, log)
  except Damaged as err:
    raise CheckpointError(f"checkpoint {where} (checkpoint.restore_from) is damaged: {err}") from None
  log(f"restored step {step} from {where} (checkpoint.restore_from)")
  return Start(state=state, step=step, origin=origin)


def _held_modules(saved: dict, abstract_state):
  """(params, router biases, new modules): the abstract parameters and biases less the MTP
  modules the checkpoint holds nothing of (a model trained with fewer, given a drafter now), and
  those modules' indices; their fresh initialisation stays."""
  depth = len(abstract_state.params["mtp"]) if "mtp" in abstract_state.params else 0
  new = [k for k in range(depth) if not any(n.startswith(f"params.mtp.{k}.") for n in saved)]

  def held(path, _) -> bool:
    return not (len(path) > 1 and path[0] == "mtp" and path[1] in new)

  params, _ = nnx.split_state(abstract_state.params, held, ...)
  bias, _ = nnx.split_state(abstract_state.router_bias, held, ...)
  return params, bias, new


def _resume_latest(own: Checkpointer, strict: bool, abstract_state, data_iterator, log) -> Start:
  damaged = []
  for step in reversed(own.steps()):
    try:
      state, run = own.restore(step, abstract_state)
      _restore_data(own, step, data_iterator, log)
    except Damaged as err:
      where = own.directory / str(step)
      if strict:
        raise CheckpointError(f"checkpoint {where} is damaged ({err}); checkpoint.strict stops here") from None
      damaged.append(step)
      log(f"warning: checkpoint {where} is damaged ({err}); trying the one before it")
      continue
    for bad in damaged:
      log(f"warning: damaged checkpoint step {bad} moved to {own.set_aside(bad, 'damaged')}")
    why = "the latest complete checkpoint" + (" that is intact" if damaged else "")
    log(f"resumed from step {step} in {own.directory} ({why})")
    return Start(state=state, step=step, origin=run.get("origin"))
  raise CheckpointError(f"every checkpoint in {own.directory} is damaged (steps {', '.join(map(str, damaged))})")


def _restore_data(reader: Checkpointer, step: int, data_iterator, log) -> None:
  saved = reader.directory / str(step)
  if data_iterator is None:
    log(f"data position of step {step} not restored (checkpoint.restore_data=false): the data order starts over")
  elif reader.restore_data(step, data_iterator):
    return
  elif (saved / "data").is_dir():  # one Grain position per process, as mtp-jax saved before
    log(
      f"note: checkpoint step {step} holds per-process data positions from an older mtp-jax, which the global "
      "data order cannot take; the model state is exact, the data order starts at the beginning"
    )
  else:  # written by mtp-import: weights, no data yet
    log(f"checkpoint step {step} holds no data position (an imported model): the data order starts at the beginning")
