"""Packing documents into fixed-length rows, planned from document lengths alone.

A plan says which tokens go where without reading them: a row is a list of pieces
`(k, start, stop)`, tokens [start, stop) of the k-th document of a source's stream (the
stream reads epoch e = k // N in its own permutation). Every host computes the same plan,
then reads only the documents of its own rows (data/pipeline.py).

`first_fit` (the default) keeps documents whole where it can. Each document is cut into
pieces of at most `seq_len` (piece j starts at token j * seq_len; only the last is short).
Pieces, in stream order, go to the first of up to `PACKING_BINS` open rows with room for
them. When a piece fits none and every bin is open, the bins are emitted as one group (in a
seeded order when shuffling) and a new group begins with that piece.

`concat` lays documents end to end and cuts at row ends: no padding but an unrepeated
stream's last row, at the price of splitting most documents. A continuation in the next
row is a new segment with positions from 0, as every piece is.

A position in the plan is (k, j): piece j of document k for first_fit, token j of it for
concat. A group is a pure function of the position it starts at, so a saved position
(where the current group began, and how many of its rows were taken) resumes exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PACKING_BINS = 64  # Rows first-fit fills at once; more bins: less padding, more memory.
MODES = ("first_fit", "concat")
BATCH_KEYS = ("tokens", "segment_ids", "positions")  # what a packed row (and a batch) holds, each int32

Piece = tuple[int, int, int]  # (document k of the stream, first token, one past the last)
Position = tuple[int, int]


class Planner:
  """Groups of rows of one source's stream, each from the position it starts at."""

  def __init__(
    self, length: Callable[[int], int], stream_len: int | None, *, seq_len: int, mode: str, seed: int, shuffle: bool
  ):
    if mode not in MODES:
      raise ValueError(f"unknown packing mode {mode!r}")
    self.length = length  # k -> tokens of the k-th document of the stream
    self.stream_len = stream_len  # documents in the stream; None: it repeats forever
    self.seq_len, self.mode, self.seed, self.shuffle = seq_len, mode, seed, shuffle

  def group(self, at: Position) -> tuple[list[list[Piece]], Position]:
    """The rows of the group starting at `at`, and where the next group starts. No rows:
    the stream has ended."""
    return self._first_fit(*at) if self.mode == "first_fit" else self._concat(*at)

  def _ended(self, k: int) -> bool:
    return self.stream_len is not None and k >= self.stream_len

  def _first_fit(self, k: int, j: int):
    rows: list[list[Piece]] = []
    free: list[int] = []
    first = (k, j)
    while not self._ended(k):
      n = self.length(k)
      start = j * self.seq_len
      size = min(self.seq_len, n - start)
      b = next((i for i, room in enumerate(free) if room >= size), len(rows))
      if b == len(rows):
        if b == PACKING_BINS:
          break
        rows.append([])
        free.append(self.seq_len)
      rows[b].append((k, start, start + size))
      free[b] -= size
      j += 1
      if j * self.seq_len >= n:
        k, j = k + 1, 0
    if self.shuffle and rows:
      order = np.random.default_rng([self.seed, *first]).permutation(len(rows))
      rows = [rows[i] for i in order]
    return rows, (k, j)

  def _concat(self, k: int, j: int):
    row: list[Piece] = []
    room = self.seq_len
    while room and not self._ended(k):
      n = self.length(k)
      take = min(room, n - j)
      row.append((k, j, j + take))
      room -= take
      j += take
      if j >= n:
        k, j = k + 1, 0
    return ([row] if row else []), (k, j)


def fill(pieces: list[np.ndarray], seq_len: int, out: dict[str, np.ndarray]) -> None:
  """Writes one row from its pieces' tokens into `out`'s zeroed int32 rows: segment ids 1, 2,
  ... per piece (0, with token 0, is padding), positions from 0 within each piece."""
  at = 0
  for i, tokens in enumerate(pieces, 1):
    n = len(tokens)
    out["tokens"][at : at + n] = tokens
    out["segment_ids"][at : at + n] = i
    out["positions"][at : at + n] = np.arange(n, dtype=np.int32)
    at += n
  assert at <= seq_len, (at, seq_len)
