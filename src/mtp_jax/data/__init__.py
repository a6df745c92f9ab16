"""Input pipeline: datasets on disk -> one global stream of packed, mixed rows -> each host's rows
of each batch (numpy + grain, no JAX).

`make_dataset(cfg.data, batch_size=..., seed=..., rows=...)` is the entry point; `iter()` of
its result is an iterator whose `get_state()` / `set_state()` (a global position) resume
exactly, on any number of hosts.
`mtp-prepare` (`prepare.py`, its work units `units.py`) writes the datasets it reads (format:
`manifest.py`).

The pipeline's names are imported on first use: Grain imports JAX, which `mtp-prepare`
and its worker processes never need.
"""

from __future__ import annotations

import importlib

from mtp_jax.data.manifest import DataError
from mtp_jax.data.tokenizer import EOS_ID, VOCAB_SIZE_MIN, decode, encode

_PIPELINE = (
  "BATCH_KEYS",
  "Source",
  "Stream",
  "check_model",
  "describe",
  "make_dataset",
  "open_source",
  "open_sources",
  "rows",
)

__all__ = ["EOS_ID", "VOCAB_SIZE_MIN", "DataError", "decode", "encode", *_PIPELINE]


def __getattr__(name: str):
  if name in _PIPELINE:
    return getattr(importlib.import_module("mtp_jax.data.pipeline"), name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
