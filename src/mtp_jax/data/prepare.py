"""`mtp-prepare`: text files -> token-id ArrayRecord shards + manifest (the format in manifest.py).

1. Expand the inputs (files, directories walked recursively, globs) into a sorted file list.
   A file's kind comes from its name: JSON Lines (`.jsonl`, `.json`, either `.gz`), Parquet
   (`.parquet`), or plain text (anything else; one file = one document).
2. Cut the files into work units of about CHUNK_BYTES (units.py): big JSONL files into byte ranges that
   begin at a line start, Parquet files into row groups, runs of small text files into batches.
3. Tokenize the units (units.Tokenize) in a pool of spawned worker processes, each loading the tokenizer from
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
import datetime
import glob
import multiprocessing
import os
import pathlib
import shutil
import signal
import sys
from collections.abc import Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

import mtp_jax
from mtp_jax.data import manifest as manifest_lib
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.data.manifest import DataError
from mtp_jax.data.units import CHUNK_BYTES, Result, Tokenize, Unit, plan
from mtp_jax.errors import RunError

SHARD_TOKENS = 1 << 28  # a new shard once the current one holds this many tokens


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


_worker: Tokenize | None = None


def _start_worker(spec: str, eos_token: str | None, text_field: str, strict: bool, seed: int) -> None:
  global _worker
  signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and ends the pool
  os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallel across processes already
  tokenizer = tokenizer_lib.load(spec, eos_token)
  if hasattr(tokenizer, "num_threads"):
    tokenizer.num_threads = 1
  _worker = Tokenize(tokenizer, text_field, strict, seed)


def _run(unit: Unit) -> Result:
  return _worker(unit)


def _results(units: list[Unit], workers: int, tokenize: Tokenize, init_args: tuple):
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


def _finished(unit: Unit, future: concurrent.futures.Future) -> tuple[Unit, Result]:
  try:
    return unit, future.result()
  except concurrent.futures.BrokenExecutor:
    # Every unit in flight fails with the pool, so this one need not be the one that killed it.
    raise RunError(
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
  units = plan(files, text_field, chunk_bytes)
  dtype = manifest_lib.token_dtype(tok.vocab_size)
  threshold = np.uint64(min(int(eval_fraction * 2**64), 2**64 - 1))  # held out: text hash < threshold

  tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir(parents=True)
  except OSError as err:  # e.g. a parent that is a file, no permission there
    raise DataError(f"--output {out}: cannot make it: {err.strerror}") from None
  try:
    writers = {s: _SplitWriter(tmp, s, dtype, shard_tokens) for s in manifest_lib.SPLITS}
    docs = {p: [0, 0] for p in files}  # path -> documents in [train, eval]
    skipped = collections.Counter()
    bar = tqdm(total=sum(u.nbytes for u in units), unit="B", unit_scale=True, disable=not progress, file=sys.stderr)
    tokenize = Tokenize(tok, text_field, strict, seed)
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


def _route(unit: Unit, result: Result, is_eval: np.ndarray, writers: dict, docs: dict) -> None:
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


def _lines_before(unit: Unit) -> int:
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
