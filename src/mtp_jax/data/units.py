"""The inputs of `mtp-prepare` as work units, and one unit's documents as token ids.

`plan` cuts the input files into units of about CHUNK_BYTES: big JSONL files into byte ranges
that begin at a line start, Parquet files into row groups, runs of small text files into
batches. `Tokenize` reads one unit (in a worker process) and returns its documents' ids, lengths
and text hashes, and what it skipped; prepare.py runs the pool and writes the shards.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import itertools
import json
import os
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mtp_jax.data import manifest as manifest_lib
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.data.manifest import DataError
from mtp_jax.errors import first_line

CHUNK_BYTES = 32 << 20  # work-unit size: a JSONL byte range, or a batch of small text files
TEXT_BATCH_FILES = 1024  # at most this many text files per work unit
_ENCODE_BATCH = 1024  # documents per tokenizer call
_BINARY_PROBE = 8192  # a NUL in a text file's first bytes marks it binary


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of work: a JSONL byte range, a Parquet row group, or a batch of text files."""

  kind: str  # "jsonl", "jsonl.gz", "parquet" or "text"
  paths: tuple[str, ...]  # several only for a batch of text files
  start: int = 0  # JSONL: first byte; Parquet: row group
  end: int = 0  # JSONL: one past the last byte
  nbytes: int = 0  # input bytes, for the progress bar


@dataclasses.dataclass
class Result:
  """A unit's documents: ids + EOS concatenated, their lengths and text hashes, what was skipped."""

  tokens: np.ndarray
  lengths: np.ndarray  # int64 per document
  hashes: np.ndarray  # uint64 per document
  file_of_doc: np.ndarray  # index into the unit's paths, per document
  skipped: collections.Counter
  error: tuple[int, str] | None = None  # JSONL: (line within the unit, message)


class LineError(Exception):
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


def plan(files: list[str], text_field: str, chunk_bytes: int) -> list[Unit]:
  """Work units for `files`, in order; checks each Parquet file's column up front."""
  units: list[Unit] = []
  for path in files:
    kind, size = _kind(path), os.path.getsize(path)
    if kind == "jsonl":
      bounds = _line_aligned_bounds(path, size, chunk_bytes)
      units += [Unit(kind, (path,), a, b, b - a) for a, b in itertools.pairwise(bounds)]
    elif kind == "jsonl.gz":
      units.append(Unit(kind, (path,), nbytes=size))
    elif kind == "parquet":
      rows = _parquet_rows(path, text_field)
      units += [Unit(kind, (path,), g, nbytes=size * n // max(sum(rows), 1)) for g, n in enumerate(rows)]
    else:
      last = units[-1] if units else None
      if last and last.kind == "text" and last.nbytes + size <= chunk_bytes and len(last.paths) < TEXT_BATCH_FILES:
        units[-1] = dataclasses.replace(last, paths=(*last.paths, path), nbytes=last.nbytes + size)
      else:
        units.append(Unit(kind, (path,), nbytes=size))
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
    raise DataError(f"{path}: not a readable Parquet file ({first_line(err)})") from None
  schema = meta.schema_arrow
  if column not in schema.names:
    raise DataError(f"{path}: no column {column!r} (columns: {', '.join(schema.names)}); choose one with --text-field")
  kind = schema.field(column).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise DataError(f"{path}: column {column!r} holds {kind}, not strings")
  return [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]


class Tokenize:
  """Turns a work unit into a Result; one per process."""

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, text_field: str, strict: bool, seed: int):
    self.tokenizer, self.text_field, self.strict = tokenizer, text_field, strict
    self.dtype = np.dtype(manifest_lib.token_dtype(tokenizer.vocab_size))
    self.key = str(seed).encode()

  def __call__(self, unit: Unit) -> Result:
    self.texts, self.ids, self.hashes, self.skipped = [], [], [], collections.Counter()
    per_file = []
    try:
      for path in unit.paths:
        before = len(self.hashes)
        self._read(unit, path)
        per_file.append(len(self.hashes) - before)
    except LineError as err:
      none = np.zeros(0, np.int64)
      return Result(none, none, none, none, self.skipped, (err.line, err.message))
    except (OSError, EOFError, zlib.error, pa.ArrowException) as err:
      raise DataError(f"{path}: cannot read ({first_line(err)})") from None
    self._encode()
    eos = np.array([self.tokenizer.eos_id], np.int32)
    tokens = np.concatenate([a for ids in self.ids for a in (ids, eos)] or [eos[:0]])
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.tokenizer.vocab_size):
      raise DataError(f"{path}: the tokenizer made id {tokens.max()}, outside its vocabulary")
    return Result(
      tokens=tokens.astype(self.dtype),
      lengths=np.array([len(ids) + 1 for ids in self.ids], np.int64),
      hashes=np.array(self.hashes, np.uint64),
      file_of_doc=np.repeat(np.arange(len(per_file)), per_file),
      skipped=self.skipped,
    )

  def _read(self, unit: Unit, path: str) -> None:
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
          raise LineError(number, f"not valid JSON ({first_line(err)})") from None
        self.skipped["invalid_json"] += 1
        continue
      if not isinstance(record, dict):
        if self.strict:
          raise LineError(number, f"a JSON {_json_type(record)}, not an object")
        self.skipped["invalid_json"] += 1
        continue
      if self.text_field not in record:
        fields = ", ".join(record) or "none"
        raise LineError(number, f"no field {self.text_field!r} (fields: {fields}); choose one with --text-field")
      text = record[self.text_field]
      if not isinstance(text, str):
        raise LineError(number, f"field {self.text_field!r} is a JSON {_json_type(text)}, not a string")
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
