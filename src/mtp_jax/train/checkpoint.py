"""Orbax checkpoints of the train state and each host's data position, with checksums.

One step directory holds three Orbax items:
  state  the TrainState, written by every host for its own shards (restores onto any mesh);
  data   one small JSON file per process: where its Grain iterator stands;
  run    JSON: a checksum of every array, and the `checkpoint.restore_from` the run began from.

Saves are asynchronous (the arrays are copied to host memory, then written by a background
thread while training goes on) and atomic: Orbax writes into a temporary directory and renames
it (or, on object stores, writes a commit marker) only once every host has finished, so a
crash mid-save leaves nothing that is later taken for a checkpoint. What a rename cannot catch,
a file damaged after the fact, the checksums do: each is an order-independent hash of an
array's bits, so it is the same on any mesh and is checked after every restore.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import shutil
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mtp_jax.config import CheckpointConfig


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, reported as one line."""


class Damaged(Exception):
  """A checkpoint step that cannot be read back, or reads back different from what was saved."""


def leaf_name(path) -> str:
  """`params.blocks.1.ffn.router.weight`: a pytree path as Orbax and people spell it."""
  parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return ".".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def named_leaves(tree) -> dict:
  return {leaf_name(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _array_checksum(x: jax.Array) -> jax.Array:
  """sum_i bits[i] * (2i + 1) mod 2**32 over the row-major index i: any change to one element
  changes it, and it is computed elementwise then summed, so no sharding moves data."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
  index, stride = jnp.zeros(x.shape, jnp.uint32), 1
  for dim in reversed(range(x.ndim)):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2**32)
    stride *= x.shape[dim]
  return jnp.sum(bits * (2 * index + 1), dtype=jnp.uint32)


@jax.jit
def _checksum_vector(tree) -> jax.Array:
  return jnp.stack([_array_checksum(x) for x in jax.tree.leaves(tree)])


def checksums(tree) -> dict[str, int]:
  """One uint32 checksum per array, by leaf name; the same for the same values on any mesh."""
  names = list(named_leaves(tree))
  if not names:
    return {}
  values = np.asarray(_checksum_vector(tree).addressable_data(0))  # replicated: every host has it
  return dict(zip(names, values.tolist(), strict=True))


def _agree(ok: bool) -> bool:
  """True when every process says True: hosts must take the same branch after a restore."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


class Checkpointer:
  """The checkpoints of one directory (`<run>/checkpoints`); writable unless `read_only`."""

  def __init__(self, directory: str | pathlib.Path, cfg: CheckpointConfig | None = None, read_only: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    cfg = cfg or CheckpointConfig()
    options = ocp.CheckpointManagerOptions(
      max_to_keep=cfg.max_to_keep,
      keep_period=cfg.keep_every or None,
      enable_async_checkpointing=cfg.async_save,
      create=not read_only,
      read_only=read_only,
      cleanup_tmp_directories=not read_only,  # what a crash mid-save left behind
    )
    handlers = {
      "state": ocp.PyTreeCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler(),
      "run": ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def steps(self) -> list[int]:
    """Complete checkpoints, oldest first (a save still in flight or cut short is not one)."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state, data_iterator: grain.DatasetIterator | None, origin: dict | None = None) -> None:
    """Starts saving `state` (donatable once this returns) and the iterator's current position."""
    items = {
      "state": ocp.args.PyTreeSave(state),
      "run": ocp.args.JsonSave({"checksums": checksums(state), "origin": origin}),
    }
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def run_record(self, step: int) -> dict:
    """{"checksums": {array name: uint32}, "origin": restore_from record or None}."""
    return self._manager.restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]

  def check_compatible(self, step: int, target) -> None:
    """Refuses a checkpoint whose arrays do not match `target` by name and shape."""
    try:
      with _QUIET:
        saved = named_leaves(self._manager.item_metadata(step)["state"])
    except Exception as err:  # unreadable metadata: a damaged step, for the caller to handle
      raise Damaged(f"metadata unreadable: {_root_cause(err)}") from None
    where = f"checkpoint {self.directory / str(step)}"
    for name, want in named_leaves(target).items():
      if name not in saved:
        raise CheckpointError(f"{where} has no {name}, which this config needs (shape {tuple(want.shape)})")
      have = saved[name]
      if tuple(have.shape) != tuple(want.shape):
        raise CheckpointError(
          f"{where} does not fit this config: {name} has shape {tuple(have.shape)} there, {tuple(want.shape)} here"
        )

  def restore(self, step: int, target, *, partial: bool = False):
    """Restores onto `target` (ShapeDtypeStructs carrying the shardings wanted now, any mesh)
    and verifies the checksums; returns (state, the run record). With `partial`, `target` may
    name a subset of the saved arrays (e.g. only parameters)."""
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    args = ocp.args.Composite(
      state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=partial),
      run=ocp.args.JsonRestore(),
    )
    try:
      with _QUIET:
        out = self._manager.restore(step, args=args)
      state, run = out["state"], out["run"]
      got = checksums(state)
      want = run["checksums"]
    except Exception as err:  # storage layers raise anything; the caller needs one line
      raise Damaged(_root_cause(err)) from None
    bad = next((k for k in sorted(got) if want.get(k) != got[k]), None)
    if not _agree(bad is None):
      raise Damaged(f"{bad or 'an array on another host'} does not match its checksum")
    return state, run

  def restore_data(self, step: int, data_iterator: grain.DatasetIterator) -> bool:
    """Moves the iterator to where this process's stood at `step`. False (iterator untouched)
    when the checkpoint was written by a different number of processes."""
    path = self.directory / str(step) / "data" / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not _agree(path.is_file()):
      return False
    try:
      json.loads(path.read_text())
    except (OSError, ValueError) as err:
      raise Damaged(f"data position unreadable: {_root_cause(err)}") from None
    try:
      self._manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except Exception as err:  # a readable position the pipeline refuses: the data config changed
      raise CheckpointError(
        f"checkpoint {self.directory / str(step)}: the saved data position does not fit this data config "
        f"({_root_cause(err)}); restore with the data config it was saved with"
      ) from None
    return True

  def set_aside(self, step: int, why: str) -> pathlib.Path:
    """Moves a step out of Orbax's sight (kept, never deleted) to `checkpoints-<why>/<step>`."""
    dest = self.directory.with_name(f"{self.directory.name}-{why}") / str(step)
    if jax.process_index() == 0:
      dest.parent.mkdir(parents=True, exist_ok=True)
      n = 1
      while dest.exists():
        dest, n = dest.with_name(f"{step}.{n}"), n + 1
      shutil.move(self.directory / str(step), dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    self._manager.reload()
    return dest

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


# ----------------------------------------------------------------------------- where to start


@dataclasses.dataclass
class Start:
  state: object | None  # None: initialise fresh
  step: int
  origin: dict | None  # {"restore_from": ..., "params_only": ...}: recorded in every later checkpoint
  params: object | None = None  # params-only: (params, router_bias) to put into a fresh state


def resolve(spec: str, own: pathlib.Path) -> tuple[pathlib.Path, int]:
  """`checkpoint.restore_from` -> (checkpoints directory, step). A number is a step of this
  run; a path is a run directory, its checkpoints/ directory (latest step) or one step."""
  key = f"checkpoint.restore_from: {spec}"
  if spec.strip().isdigit():
    directory, step = own, int(spec)
  else:
    path = pathlib.Path(spec).expanduser().absolute()
    if not path.exists():
      raise CheckpointError(f"{key}: no such file or directory")
    if (path / "checkpoints").is_dir():
      path = path / "checkpoints"
    if path.name.isdigit() and (path / "_CHECKPOINT_METADATA").is_file():
      directory, step = path.parent, int(path.name)
    else:
      steps = Checkpointer(path, read_only=True).steps() if path.is_dir() else []
      if not steps:
        raise CheckpointError(f"{key}: holds no complete checkpoint")
      directory, step = path, steps[-1]
  if not (directory / str(step) / "_CHECKPOINT_METADATA").is_file():
    raise CheckpointError(f"{key}: there is no complete checkpoint {directory / str(step)}")
  return directory, step


def choose_start(
  cfg: CheckpointConfig, own_dir: pathlib.Path, own: Checkpointer | None, abstract_state, data_iterator, log
) -> Start:
  """Where a run starts, in this order, saying which and why:
  1. `restore_from`, unless this run's own latest checkpoint already continues from it (so a
     relaunched job resumes instead of going back; a rollback moves later steps aside);
  2. the latest complete checkpoint in `own_dir` (falling back past damaged ones);
  3. fresh initialisation.
  `own` is None when checkpoints are off: nothing of the run's own is read or written."""
  spec = cfg.restore_from
  latest = own.latest_step() if own else None
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
      target = {"params": abstract_state.params, "router_bias": abstract_state.router_bias}
      reader.check_compatible(step, target)
      loaded, _ = reader.restore(step, target, partial=True)
      log(f"loaded parameters from {where} (checkpoint.load_params_only): a new run from step 0, fresh optimizer")
      return Start(state=None, step=0, origin=origin, params=loaded)
    reader.check_compatible(step, abstract_state)
    state, _ = reader.restore(step, abstract_state)
    _restore_data(reader, step, data_iterator, log)
  except Damaged as err:
    raise CheckpointError(f"checkpoint {where} (checkpoint.restore_from) is damaged: {err}") from None
  log(f"restored step {step} from {where} (checkpoint.restore_from)")
  return Start(state=state, step=step, origin=origin)


def _resume_latest(own: Checkpointer, strict: bool, abstract_state, data_iterator, log) -> Start:
  damaged = []
  for step in reversed(own.steps()):
    try:
      own.check_compatible(step, abstract_state)
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
  if not reader.restore_data(step, data_iterator):
    log(
      f"warning: checkpoint step {step} was written by a different number of processes than the "
      f"{jax.process_count()} now; the model state is exact, the data order starts over"
    )


# ----------------------------------------------------------------------------- one-line errors


class _Quiet:
  """When one read of a damaged checkpoint fails, Orbax's sibling reads fail too, some of them
  later, on TensorStore's threads, reporting through asyncio's logger, the unraisable hook and
  the exception hook (which TensorStore's callbacks print through). The caller reports the first
  failure once, so from a failure until the next successful read those channels stay quiet."""

  def __init__(self):
    self._saved = None

  def __enter__(self):
    if self._saved is None:
      logger = logging.getLogger("asyncio")
      self._saved = (logger.level, sys.unraisablehook, sys.excepthook)
      logger.setLevel(logging.CRITICAL)
      sys.unraisablehook = lambda _: None
      sys.excepthook = lambda *_: None

  def __exit__(self, kind, *_):
    if kind is None and self._saved is not None:
      logging.getLogger("asyncio").setLevel(self._saved[0])
      sys.unraisablehook, sys.excepthook = self._saved[1:]
      self._saved = None


_QUIET = _Quiet()


def _root_cause(err: BaseException, limit: int = 300) -> str:
  while err.__cause__ is not None:
    err = err.__cause__
  text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."
