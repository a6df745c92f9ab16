"""Tokenizers: text <-> int32 token ids.

Code that needs a tokenizer takes a `Tokenizer` (anything with `vocab_size`,
`eos_id`, `encode`, `decode`). `ByteTokenizer` needs no file; `load()` also
opens a Hugging Face `tokenizer.json` or a SentencePiece `.model`, and `info()`
describes one for a dataset manifest.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Protocol

import numpy as np

from mtp_jax.data.manifest import DataError, TokenizerInfo
from mtp_jax.errors import first_line

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
EOS_TOKEN = "<|endoftext|>"  # how a Hugging Face tokenizer of ours spells EOS_ID


def byte_level_json() -> str:
  """`ByteTokenizer` as a Hugging Face tokenizer.json: each UTF-8 byte is the token whose id is
  its value (spelled in GPT-2's byte-level alphabet, as the `ByteLevel` pre-tokenizer and decoder
  spell bytes), no merges, and EOS_ID the special token EOS_TOKEN."""
  from tokenizers import AddedToken, decoders, models, pre_tokenizers
  from tokenizers import Tokenizer as HFTokenizer

  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
  others = [b for b in range(256) if b not in printable]
  spelled = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
  tok = HFTokenizer(models.BPE(vocab={spelled[b]: b for b in range(256)}, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
  assert tok.token_to_id(EOS_TOKEN) == EOS_ID
  return tok.to_str()


def encode(text: str) -> np.ndarray:
  """UTF-8 bytes of `text` as int32 token ids, without EOS."""
  return BYTE_TOKENIZER.encode(text)


def decode(ids: Iterable[int]) -> str:
  """Text for byte-level `ids`; ids >= 256 (EOS, padding beyond bytes) are skipped."""
  return BYTE_TOKENIZER.decode(ids)


# Tried in order when a Hugging Face tokenizer's end-of-document token is not named.
HF_EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<eos>", "<|eot_id|>")
HF_BOS_TOKENS = ("<|begin_of_text|>", "<s>", "<｜begin▁of▁sentence｜>", "<bos>", "<|startoftext|>")
HF_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]")


class HuggingFaceTokenizer:
  """A Hugging Face `tokenizer.json`; pickles as its path, so worker processes reload it."""

  kind = "huggingface"

  def __init__(self, path: str, eos_token: str | None = None):
    from tokenizers import Tokenizer as HFTokenizer

    self.path, self.eos_token = os.path.abspath(path), eos_token
    try:
      self._tok = HFTokenizer.from_file(self.path)
    except Exception as err:  # tokenizers raises a bare Exception
      raise DataError(f"{path}: not a Hugging Face tokenizer.json ({first_line(err)})") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    names = HF_EOS_TOKENS if eos_token is None else (eos_token,)
    self.eos_id = _first_id(self._tok.token_to_id, names)
    if self.eos_id is None:
      if eos_token is not None:
        raise DataError(f"{path}: --eos-token {eos_token!r} is not in the tokenizer's vocabulary")
      raise DataError(f"{path}: none of {', '.join(HF_EOS_TOKENS)} is in the vocabulary; name one with --eos-token")
    self.bos_id = _first_id(self._tok.token_to_id, HF_BOS_TOKENS)
    padding = self._tok.padding
    self.pad_id = padding["pad_id"] if padding else _first_id(self._tok.token_to_id, HF_PAD_TOKENS)

  def __reduce__(self):
    return type(self), (self.path, self.eos_token)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer:
  """A SentencePiece `.model`; pickles as its path, so worker processes reload it."""

  kind = "sentencepiece"

  def __init__(self, path: str, eos_token: str | None = None):
    import sentencepiece

    self.path, self.eos_token = os.path.abspath(path), eos_token
    self.num_threads = -1  # encode_batch threads; -1: all cores (set 1 inside a worker pool)
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
    except (OSError, RuntimeError) as err:
      raise DataError(f"{path}: not a SentencePiece model ({first_line(err)})") from None
    self.vocab_size = self._sp.get_piece_size()
    if eos_token is None:
      self.eos_id = self._sp.eos_id()
      if self.eos_id < 0:
        raise DataError(f"{path}: the SentencePiece model has no end-of-sentence id; name a piece with --eos-token")
    else:
      self.eos_id = self._sp.piece_to_id(eos_token)
      if self._sp.id_to_piece(self.eos_id) != eos_token:  # unknown pieces map to unk
        raise DataError(f"{path}: --eos-token {eos_token!r} is not a piece of the SentencePiece model")
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else None

  def __reduce__(self):
    return type(self), (self.path, self.eos_token)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

  def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
    return [
      np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(texts, out_type=int, num_threads=self.num_threads)
    ]

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def load(spec: str, eos_token: str | None = None) -> Tokenizer:
  """`bytes`, a Hugging Face `*.json` or a SentencePiece `*.model`; a DataError if it cannot be used."""
  if spec == "bytes":
    if eos_token is not None:
      raise DataError("--eos-token does not apply to the byte tokenizer (its end-of-document id is 256)")
    return BYTE_TOKENIZER
  if spec.endswith(".json"):
    return HuggingFaceTokenizer(spec, eos_token)
  if spec.endswith(".model"):
    return SentencePieceTokenizer(spec, eos_token)
  raise DataError(f"--tokenizer {spec}: expected 'bytes', a Hugging Face tokenizer.json or a SentencePiece .model")


def info(tokenizer: Tokenizer) -> TokenizerInfo:
  """What the manifest records about `tokenizer`: kind, file, its sha256, vocabulary and special ids."""
  if isinstance(tokenizer, ByteTokenizer):
    return TokenizerInfo(kind="bytes", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id)
  digest = hashlib.sha256()
  with open(tokenizer.path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return TokenizerInfo(
    kind=tokenizer.kind,
    path=tokenizer.path,
    sha256=digest.hexdigest(),
    vocab_size=tokenizer.vocab_size,
    eos_id=tokenizer.eos_id,
    bos_id=tokenizer.bos_id,
    pad_id=tokenizer.pad_id,
  )


def _first_id(token_to_id, names: Iterable[str]) -> int | None:
  return next((i for i in map(token_to_id, names) if i is not None), None)
