"""From datasets on disk to batches: one global stream of packed rows, read by each host for its rows.

Each source is a random-access list of documents (token ids ending in EOS): a
directory written by `mtp-prepare` (ArrayRecord shards) or the embedded stdlib
corpus. A source's stream reads epoch after epoch, each in its own seeded permutation
of the documents. Packing is planned from the documents' lengths alone
(`packing.Planner`), and the packed rows of the sources are interleaved by the mixture
weights, so a weight is a share of rows, that is of tokens.

So global batch n (rows n*B .. n*B + B-1 of the stream) is a pure function of the seed,
the data config and n, whatever the number of processes: every host computes the whole
plan, which is cheap, then reads only the documents of the rows it feeds to its own
devices (`make_dataset(..., rows=...)`). The position that resumes the stream is global
too, a few integers per source (`get_state()`), so a run saved on one number of hosts
resumes exactly on another, and with another batch size.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import copy
import dataclasses
import functools
import os
import queue
import threading
import weakref
from collections.abc import Iterator, Sequence

import grain
import numpy as np

from mtp_jax.config import STDLIB, DataConfig, ModelConfig
from mtp_jax.data import manifest as manifest_lib
from mtp_jax.data import packing, stdlib
from mtp_jax.data.manifest import DataError
from mtp_jax.data.packing import BATCH_KEYS
from mtp_jax.data.tokenizer import BYTE_TOKENIZER


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
  if not len(lengths):
    raise DataError(f"{path}: the {split} split has no documents")
  t = man.tokenizer
  return Source(path, docs, lengths, t.vocab_size, t.eos_id, t.identity, weight)


def open_sources(cfg: DataConfig, split: str = "train", required: bool = True) -> list[Source]:
  """The configured sources' `split`. For "eval": those that have one, keeping their weights
  (none at all: an error, or [] unless `required`)."""
  opened = (open_source(s.path, split, cfg.max_documents, s.weight, missing_ok=split != "train") for s in cfg.sources)
  sources = [s for s in opened if s is not None]
  if not sources and required:
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


def _order(source: Source, seed: int, shuffle: bool, repeat: bool) -> grain.MapDataset:
  """k -> the index of the k-th document of the source's stream: epoch k // N in its own
  seeded permutation (Grain's index shuffle, so no epoch's permutation is ever stored)."""
  order = grain.MapDataset.range(len(source))
  if shuffle:
    order = order.shuffle(seed=seed)
  return order.repeat() if repeat else order


class _SourceRows:
  """One source's packed rows in plan order, and the position that resumes them."""

  def __init__(self, source: Source, cfg: DataConfig, seed: int, shuffle: bool, repeat: bool):
    self.source = source
    self.order = _order(source, seed, shuffle, repeat)
    # k -> document, remembered: the plan looks each up, then the read again (Grain's index
    # shuffle costs tens of microseconds a lookup).
    self.document = functools.lru_cache(maxsize=1 << 16)(lambda k: int(self.order[k]))
    # A document longer than a row is read once for its consecutive pieces, not once a piece.
    self.tokens = functools.lru_cache(maxsize=32)(lambda k: source.documents[self.document(k)])
    self.plan = packing.Planner(
      lambda k: int(source.lengths[self.document(k)]),
      None if repeat else len(source),
      seq_len=cfg.seq_len,
      mode=cfg.packing,
      seed=seed,
      shuffle=shuffle,
    )
    self.taken = 0  # rows handed out, in all
    self._load((0, 0), 0)

  def _load(self, start: packing.Position, used: int) -> None:
    """Plans the group that starts at `start`, of which `used` rows were handed out already."""
    self.start = start
    self.group, self.end = self.plan.group(start)
    if used > len(self.group):
      raise ValueError(f"the group at {list(start)} has {len(self.group)} rows, not {used}")
    self.used = used

  def next_row(self) -> list[packing.Piece] | None:
    """The next row's pieces; None once an unrepeated stream has ended."""
    if self.used == len(self.group):
      if not self.group:
        return None
      self._load(self.end, 0)
      if not self.group:
        return None
    self.used += 1
    self.taken += 1
    return self.group[self.used - 1]

  def read(self, piece: packing.Piece) -> np.ndarray:
    k, start, stop = piece
    return self.tokens(k)[start:stop]

  def state(self) -> dict:
    return {
      "path": self.source.name,
      "documents": len(self.source),
      "start": list(self.start),
      "used": self.used,
      "rows": self.taken,
    }

  def restore(self, saved: dict) -> None:
    if (saved["path"], saved["documents"]) != (self.source.name, len(self.source)):
      raise ValueError(
        f"it was saved for {saved['path']} ({saved['documents']} documents), this source is {self.source.name} "
        f"({len(self.source)})"
      )
    self._load(tuple(saved["start"]), saved["used"])
    self.taken = saved["rows"]


class Stream:
  """The global stream of packed rows `(source index, pieces)`: the sources' rows interleaved by
  weight. Each next row comes from the source furthest behind its share, (rows + 1) / weight
  smallest, the first source on a tie: with weights 3 and 1, a a a b a a a b ..."""

  VERSION = 2  # 1 was Grain's per-process iterator state

  def __init__(self, cfg: DataConfig, sources: list[Source], *, seed: int, shuffle: bool, repeat: bool):
    self.fixed = {"seed": seed, "shuffle": shuffle, "seq_len": cfg.seq_len, "packing": cfg.packing}
    self.sources = [_SourceRows(s, cfg, (seed + 1_000_003 * i) % 2**32, shuffle, repeat) for i, s in enumerate(sources)]
    self.weights = [s.weight for s in sources]

  def next_row(self) -> tuple[int, list[packing.Piece]] | None:
    s = min(range(len(self.sources)), key=lambda i: ((self.sources[i].taken + 1) / self.weights[i], i))
    row = self.sources[s].next_row()
    return None if row is None else (s, row)

  def read(self, row: tuple[int, list[packing.Piece]], out: dict[str, np.ndarray]) -> None:
    s, pieces = row
    packing.fill([self.sources[s].read(p) for p in pieces], self.fixed["seq_len"], out)

  def get_state(self) -> dict:
    return {"version": self.VERSION, **self.fixed, "sources": [s.state() for s in self.sources]}

  def set_state(self, state: dict) -> None:
    """Moves to a saved position; ValueError saying what differs when it is another stream's.
    Weights may change: the mixture goes on from the rows each source has given so far."""
    if state.get("version") != self.VERSION:
      raise ValueError(f"data position format {state.get('version')!r}, this mtp-jax reads {self.VERSION}")
    for key, value in self.fixed.items():
      if state.get(key) != value:
        raise ValueError(f"it was saved with {key} {state.get(key)!r}, this run has {value!r}")
    if len(state["sources"]) != len(self.sources):
      raise ValueError(f"it was saved with {len(state['sources'])} data sources, this run has {len(self.sources)}")
    for i, (source, saved) in enumerate(zip(self.sources, state["sources"], strict=True)):
      try:
        source.restore(saved)
      except ValueError as err:
        raise ValueError(f"data.sources[{i}]: {err}") from None


def rows(
  cfg: DataConfig, sources: list[Source], *, seed: int, shuffle: bool | None = None, repeat: bool = True
) -> Iterator[dict[str, np.ndarray]]:
  """The global stream's rows `{"tokens", "segment_ids", "positions"}` (int32, seq_len), read."""
  stream = Stream(cfg, sources, seed=seed, shuffle=cfg.shuffle if shuffle is None else shuffle, repeat=repeat)
  while (row := stream.next_row()) is not None:
    out = {k: np.zeros(cfg.seq_len, np.int32) for k in BATCH_KEYS}
    stream.read(row, out)
    yield out


class Batches:
  """This host's rows of each global batch, `{"tokens", "segment_ids", "positions"}` int32
  (len(rows), seq_len), prepared `prefetch` batches ahead in a thread. `get_state()` is the
  global position after the batches handed out; `set_state()` moves there."""

  def __init__(self, stream: Stream, batch_size: int, rows: list[int], prefetch: int, workers: int):
    self._stream, self._batch_size, self._rows = stream, batch_size, rows
    self._prefetch = prefetch
    self._pool = concurrent.futures.ThreadPoolExecutor(workers) if workers else None
    self._position = stream.get_state()
    self._thread: threading.Thread | None = None
    self._queue: queue.Queue = queue.Queue(max(prefetch, 1))
    self._stop = threading.Event()
    _OPEN.add(self)

  def __iter__(self):
    return self

  def _produce(self) -> tuple[dict[str, np.ndarray], dict]:
    plan = [self._stream.next_row() for _ in range(self._batch_size)]
    if any(row is None for row in plan):
      raise StopIteration
    seq_len = self._stream.fixed["seq_len"]
    out = {k: np.zeros((len(self._rows), seq_len), np.int32) for k in BATCH_KEYS}

    def read(i: int) -> None:
      self._stream.read(plan[self._rows[i]], {k: v[i] for k, v in out.items()})

    if self._pool is None:
      for i in range(len(self._rows)):
        read(i)
    else:
      list(self._pool.map(read, range(len(self._rows))))
    return out, self._stream.get_state()

  def _run(self) -> None:
    """The prefetching thread. It blocks on a full queue (an iterator left unclosed costs no
    CPU) and ends once told to stop, or after handing over an error or the stream's end."""
    while not self._stop.is_set():
      try:
        item = self._produce()
      except BaseException as err:  # StopIteration and read errors: raised where the batch is taken
        item = err
      self._queue.put(item)
      if isinstance(item, BaseException):
        return

  def __next__(self) -> dict[str, np.ndarray]:
    if not self._prefetch:
      batch, self._position = self._produce()
      return batch
    if self._thread is None:
      self._stop.clear()
      self._thread = threading.Thread(target=self._run, name="mtp-data", daemon=True)
      self._thread.start()
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    batch, self._position = item
    return batch

  def _halt(self) -> None:
    """Stops the prefetching thread and drops what it prepared: the stream is then where the
    thread left it, and must be moved before it is read again."""
    if self._thread is not None:
      self._stop.set()
      while self._thread.is_alive():
        with contextlib.suppress(queue.Empty):
          self._queue.get(timeout=0.05)
      self._thread = None
      while not self._queue.empty():
        self._queue.get_nowait()

  def get_state(self) -> dict:
    return copy.deepcopy(self._position)

  def set_state(self, state: dict) -> None:
    self._halt()
    self._stream.set_state(state)
    self._position = self._stream.get_state()

  def close(self) -> None:
    """Stops prefetching; the iterator can still be moved (`set_state`) and read again."""
    self._halt()
    if self._pool is not None:
      self._pool.shutdown(wait=False)


_OPEN: weakref.WeakSet[Batches] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
  """A prefetching thread still inside Grain's native code when the interpreter ends aborts the
  process, so every iterator left open stops its thread first."""
  for batches in list(_OPEN):
    batches.close()


@dataclasses.dataclass(frozen=True)
class Dataset:
  """The global batches of one split as one host reads them; each `iter()` starts at the beginning."""

  cfg: DataConfig
  sources: list[Source]
  batch_size: int
  seed: int
  rows: list[int]
  shuffle: bool

  def __iter__(self) -> Batches:
    stream = Stream(self.cfg, self.sources, seed=self.seed, shuffle=self.shuffle, repeat=True)
    return Batches(stream, self.batch_size, self.rows, self.cfg.prefetch, self.cfg.workers)


def make_dataset(
  cfg: DataConfig,
  *,
  batch_size: int,
  seed: int,
  rows: Sequence[int] | None = None,
  split: str = "train",
  sources: list[Source] | None = None,
) -> Dataset:
  """Infinite global batches of `batch_size` rows; a host reads the `rows` of each (indices into
  the global batch, in the order it wants them; default all). The eval split is read in
  order, unshuffled: a fresh iterator yields the same batches every time."""
  rows = list(range(batch_size)) if rows is None else [int(r) for r in rows]
  if not rows or min(rows) < 0 or max(rows) >= batch_size:
    raise ValueError(f"rows {rows[:4]}... are not indices into a batch of {batch_size}")
  sources = open_sources(cfg, split) if sources is None else sources
  return Dataset(cfg, sources, batch_size, seed, rows, cfg.shuffle and split == "train")


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
