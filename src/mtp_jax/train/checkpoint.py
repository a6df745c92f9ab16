"""Orbax checkpoints of the train state and the data iterator's position.

The iterator's state goes into the same checkpoint step as the model's, one small
JSON file per process (Grain's Orbax handler), so every host resumes its own slice
of the data exactly where it stopped. Saves are atomic (Orbax writes to a temporary
directory and renames it), so an interrupted save never damages the last good checkpoint. Fault tolerance beyond that
(preemption signals, async saves, resharding) is a later issue's work.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import sys

import grain
import orbax.checkpoint as ocp

from mtp_jax.config import CheckpointConfig


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used, reported as one line."""


class Checkpointer:
  def __init__(self, workdir: str | pathlib.Path, cfg: CheckpointConfig):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=cfg.max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, data_iterator: grain.DatasetIterator) -> None:
    """Saves `state` and the iterator's position (read now, before this returns)."""
    data = grain.checkpoint.CheckpointSave(data_iterator)
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=data)
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, target, data_iterator: grain.DatasetIterator):
    """Restores onto `target` (ShapeDtypeStructs with shardings) and moves `data_iterator`
    to the saved position; returns the state."""
    data = grain.checkpoint.CheckpointRestore(data_iterator)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=data)
    try:
      with _quiet_failed_reads():
        out = self._manager.restore(step, args=args)
    except Exception as err:  # storage layers raise anything; the user needs one line
      raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be restored: {_root_cause(err)}") from None
    return out["state"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


@contextlib.contextmanager
def _quiet_failed_reads():
  """When one read of a damaged checkpoint fails, Orbax's sibling reads fail too, some of them
  later, on TensorStore's threads, reporting through asyncio's logger and the unraisable hook.
  The caller reports the first failure once, so after a failure those channels stay quiet;
  after a successful restore they are put back."""
  logger = logging.getLogger("asyncio")
  level, hook = logger.level, sys.unraisablehook
  logger.setLevel(logging.CRITICAL)
  sys.unraisablehook = lambda _: None
  yield  # an exception propagates from here and skips the restoring below
  logger.setLevel(level)
  sys.unraisablehook = hook


def _root_cause(err: BaseException, limit: int = 300) -> str:
  while err.__cause__ is not None:
    err = err.__cause__
  text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
  return text if len(text) <= limit else text[: limit - 3] + "..."
