"""Metric sinks: `<workdir>/metrics.jsonl`, TensorBoard events, and MFU bookkeeping."""

from __future__ import annotations

import json
import math
import os
import sys

import jax

from mtp_jax import storage

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets.
_PEAK_FLOPS = {
  "H100": 989e12,
  "H200": 989e12,
  "A100": 312e12,
  "B200": 2250e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}


def peak_flops(device: jax.Device) -> float | None:
  """Peak bf16 FLOP/s of one device, or None where unknown (e.g. CPUs)."""
  kind = getattr(device, "device_kind", "")
  for name in sorted(_PEAK_FLOPS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return _PEAK_FLOPS[name]
  return None


def mfu(tokens_per_sec: float, flops_per_token: float, devices: list[jax.Device]) -> float | None:
  peak = peak_flops(devices[0])
  if peak is None:
    return None
  return tokens_per_sec * flops_per_token / (peak * len(devices))


def _clean(value):
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None  # JSON has no NaN or infinity


class MetricsWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard. In a bucket the
  file is rewritten whole now and then (storage.AppendedText); `flush()` at each checkpoint makes
  every line before it durable, so a run killed later loses only lines its resume writes again."""

  def __init__(self, workdir, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    workdir = storage.path(workdir)
    self._jsonl = storage.AppendedText(workdir / "metrics.jsonl")
    self._tb = _summary_writer(os.fspath(workdir / "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    record = {"step": step, **{k: _clean(v) for k, v in scalars.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step" and v is not None:
        self._tb.add_scalar(k, v, step)

  def flush(self) -> None:
    if self.enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported here (only the writer needs it) and without torch:
  where torch is installed, tensorboardX's writer module imports it to accept torch tensors,
  1.8 s of every run's start for tensors we never pass (our scalars are floats)."""
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX allows for
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked:
      del sys.modules["torch"]
  return SummaryWriter(logdir)
