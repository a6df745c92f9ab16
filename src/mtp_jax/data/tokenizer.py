"""Tokenizers: text <-> int32 token ids.

Only the byte-level tokenizer exists today. Code that needs a tokenizer takes a
`Tokenizer` (anything with `vocab_size`, `eos_id`, `encode`, `decode`), so a
subword tokenizer can be added beside `ByteTokenizer` without touching callers.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import numpy as np

EOS_ID = 256  # Appended after every document; one past the largest byte.
VOCAB_SIZE_MIN = 257  # Smallest model.vocab_size that covers bytes + EOS.


class Tokenizer(Protocol):
  """What the data pipeline needs from a tokenizer."""

  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> np.ndarray:
    """Token ids (int32, 1-D) for `text`, without EOS."""
    ...

  def decode(self, ids: Iterable[int]) -> str:
    """Text for `ids`; special ids are dropped."""
    ...


class ByteTokenizer:
  """Token id = UTF-8 byte value (0..255); EOS_ID marks the end of a document."""

  vocab_size = VOCAB_SIZE_MIN
  eos_id = EOS_ID

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=np.int64).reshape(-1)
    data = ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()
    return data.decode("utf-8", errors="replace")


BYTE_TOKENIZER = ByteTokenizer()


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as int32 token ids, without EOS."""
  return BYTE_TOKENIZER.encode(text)


def decode(ids: Iterable[int]) -> str:
  """Text for byte-level `ids`; ids >= 256 (EOS, padding beyond bytes) are skipped."""
  return BYTE_TOKENIZER.decode(ids)
