"""`mtp-prepare`: text files -> token-id ArrayRecord shards + manifest (the format in manifest.py).

1. Expand the inputs (files, directories walked recursively, globs) into a sorted file list.
   A file's kind comes from its name: JSON Lines (`.jsonl`, `.json`, either `.gz`), Parquet
   (`.parquet`), or plain text (anything else; one file = one document).
2. Cut the files into work units of about CHUNK_BYTES: big JSONL files into byte ranges that
   begin at a line start, Parquet files into row groups, runs of small text files into batches.
3. Tokenize the units in a pool of spawned worker processes, each loading the tokenizer from
   its spec. Units go out in a bounded window and come back in input order, so the output is
   byte-identical whatever the number of workers.
4. The parent sends each document (ids + EOS) to `train` or `eval`, writes it as one record,
   starts a new shard every `shard_tokens` tokens and keeps every document's length.
5. All of it goes into a sibling `DIR.tmp-<pid>`, manifest last; only a complete dataset is
   swapped in for DIR, so a failure (or Ctrl-C) leaves an existing dataset untouched.

Held-out data: files named by `--eval-input` go wholly to `eval`, and are taken out of the
training inputs when an INPUT also covers them (so `mtp-prepare data/ --eval-input
data/valid.jsonl` does what it says). `--eval-fraction F` also holds out each other document
whose blake2b hash of its text (keyed by the seed) falls below F: deterministic, independent
of file names, order and worker count, and exact duplicates always land in the same split.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import glob
import gzip
import hashlib
import io
import itertools
import json
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
import zlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

import mtp_jax
from mtp_jax.data import manifest as manifest_lib
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.data.manifest import DataError

CHUNK_BYTES = 32 << 20  # work-unit size: a JSONL byte range, or a batch of small text files
SHARD_TOKENS = 1 << 28  # a new shard once the current one holds this many tokens
TEXT_BATCH_FILES = 1024  # at most this many text files per work unit
_ENCODE_BATCH = 1024  # documents per tokenizer call
_BINARY_PROBE = 8192  # a NUL in a text file's first bytes marks it binary


@dataclasses.dataclass(frozen=True)
class _Unit:
  """A piece of work: a JSONL byte range, a Parquet row group, or a batch of text files."""

  kind: str  # "jsonl", "jsonl.gz", "parquet" or "text"
  paths: tuple[str, ...]  # several only for a batch of text files
  start: int = 0  # JSONL: first byte; Parquet: row group
  end: int = 0  # JSONL: one past the last byte
  nbytes: int = 0  # input bytes, for the progress bar


@dataclasses.dataclass
class _Result:
  """A unit's documents: ids + EOS concatenated, their lengths and text hashes, what was skipped."""

  tokens: np.ndarray
  lengths: np.ndarray  # int64 per document
  hashes: np.ndarray  # uint64 per document
  file_of_doc: np.ndarray  # index into the unit's paths, per document
  skipped: collections.Counter
  error: tuple[int, str] | None = None  # JSONL: (line within the unit, message)


class _LineError(Exception):
  """A JSONL problem at `line` (counted from the unit's first byte)."""

  def __init__(self, line: int, message: str):
    super().__init__(line, message)
    self.line, self.message = line, message


def _kind(path: str) -> str:
  name = path.lower()
  if name.endswith((".jsonl", ".json")):
    return "jsonl"
  if name.endswith((".jsonl.gz", ".json.gz")):
    return "jsonl.gz"
  return "parquet" if name.endswith(".parquet") else "text"


def expand(inputs: list[str]) -> list[str]:
  """The files named by `inputs` (files, directories, globs), each sorted, duplicates dropped."""
  files, seen = [], set()
  for spec in inputs:
    if os.path.isdir(spec):
      found = []
      for root, dirs, names in os.walk(spec):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, n) for n in names if not n.startswith(".")]
      found.sort(key=lambda p: p.split(os.sep))  # directory by directory, as stdlib.list_files
    elif os.path.exists(spec):
      found = [spec]
    elif glob.has_magic(spec):
      found = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
      if not found:
        raise DataError(f"{spec}: the pattern matches no files")
    else:
      raise DataError(f"{spec}: no such file or directory")
    for path in found:
      if os.path.isfile(path) and os.path.realpath(path) not in seen:
        seen.add(os.path.realpath(path))
        files.append(path)
  return files


def _plan(files: list[str], text_field: str, chunk_bytes: int) -> list[_Unit]:
  """Work units for `files`, in order; checks each Parquet file's column up front."""
  units: list[_Unit] = []
  for path in files:
    kind, size = _kind(path), os.path.getsize(path)
    if kind == "jsonl":
      bounds = _line_aligned_bounds(path, size, chunk_bytes)
      units += [_Unit(kind, (path,), a, b, b - a) for a, b in itertools.pairwise(bounds)]
    elif kind == "jsonl.gz":
      units.append(_Unit(kind, (path,), nbytes=size))
    elif kind == "parquet":
      rows = _parquet_rows(path, text_field)
      units += [_Unit(kind, (path,), g, nbytes=size * n // max(sum(rows), 1)) for g, n in enumerate(rows)]
    else:
      last = units[-1] if units else None
      if last and last.kind == "text" and last.nbytes + size <= chunk_bytes and len(last.paths) < TEXT_BATCH_FILES:
        units[-1] = dataclasses.replace(last, paths=(*last.paths, path), nbytes=last.nbytes + size)
      else:
        units.append(_Unit(kind, (path,), nbytes=size))
  return units


def _line_aligned_bounds(path: str, size: int, chunk_bytes: int) -> list[int]:
  """Offsets 0 = b0 < b1 < ... = size cutting the file into ~chunk_bytes ranges, each starting a line."""
  bounds = [0]
  with open(path, "rb") as f:
    while bounds[-1] + chunk_bytes < size:
      f.seek(bounds[-1] + chunk_bytes - 1)
      f.readline()  # to just past the newline ending the line that holds the cut
      if f.tell() >= size:
        break
      bounds.append(f.tell())
  return [*bounds, size] if size else []


def _parquet_rows(path: str, column: str) -> list[int]:
  """Rows per row group, once the file is known to have a string column `column`."""
  try:
    meta = pq.ParquetFile(path)
  except (OSError, pa.ArrowException) as err:
    raise DataError(f"{path}: not a readable Parquet file ({tokenizer_lib._first_line(err)})") from None
  schema = meta.schema_arrow
  if column not in schema.names:
    raise DataError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); choose one with --text-field")
  kind = schema.field(column).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise DataError(f"{path}: column {column!r} holds {kind}, not strings")
  return [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]


class _Tokenize:
  """Turns a work unit into a _Result; one per process."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, text_field: str, strict: bool, seed: int):
    self.tokenizer, self.text_field, self.strict = tokenizer, text_field, strict
    self.dtype = np.dtype(manifest_lib.token_dtype(tokenizer.vocab_size))
    self.key = str(seed).encode()

  def __call__(self, unit: _Unit) -> _Result:
    self.texts, self.ids, self.hashes, self.skipped = [], [], [], collections.Counter()
    per_file = []
    try:
      for path in unit.paths:
        before = len(self.hashes)
        self._read(unit, path)
        per_file.append(len(self.hashes) - before)
    except _LineError as err:
      none = np.zeros(0, np.int64)
      return _Result(none, none, none, none, self.skipped, (err.line, err.message))
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
      raise DataError(f"{path}: cannot read ({tokenizer_lib._first_line(err)})") from None
    self._encode()
    eos = np.array([self.tokenizer.eos_id], np.int32)
    tokens = np.concatenate([a for ids in self.ids for a in (ids, eos)] or [eos[:0]])
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tokenizer.vocab_size):
      raise DataError(f"{path}: the tokenizer made id {tokens.max()}, outside its vocabulary")
    return _Result(
      tokens=tokens.astype(self.dtype),
      lengths=np.array([len(ids) + 1 for ids in self.ids], np.int64),
      hashes=np.array(self.hashes, np.uint64),
      file_of_doc=np.repeat(np.arange(len(per_file)), per_file),
      skipped=self.skipped,
    )

  def _read(self, unit: _Unit, path: str) -> None:
    if unit.kind == "jsonl":
      with open(path, "rb") as f:
        f.seek(unit.start)
        self._jsonl(path, io.BytesIO(f.read(unit.end - unit.start)))
    elif unit.kind == "jsonl.gz":
      with gzip.open(path, "rb") as f:
        self._jsonl(path, f)
    elif unit.kind == "parquet":
      for batch in pq.ParquetFile(path).iter_batches(row_groups=[unit.start], columns=[self.text_field]):
        for text in batch.column(0).to_pylist():
          self._add(text or "")
    else:
      with open(path, "rb") as f:
        data = f.read()
      if b"\0" in data[:_BINARY_PROBE]:
        self.skipped["binary"] += 1
      else:
        self._add(data.decode("utf-8", errors="replace"))

  def _jsonl(self, path: str, lines) -> None:
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8
        if self.strict:
          raise _LineError(number, f"not valid JSON ({tokenizer_lib._first_line(err)})") from None
        self.skipped["invalid_json"] += 1
        continue
      if not isinstance(record, dict):
        if self.strict:
          raise _LineError(number, f"a JSON {_json_type(record)}, not an object")
        self.skipped["invalid_json"] += 1
        continue
      if self.text_field not in record:
        fields = ", ".join(record) or "none"
        raise _LineError(number, f"no field {self.text_field!r} (fields: {fields}); choose one with --text-field")
      text = record[self.text_field]
      if not isinstance(text, str):
        raise _LineError(number, f"field {self.text_field!r} is a JSON {_json_type(text)}, not a string")
      self._add(text)

  def _add(self, text: str) -> None:
    if not text.strip():
      self.skipped["empty"] += 1
      return
    try:
      data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from JSON escapes: replace them, as for bad bytes
      text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
      data = text.encode("utf-8")
    self.hashes.append(int.from_bytes(hashlib.blake2b(data, digest_size=8, key=self.key).digest(), "little"))
    self.texts.append(text)
    if len(self.texts) >= _ENCODE_BATCH:
      self._encode()

  def _encode(self) -> None:
    batch = getattr(self.tokenizer, "encode_batch", None)
    self.ids += batch(self.texts) if batch else [self.tokenizer.encode(t) for t in self.texts]
    self.texts = []


def _json_type(value) -> str:
  names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
  return names.get(type(value), "number")


_worker: _Tokenize | None = None


def _start_worker(spec: str, eos_token: str | None, text_field: str, strict: bool, seed: int) -> None:
  global _worker
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes already
  tokenizer = tokenizer_lib.load(spec, eos_token)
  if hasattr(tokenizer, "num_threads"):
    tokenizer.num_threads = 1
  _worker = _Tokenize(tokenizer, text_field, strict, seed)


def _run(unit: _Unit) -> _Result:
  return _worker(unit)


def _results(units: list[_Unit], workers: int, tokenize: _Tokenize, init_args: tuple):
  """(unit, result) in input order; at most 2 * workers units in flight.

  A `concurrent.futures` pool, not `multiprocessing.Pool`: a worker that dies (killed, out of
  memory) fails its units instead of leaving the parent waiting forever, and leaving early (an
  error, Ctrl-C) cancels the queued units and lets the running ones finish, where
  `Pool.terminate` can kill a worker holding the result queue's lock and then hang on it.
  """
  if workers <= 1:
    for unit in units:
      yield unit, tokenize(unit)
    return
  context = multiprocessing.get_context("spawn")
  pool = concurrent.futures.ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=init_args)
  try:
    pending = collections.deque()
    for unit in units:
      pending.append((unit, pool.submit(_run, unit)))
      if len(pending) >= 2 * workers:
        yield _finished(*pending.popleft())
    while pending:
      yield _finished(*pending.popleft())
  finally:
    pool.shutdown(wait=True, cancel_futures=True)


def _finished(unit: _Unit, future: concurrent.futures.Future) -> tuple[_Unit, _Result]:
  try:
    return unit, future.result()
  except concurrent.futures.BrokenExecutor:
    # Every unit in flight fails with the pool, so this one need not be the one that killed it.
    raise DataError(
      f"{unit.paths[0]}: a tokenizer worker process died with this file among the units in flight "
      "(killed, or out of memory?)"
    ) from None


class _SplitWriter:
  """Appends documents to DIR/{split}/shard-NNNNN.arrayrecord, a new shard every `shard_tokens` tokens."""

  def __init__(self, root: pathlib.Path, split: str, dtype: str, shard_tokens: int):
    self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
    self.shards: list[manifest_lib.Shard] = []
    self.lengths: list[np.ndarray] = []
    self._writer, self._docs, self._tokens = None, 0, 0

  def write(self, ids: np.ndarray) -> None:
    if self._writer is None:
      (self.root / self.split).mkdir(exist_ok=True)
      name = f"{self.split}/shard-{len(self.shards):05d}.arrayrecord"
      self._writer, self._name = ArrayRecordWriter(str(self.root / name), "group_size:1"), name
    self._writer.write(manifest_lib.encode_record(ids, self.dtype))
    self._docs, self._tokens = self._docs + 1, self._tokens + len(ids)
    if self._tokens >= self.shard_tokens:
      self.close()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self.shards.append(manifest_lib.Shard(path=self._name, documents=self._docs, tokens=self._tokens))
      self._writer, self._docs, self._tokens = None, 0, 0

  def finish(self) -> manifest_lib.Split | None:
    """Closes the last shard, writes lengths.npy; None when no document came."""
    self.close()
    if not self.shards:
      return None
    lengths = np.concatenate(self.lengths).astype(np.int64)
    np.save(self.root / self.split / "lengths.npy", lengths)
    return manifest_lib.Split(
      documents=len(lengths),
      tokens=int(lengths.sum()),
      max_document_tokens=int(lengths.max()),
      shards=self.shards,
      lengths=f"{self.split}/lengths.npy",
    )


def prepare(
  inputs: Sequence[str],
  output: str,
  *,
  tokenizer: str = "bytes",
  eos_token: str | None = None,
  text_field: str = "text",
  eval_fraction: float = 0.0,
  eval_inputs: Sequence[str] = (),
  seed: int = 0,
  strict: bool = False,
  workers: int | None = None,
  shard_tokens: int = SHARD_TOKENS,
  overwrite: bool = False,
  progress: bool = False,
  chunk_bytes: int = CHUNK_BYTES,
) -> manifest_lib.Manifest:
  """Tokenizes `inputs` into a dataset at `output` (see the module docstring); its manifest."""
  if not 0 <= eval_fraction < 1:
    raise DataError(f"--eval-fraction {eval_fraction}: must be at least 0 and below 1")
  if shard_tokens < 1:
    raise DataError(f"--shard-tokens {shard_tokens}: must be positive")
  workers = (os.cpu_count() or 1) if workers is None else workers
  if workers < 0:
    raise DataError(f"--workers {workers}: must be 0 or more")
  tok = tokenizer_lib.load(tokenizer, eos_token)
  eval_files = expand(eval_inputs)
  held_out = {os.path.realpath(p) for p in eval_files}
  files = [p for p in expand(inputs) if os.path.realpath(p) not in held_out] + eval_files
  out = pathlib.Path(os.path.abspath(output))
  _check_output(out, overwrite, files)
  units = _plan(files, text_field, chunk_bytes)
  dtype = manifest_lib.token_dtype(tok.vocab_size)
  threshold = np.uint64(min(int(eval_fraction * 2**64), 2**64 - 1))  # held out: text hash < threshold

  tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in manifest_lib.SPLITS}
    docs = {p: [0, 0] for p in files}  # path -> documents in [train, eval]
    skipped = collections.Counter()
    bar = tqdm(total=sum(u.nbytes for u in units), unit="B", unit_scale=True, disable=not progress, file=sys.stderr)
    tokenize = _Tokenize(tok, text_field, strict, seed)
    results = _results(units, min(workers, len(units)), tokenize, (tokenizer, eos_token, text_field, strict, seed))
    with bar, contextlib.closing(results), contextlib.ExitStack() as stack:
      stack.callback(lambda: [w.close() for w in writers.values()])
      for unit, result in results:
        if result.error:
          line, message = result.error
          raise DataError(f"{unit.paths[0]}:{_lines_before(unit) + line}: {message}")
        eval_file = np.array([os.path.realpath(p) in held_out for p in unit.paths])
        _route(unit, result, (result.hashes < threshold) | eval_file[result.file_of_doc], writers, docs)
        skipped += result.skipped
        bar.update(unit.nbytes)
    splits = {s: split for s, w in writers.items() if (split := w.finish()) is not None}
    _check_splits(splits, inputs, skipped, eval_inputs, eval_fraction)
    manifest = manifest_lib.Manifest(
      tokenizer=tokenizer_lib.info(tok),
      token_dtype=dtype,
      text_field=text_field,
      eval_fraction=eval_fraction,
      splits=splits,
      sources=[_source(p, n, os.path.realpath(p) in held_out) for p, n in docs.items()],
      skipped=dict(sorted(skipped.items())),
      created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      mtp_jax_version=mtp_jax.__version__,
    )
    manifest.write(tmp)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _swap(tmp, out)
  return manifest


def _route(unit: _Unit, result: _Result, is_eval: np.ndarray, writers: dict, docs: dict) -> None:
  """Writes each of the unit's documents to its split and counts it against its file."""
  ends = np.cumsum(result.lengths).tolist()
  for end, n, held, f in zip(ends, result.lengths.tolist(), is_eval.tolist(), result.file_of_doc.tolist(), strict=True):
    writers[manifest_lib.SPLITS[held]].write(result.tokens[end - n : end])
    docs[unit.paths[f]][held] += 1
  for split, writer in writers.items():
    writer.lengths.append(result.lengths[is_eval == (split == "eval")])


def _check_splits(splits: dict, inputs: Sequence[str], skipped: dict, eval_inputs: Sequence[str], fraction: float):
  """A DataError unless there is training data, and held-out data wherever some was asked for."""
  if not splits:
    reasons = ", ".join(f"{n} {why}" for why, n in sorted(skipped.items()))
    raise DataError(f"no documents in {' '.join(inputs)}" + (f" (skipped: {reasons})" if reasons else ""))
  if "train" not in splits:
    raise DataError("every document went to the eval split; nothing is left to train on")
  if "eval" not in splits and eval_inputs:
    raise DataError(f"--eval-input {' '.join(eval_inputs)}: no documents in it")
  if "eval" not in splits and fraction > 0:
    raise DataError(f"--eval-fraction {fraction} held out none of the {splits['train'].documents} documents")


def _source(path: str, docs: list[int], held_out: bool) -> manifest_lib.SourceFile:
  split = "both" if all(docs) else "eval" if docs[1] or (held_out and not docs[0]) else "train"
  return manifest_lib.SourceFile(
    path=os.path.abspath(path), bytes=os.path.getsize(path), split=split, documents=sum(docs)
  )


def _lines_before(unit: _Unit) -> int:
  """Newlines in the unit's file before its first byte (only counted when reporting an error)."""
  count, left = 0, unit.start
  with open(unit.paths[0], "rb") as f:
    while left > 0:
      block = f.read(min(left, 1 << 20))
      count, left = count + block.count(b"\n"), left - len(block)
  return count


def _check_output(out: pathlib.Path, overwrite: bool, files: list[str]) -> None:
  if out.exists() and not out.is_dir():
    raise DataError(f"--output {out}: exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise DataError(f"--output {out}: exists and is not empty; pass --overwrite to replace it")
  inside = [p for p in files if pathlib.Path(os.path.realpath(p)).is_relative_to(os.path.realpath(out))]
  if inside:
    raise DataError(f"--output {out}: holds the input {inside[0]}, which would be replaced")


def _swap(tmp: pathlib.Path, out: pathlib.Path) -> None:
  """Moves the finished dataset at `tmp` to `out`, deleting what was there only afterwards."""
  old = out.with_name(f"{out.name}.old-{os.getpid()}")
  if out.exists():
    out.rename(old)
  tmp.rename(out)
  shutil.rmtree(old, ignore_errors=True)


def summary(manifest: manifest_lib.Manifest, output: str) -> str:
  """A few lines on what `prepare` wrote."""
  count = lambda n, what: f"{n:,} {what}" + "s" * (n != 1)
  lines = []
  for name, split in manifest.splits.items():
    counts = count(split.documents, "document"), count(split.tokens, "token"), count(len(split.shards), "shard")
    lines.append(f"{name}: {', '.join(counts)}")
  if manifest.skipped:
    lines.append("skipped: " + ", ".join(f"{n:,} {why}" for why, n in manifest.skipped.items()))
  tok = manifest.tokenizer
  lines.append(f"tokenizer: {tok.kind} (vocab {tok.vocab_size}, eos {tok.eos_id}); wrote {output}")
  return "\n".join(lines)


if __name__ == "__main__":
  from mtp_jax import cli

  sys.exit(cli.prepare_main())
