"""Preemption notices: SIGTERM on one host, JAX's coordination service across hosts.

A scheduler that reclaims machines (a TPU maintenance event, Slurm's `--signal`, Kubernetes'
pod termination) sends SIGTERM and waits a grace period. The loop asks `reached(step)` after
every step; once it says yes, every process saves that same step and exits 0.

With several processes, JAX's preemption sync manager (started by `jax.distributed.initialize`)
owns SIGTERM: a notice reaching any host is shared, and `reached_preemption_sync_point` turns
true on all of them at one agreed step. A Python handler would steal the signal from it, so
one is installed only when this is the only process.
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils


class Preemption:
  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.signalled = False
    self._previous = None
    if not self.multihost and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame) -> None:
    self.signalled = True

  def reached(self, step: int) -> bool:
    """Call after every step, on every process: True at the step all of them save and stop at."""
    if not self.multihost:
      return self.signalled
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:  # the preemption service is switched off (jax_enable_preemption_service)
      return False

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
