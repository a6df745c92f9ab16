"""From datasets on disk to batches: open -> shuffle -> shard -> pack -> mix -> batch -> prefetch.

Each source is a random-access list of documents (token ids ending in EOS): a
directory written by `mtp-prepare` (ArrayRecord shards) or the embedded stdlib
corpus. Per source and epoch, the document order is one seeded global permutation,
and process p of P reads only positions p, p + P, ... of it: the processes' slices
are disjoint, together cover the epoch, and no host opens another's records.
Each source is packed on its own and the packed rows are interleaved by the
mixture weights, so a weight is a share of rows, that is of tokens.

Every stage is a Grain dataset, so the iterator's `get_state()` is a few integers
per source that resume the stream exactly, workers and prefetch included.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import grain
import numpy as np
from absl import flags

from mtp_jax.config import STDLIB, DataConfig, ModelConfig
from mtp_jax.data import manifest as manifest_lib
from mtp_jax.data import packing, stdlib
from mtp_jax.data.manifest import DataError
from mtp_jax.data.tokenizer import BYTE_TOKENIZER

# Records are read in the thread that packs them; prefetching happens on whole batches.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass(frozen=True)
class Source:
  """One opened split of one dataset."""

  name: str  # as configured: a directory or "stdlib"
  documents: grain.MapDataset  # index -> int32 token ids ending in EOS
  lengths: np.ndarray  # tokens per document (EOS included)
  vocab_size: int
  eos_id: int
  tokenizer: str  # identity: documents of different tokenizers never mix
  weight: float = 1.0  # share of the mixture's rows, relative to the other sources

  def __len__(self) -> int:
    return len(self.lengths)


def open_source(
  path: str, split: str, max_documents: int = 0, weight: float = 1.0, missing_ok: bool = False
) -> Source | None:
  """The `split` ("train" or "eval") of the dataset at `path` (or of the stdlib corpus); None
  when the dataset has no such split and `missing_ok`."""
  if path == STDLIB:
    files = stdlib.split_files(split, max_documents=max_documents)
    if not files:
      raise DataError(f"stdlib: no {split} documents under {stdlib.stdlib_dir()}")
    tok = BYTE_TOKENIZER
    # Sizes in bytes: the token counts of the (almost always valid UTF-8) files.
    lengths = np.array([os.path.getsize(f) + 1 for f in files], np.int64)
    docs = grain.MapDataset.source(stdlib.DocumentSource(files))
    return Source(path, docs, lengths, tok.vocab_size, tok.eos_id, "bytes", weight)
  man = manifest_lib.read(path)
  if missing_ok and split not in man.splits:
    return None
  shards = manifest_lib.shard_paths(path, man, split)
  lengths = manifest_lib.lengths(path, man, split)
  records = grain.sources.ArrayRecordDataSource(shards)
  if len(records) != len(lengths):
    raise DataError(f"{path}: the {split} shards hold {len(records)} records, the manifest {len(lengths)}")
  docs = grain.MapDataset.source(records).map(functools.partial(manifest_lib.decode_record, dtype=man.token_dtype))
  if max_documents:
    docs, lengths = docs[:max_documents], lengths[:max_documents]
  t = man.tokenizer
  return Source(path, docs, lengths, t.vocab_size, t.eos_id, t.identity, weight)


def open_sources(cfg: DataConfig, split: str = "train") -> list[Source]:
  """The configured sources' `split`. For "eval": those that have one, keeping their weights."""
  opened = (open_source(s.path, split, cfg.max_documents, s.weight, missing_ok=split != "train") for s in cfg.sources)
  sources = [s for s in opened if s is not None]
  if not sources:
    raise DataError(
      f"no data source has a held-out {split!r} split; prepare one with mtp-prepare --eval-fraction "
      "(or --eval-input), or set train.eval_every=0"
    )
  return sources


def check_model(sources: list[Source], model: ModelConfig) -> None:
  """Refuses data whose tokenizer the model cannot read, naming both values."""
  for i, s in enumerate(sources):
    where = f"data.sources[{i}] ({s.name})"
    if s.vocab_size > model.vocab_size:
      raise DataError(f"{where}: tokenizer vocab size {s.vocab_size} exceeds model.vocab_size {model.vocab_size}")
    if s.eos_id != model.eos_id:
      raise DataError(f"{where}: end-of-document id {s.eos_id} differs from model.eos_id {model.eos_id}")
    if s.tokenizer != sources[0].tokenizer:
      raise DataError(
        f"{where}: tokenised by {s.tokenizer}, but data.sources[0] ({sources[0].name}) by {sources[0].tokenizer}"
      )


def documents(
  source: Source, *, seed: int, shuffle: bool, process_index: int, process_count: int, repeat: bool
) -> grain.MapDataset:
  """This process' documents: its slice of each epoch's global permutation."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, process_count={process_count})")
  if len(source) < process_count:
    raise DataError(f"{source.name}: {len(source)} documents are fewer than the {process_count} processes")
  docs = source.documents
  if shuffle:
    docs = docs.shuffle(seed=seed % 2**32)
  docs = docs[process_index::process_count]
  # Index e * len + i of the repeat reads the slice of epoch e's permutation (the shuffle
  # reseeds itself per epoch), so processes stay disjoint in every epoch.
  return docs.repeat() if repeat else docs


def rows(
  cfg: DataConfig,
  sources: list[Source],
  *,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  shuffle: bool | None = None,
  repeat: bool = True,
) -> grain.IterDataset:
  """This process' packed rows `{"tokens", "segment_ids", "positions"}` (int32, seq_len), mixed."""
  shuffle = cfg.shuffle if shuffle is None else shuffle
  streams = []
  for i, source in enumerate(sources):
    source_seed = (seed + 1_000_003 * i) % 2**32
    docs = documents(
      source,
      seed=source_seed,
      shuffle=shuffle,
      process_index=process_index,
      process_count=process_count,
      repeat=repeat,
    )
    streams.append(
      packing.pack(
        docs.to_iter_dataset(_READ_OPTIONS),
        seq_len=cfg.seq_len,
        seed=source_seed,
        shuffle_rows=shuffle,
        mode=cfg.packing,
      )
    )
  if len(streams) == 1:
    return streams[0]
  return grain.IterDataset.mix(streams, [s.weight for s in sources])


def make_dataset(
  cfg: DataConfig,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  split: str = "train",
  sources: list[Source] | None = None,
) -> grain.IterDataset:
  """Infinite batches `{"tokens", "segment_ids", "positions"}`, int32 (batch_size // process_count, seq_len).

  `batch_size` is the global batch. The eval split is read in order, unshuffled,
  in the training process: a fresh iterator yields the same batches every time.
  """
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} is not divisible by process_count={process_count}")
  sources = open_sources(cfg, split) if sources is None else sources
  train = split == "train"
  ds = rows(
    cfg, sources, seed=seed, process_index=process_index, process_count=process_count, shuffle=cfg.shuffle and train
  )
  ds = ds.batch(batch_size // process_count, drop_remainder=True)
  if train and cfg.workers:
    if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags; we have no absl main
      flags.FLAGS.mark_as_parsed()
    options = grain.MultiprocessingOptions(num_workers=cfg.workers, per_worker_buffer_size=max(cfg.prefetch, 1))
    return ds.mp_prefetch(options)
  if cfg.prefetch:
    return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.prefetch)
  return ds


def describe(cfg: DataConfig, sources: list[Source]) -> str:
  """One line per source: what it is, how much, how much the packer must split."""
  lines = []
  for s in sources:
    what = f"byte-level, from {stdlib.stdlib_dir()}" if s.name == STDLIB else f"tokenizer {s.tokenizer}"
    long = int((s.lengths > cfg.seq_len).sum())
    lines.append(
      f"data: {s.name}: {len(s):,} documents, {int(s.lengths.sum()):,} tokens ({what}), weight {s.weight:g}; "
      f"{long:,} documents longer than seq_len {cfg.seq_len} are split"
    )
  return "\n".join(lines)
