"""Packing variable-length documents into fixed-length rows, two ways.

`first_fit` (the default) keeps documents whole where it can. Concatenating splits
*every* document that crosses a row boundary, short ones included. Grain's
`FirstFitPackIterDataset` never splits, and raises on a document longer than the
row. So we cut each document into pieces of at most `seq_len` first (piece k
starts at token k * seq_len; only the last piece is short), and let first-fit
place the pieces. Each piece is its own segment with positions from 0.

`concat` is Grain's `ConcatThenSplitIterDataset`: documents laid end to end and cut
at row boundaries. No padding but the last row's, at the price of splitting most
documents; the continuation in the next row is a new segment with positions from 0.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

PACKING_BINS = 64  # Rows first-fit fills at once; more bins: less padding, more memory.


class _SplitLong(grain.experimental.FlatMapTransform):
  """Document -> consecutive pieces of at most `seq_len` tokens."""

  def __init__(self, seq_len: int):
    self.seq_len = seq_len

  def flat_map(self, element: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [{"tokens": element[i : i + self.seq_len]} for i in range(0, len(element), self.seq_len)]


def _as_features(doc: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": doc}


def _rename(row: dict[str, Any]) -> dict[str, np.ndarray]:
  return {
    "tokens": row["tokens"],
    "segment_ids": row["tokens_segment_ids"],
    "positions": row["tokens_positions"],
  }


def pack(
  docs: grain.IterDataset, *, seq_len: int, seed: int, shuffle_rows: bool, mode: str = "first_fit"
) -> grain.IterDataset:
  """1-D int32 documents -> rows `{"tokens", "segment_ids", "positions"}` of length `seq_len`.

  Segment ids number the pieces of a row 1, 2, ...; 0 (with token 0) is padding.
  first_fit's `shuffle_rows` permutes each group of `PACKING_BINS` rows, mixing
  pieces of neighbouring documents across batches.
  """
  if mode == "concat":
    tokens = docs.map(_as_features)
    return grain.experimental.ConcatThenSplitIterDataset(tokens, length_struct={"tokens": seq_len}).map(_rename)
  if mode != "first_fit":
    raise ValueError(f"unknown packing mode {mode!r}")
  pieces = grain.experimental.FlatMapIterDataset(docs, _SplitLong(seq_len))
  packed = grain.experimental.FirstFitPackIterDataset(
    pieces,
    length_struct={"tokens": seq_len},
    num_packing_bins=PACKING_BINS,
    seed=seed,
    shuffle_bins=shuffle_rows,
  )
  return packed.map(_rename)
