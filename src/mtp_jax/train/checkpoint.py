"""Orbax checkpoints of the train state and the data iterator's position.

Saves are atomic (Orbax writes to a temporary directory and renames it), so an
interrupted save never damages the last good checkpoint. Fault tolerance beyond that
(preemption signals, async saves, resharding) is a later issue's work.
"""

from __future__ import annotations

import pathlib

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

  def save(self, step: int, state, data_state: dict) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state))
    self._manager.save(step, args=args, force=True)

  def restore(self, step: int, target):
    """Restores onto `target` (ShapeDtypeStructs with shardings); returns (state, data_state)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    try:
      out = self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as err:
      first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
      raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be restored: {first}") from None
    return out["state"], out["data"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
