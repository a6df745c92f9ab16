"""Joining a multi-process job, and noticing when it can no longer make progress.

`initialize` starts `jax.distributed` from the config, from JAX_COORDINATOR_ADDRESS, or from a
cluster JAX recognises (TPU pod slices, GKE, SLURM, Open MPI, Kubernetes); a single process on
its own starts nothing. `Watchdog` bounds how long a process waits when a peer has died
inside a collective: XLA's collectives have no timeout of their own.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import jax

from mtp_jax.config import ConfigError, DistributedConfig
from mtp_jax.errors import RunError, first_line


def _detected_cluster():
  """The cluster JAX would bootstrap from, if it holds more than one process, else None."""
  try:
    from jax._src import clusters  # private, but the only way to ask without initializing
  except ImportError:
    return None
  for kind in clusters.ClusterEnv._cluster_types:
    if getattr(kind, "opt_in_only_method", False):
      continue
    try:
      if not kind.is_env_present():
        continue
      count = kind.get_process_count()
    except Exception:  # a cluster that cannot say (e.g. no Kubernetes client): let JAX try
      count = None
    return None if count == 1 else kind.__name__
  return None


_joined = False  # whether `initialize` started jax.distributed in this process


def initialize(cfg: DistributedConfig) -> bool:
  """Starts jax.distributed when asked to or when a multi-process job is detected; returns
  whether it did. Must run before anything touches a JAX device."""
  if cfg.initialize == "never":
    return False
  given = [cfg.coordinator_address, cfg.num_processes, cfg.process_id]
  implied = any(v is not None for v in given) or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if cfg.initialize == "auto" and not implied and _detected_cluster() is None:
    return False
  if cfg.num_processes == 1 and cfg.coordinator_address is None:
    return False
  jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
  address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if address and cfg.process_id:  # JAX aborts with a crash report when it cannot connect: ask first
    _wait_for(address, cfg.initialization_timeout_s)
  try:
    jax.distributed.initialize(
      coordinator_address=cfg.coordinator_address,
      num_processes=cfg.num_processes,
      process_id=cfg.process_id,
      local_device_ids=cfg.local_device_ids,
      initialization_timeout=cfg.initialization_timeout_s,
      heartbeat_timeout_seconds=cfg.heartbeat_timeout_s,
    )
  except (ValueError, TypeError, RuntimeError) as err:  # jaxlib's XlaRuntimeError is a RuntimeError
    raise RunError(f"distributed: could not join the job: {first_line(err)}") from None
  global _joined
  _joined = True
  return True


def _wait_for(address: str, timeout_s: float) -> None:
  """Returns once something listens at host:port, or raises ConfigError after timeout_s."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ConfigError("distributed.coordinator_address", f"{address!r} is not host:port")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
        return
    except OSError as err:
      if time.monotonic() >= deadline:
        raise RunError(
          f"distributed: could not join the job: nothing answered at the coordinator {address} within "
          f"{timeout_s:g}s ({err.strerror or err}); is process 0 running, and is the address right?"
        ) from None
      time.sleep(0.5)


def process_tag() -> str:
  """`process 1/4: ` in a multi-process job (so a failure says whose it is), else empty. Before
  `initialize` has joined a job it is empty without asking JAX, which would start its backends."""
  if not _joined:
    return ""
  n = jax.process_count()
  return f"process {jax.process_index()}/{n}: " if n > 1 else ""


class Watchdog:
  """Ends the process with one line on stderr when the job can no longer make progress:
  a peer process stops beating (died, killed, lost its host), or no step finishes for
  `step_timeout_s` once the first one has.

  A peer that dies in the middle of a step leaves the others blocked in a collective that
  never completes, and XLA's collectives have no timeout. Each process bumps a counter in the
  coordinator's key-value store every few seconds and watches the others' counters change
  (local clocks only, so hosts need not agree on the time). Exiting with os._exit skips
  teardown, which would block in the same collective; committed checkpoints are untouched
  and one still being written is never committed, so the next run resumes safely.
  """

  def __init__(self, step_timeout_s: float, peer_timeout_s: float, prog: str = "mtp-train"):
    self.step_timeout_s, self.peer_timeout_s, self.prog = step_timeout_s, peer_timeout_s, prog
    self._step, self._last_step = None, None  # the step clock starts at the first beat
    self._stop = threading.Event()
    self._threads = []
    self._client = None
    if jax.process_count() > 1 and peer_timeout_s > 0:
      from jax._src import distributed as jax_distributed

      self._client = jax_distributed.global_state.client
      now = time.monotonic()
      self._contact = now  # when the coordinator last answered
      self._seen = {p: (None, now) for p in range(jax.process_count()) if p != jax.process_index()}
      self._threads.append(threading.Thread(target=self._exchange, name="heartbeat", daemon=True))
    periods = [t / 4 for t in (step_timeout_s, peer_timeout_s if self._client else 0) if t > 0]
    if periods:
      self._period = min(5.0, *periods)
      self._threads.append(threading.Thread(target=self._watch, name="watchdog", daemon=True))
    for thread in self._threads:
      thread.start()

  def beat(self, step: int) -> None:
    """Called by the loop after each step."""
    self._step, self._last_step = step, time.monotonic()

  def close(self) -> None:
    self._stop.set()
    for thread in self._threads:
      thread.join(timeout=1.0)  # the heartbeat thread may be stuck on a dead coordinator

  def _exchange(self) -> None:
    """Publishes this process's beat count and reads the others'. Its calls can block on a
    coordinator that is gone, so `_watch` judges it by when it last got an answer."""
    me, beats = jax.process_index(), 0
    while not self._stop.wait(self._period):
      beats += 1
      try:
        self._client.key_value_set(f"mtp_jax/alive/{me}", str(beats), allow_overwrite=True)
        for p, (count, since) in self._seen.items():
          try:
            value = self._client.key_value_try_get(f"mtp_jax/alive/{p}")
          except Exception as err:  # jaxlib raises its own runtime error types
            if "NOT_FOUND" not in str(err):
              raise
            value = None  # not beating yet: its clock runs from our start
          self._seen[p] = (value, time.monotonic()) if value != count else (count, since)
        self._contact = time.monotonic()
      except Exception as err:
        self._fail(f"lost contact with the coordinator (process 0): {first_line(err)}")

  def _watch(self) -> None:
    while not self._stop.wait(self._period):
      now = time.monotonic()
      if self._client is not None:
        if now - self._contact > self.peer_timeout_s:
          self._fail(
            f"the coordinator (process 0) has not answered for {now - self._contact:.0f}s "
            f"(distributed.peer_timeout_s={self.peer_timeout_s:g}): it died or hangs, see its log; stopping too"
          )
        for p, (_, since) in self._seen.items():
          if now - since > self.peer_timeout_s:
            self._fail(
              f"process {p} has sent no heartbeat for {now - since:.0f}s "
              f"(distributed.peer_timeout_s={self.peer_timeout_s:g}): it died or hangs, see its log; stopping too"
            )
      if self.step_timeout_s and self._last_step is not None and now - self._last_step > self.step_timeout_s:
        self._fail(
          f"no step finished for {now - self._last_step:.0f}s after step {self._step} "
          f"(distributed.step_timeout_s={self.step_timeout_s:g})"
        )

  def _fail(self, why: str) -> None:
    print(f"{self.prog}: {process_tag()}{why}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)
