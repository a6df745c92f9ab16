"""Input pipeline: datasets on disk -> shuffled, sharded, packed, mixed batches (numpy + grain, no JAX).

`make_dataset(cfg.data, batch_size=..., seed=...)` is the entry point; `iter()` of
its result is a grain iterator whose `get_state()` / `set_state()` resume exactly.
`mtp-prepare` (`prepare.py`) writes the datasets it reads (format: `manifest.py`).
"""

from __future__ import annotations

from mtp_jax.data.manifest import DataError
from mtp_jax.data.pipeline import (
  Source,
  check_model,
  describe,
  documents,
  make_dataset,
  open_source,
  open_sources,
  rows,
)
from mtp_jax.data.tokenizer import EOS_ID, VOCAB_SIZE_MIN, decode, encode

__all__ = [
  "EOS_ID",
  "VOCAB_SIZE_MIN",
  "DataError",
  "Source",
  "check_model",
  "decode",
  "describe",
  "documents",
  "encode",
  "make_dataset",
  "open_source",
  "open_sources",
  "rows",
]
