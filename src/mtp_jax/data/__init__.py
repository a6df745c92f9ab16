"""Input pipeline: documents -> shard -> shuffle per epoch -> pack -> batch (numpy + grain, no JAX).

`make_dataset(cfg.data, batch_size=..., seed=...)` is the entry point; `iter()` of
its result is a grain iterator whose `get_state()` / `set_state()` resume exactly.
"""

from __future__ import annotations

import grain

from mtp_jax.config import DataConfig
from mtp_jax.data import packing, stdlib
from mtp_jax.data.tokenizer import EOS_ID, VOCAB_SIZE_MIN, decode, encode

__all__ = ["EOS_ID", "VOCAB_SIZE_MIN", "decode", "describe", "document_dataset", "encode", "make_dataset"]

# Local files are small and fast to read; a synchronous read keeps a 2-core host
# free for the trainer. Wrap the result in grain prefetching to overlap I/O.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _paths(cfg: DataConfig) -> list[str]:
  paths = stdlib.list_files(max_documents=cfg.max_documents)
  if not paths:
    raise ValueError(f"data.source={cfg.source!r}: no documents found under {stdlib.stdlib_dir()}")
  return paths


def document_dataset(cfg: DataConfig, *, seed: int, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
  """This process' documents (int32 token ids ending in EOS), repeated forever.

  Sharded by document index before anything else, so processes never share a
  document; each epoch is a fresh permutation of the shard when `cfg.shuffle`.
  """
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")
  paths = _paths(cfg)
  if len(paths) < process_count:
    raise ValueError(
      f"data.source={cfg.source!r}: {len(paths)} documents (data.max_documents={cfg.max_documents})"
      f" are fewer than the {process_count} processes"
    )
  docs = grain.MapDataset.source(stdlib.DocumentSource(paths))[process_index::process_count]
  if cfg.shuffle:
    docs = docs.shuffle(seed=seed % 2**32)  # Reseeded per epoch by the repeat below.
  return docs.repeat()


def make_dataset(
  cfg: DataConfig, *, batch_size: int, seed: int, process_index: int = 0, process_count: int = 1
) -> grain.IterDataset:
  """Infinite batches of `{"tokens", "segment_ids", "positions"}`, int32 (batch_size // process_count, seq_len).

  `batch_size` is the global batch; every process gets its own disjoint slice
  of the documents. Segment ids number documents within a row from 1 (0:
  padding, whose tokens are 0); positions restart at 0 with every document.
  """
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by process_count={process_count}")
  docs = document_dataset(cfg, seed=seed, process_index=process_index, process_count=process_count)
  rows = packing.pack(
    docs.to_iter_dataset(_READ_OPTIONS), seq_len=cfg.seq_len, seed=seed % 2**32, shuffle_rows=cfg.shuffle
  )
  return rows.batch(batch_size // process_count, drop_remainder=True)


def describe(cfg: DataConfig) -> str:
  """One line saying what the pipeline reads."""
  paths = _paths(cfg)
  where = stdlib.stdlib_dir()
  return f"{cfg.source} corpus: {len(paths)} files from {where} (byte-level, seq_len {cfg.seq_len})"
