"""The on-disk format of a prepared dataset (written by `mtp-prepare`, read by training).

    DIR/manifest.json
    DIR/train/shard-00000.arrayrecord ...   one record per document
    DIR/train/lengths.npy                   int64 tokens per document, in shard order
    DIR/eval/...                            the held-out split, when there is one

A record is one document's token ids, end-of-document id included, as raw
little-endian integers of `token_dtype` (uint16 when the vocabulary fits, else
uint32). The manifest says which tokenizer made them, so training can refuse a
model whose vocabulary or special ids disagree before reading a single shard.
"""

from __future__ import annotations

import json
import pathlib
from typing import Literal

import numpy as np
import pydantic

from mtp_jax.errors import InputError

MANIFEST = "manifest.json"
FORMAT = "mtp-jax-prepared"
VERSION = 1
SPLITS = ("train", "eval")


class DataError(InputError):
  """Data that cannot be used, as one line naming the file and what is wrong."""

  label = "data error: "


class _Strict(pydantic.BaseModel):
  model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class TokenizerInfo(_Strict):
  kind: Literal["bytes", "huggingface", "sentencepiece"]
  path: str | None = None  # the file it was loaded from (None for bytes)
  sha256: str | None = None  # identity: the hash of that file
  vocab_size: int = pydantic.Field(ge=1)
  eos_id: int = pydantic.Field(ge=0)
  bos_id: int | None = None
  pad_id: int | None = None

  @property
  def identity(self) -> str:
    return self.kind if self.kind == "bytes" else f"{self.kind}:{self.sha256}"


class Shard(_Strict):
  path: str  # relative to the dataset directory
  documents: int = pydantic.Field(ge=0)
  tokens: int = pydantic.Field(ge=0)


class Split(_Strict):
  documents: int = pydantic.Field(ge=0)
  tokens: int = pydantic.Field(ge=0)
  max_document_tokens: int = pydantic.Field(0, ge=0)
  shards: list[Shard]
  lengths: str  # relative path of the int64 .npy of per-document lengths


class SourceFile(_Strict):
  path: str
  bytes: int = pydantic.Field(ge=0)
  split: Literal["train", "eval", "both"]
  documents: int = pydantic.Field(ge=0)


class Manifest(_Strict):
  format: Literal["mtp-jax-prepared"] = FORMAT
  version: int = VERSION
  tokenizer: TokenizerInfo
  token_dtype: Literal["uint16", "uint32"]
  text_field: str | None = None
  eval_fraction: float = 0.0
  splits: dict[Literal["train", "eval"], Split]
  sources: list[SourceFile]
  skipped: dict[str, int] = {}  # reason -> documents or lines left out (invalid_json, empty, binary, ...)
  created: str = ""
  mtp_jax_version: str = ""

  def write(self, directory: str | pathlib.Path) -> None:
    """Writes manifest.json last, through a rename: a directory with a manifest is complete."""
    directory = pathlib.Path(directory)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(self.model_dump_json(indent=2) + "\n")
    tmp.replace(directory / MANIFEST)


def token_dtype(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 2**16 else "uint32"


def encode_record(ids: np.ndarray, dtype: str) -> bytes:
  return np.asarray(ids).astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()


def decode_record(record: bytes, dtype: str) -> np.ndarray:
  return np.frombuffer(record, dtype=np.dtype(dtype).newbyteorder("<")).astype(np.int32)


def read(directory: str | pathlib.Path) -> Manifest:
  """The manifest of a prepared dataset, or a DataError saying why there is none."""
  directory = pathlib.Path(directory)
  path = directory / MANIFEST
  if not directory.exists():
    raise DataError(f"{directory}: no such directory")
  if not path.is_file():
    raise DataError(f"{directory}: no {MANIFEST}; is it a dataset made by mtp-prepare (and did it finish)?")
  try:
    raw = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
    raise DataError(f"{path}: not readable JSON ({err})") from None
  if not isinstance(raw, dict) or raw.get("format") != FORMAT:
    raise DataError(f"{path}: not an mtp-prepare manifest (format is not {FORMAT!r})")
  if raw.get("version") != VERSION:
    raise DataError(f"{path}: format version {raw.get('version')!r}; this mtp-jax reads version {VERSION}")
  try:
    return Manifest.model_validate(raw)
  except pydantic.ValidationError as err:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    raise DataError(f"{path}: {where}: {first['msg']}") from None


def shard_paths(directory: str | pathlib.Path, manifest: Manifest, split: str) -> list[str]:
  """Absolute shard paths of `split`, each checked to exist."""
  directory = pathlib.Path(directory)
  if split not in manifest.splits:
    raise DataError(f"{directory}: has no {split!r} split (splits: {', '.join(manifest.splits)})")
  paths = []
  for shard in manifest.splits[split].shards:
    path = directory / shard.path
    if not path.is_file():
      raise DataError(f"{path}: shard listed in {directory / MANIFEST} is missing")
    paths.append(str(path.absolute()))
  return paths


def lengths(directory: str | pathlib.Path, manifest: Manifest, split: str) -> np.ndarray:
  """Tokens per document of `split` (EOS included), in record order."""
  path = pathlib.Path(directory) / manifest.splits[split].lengths
  try:
    out = np.load(path)
  except (OSError, ValueError) as err:
    raise DataError(f"{path}: cannot read document lengths ({err})") from None
  if out.shape != (manifest.splits[split].documents,):
    raise DataError(f"{path}: {out.shape[0]} lengths for {manifest.splits[split].documents} documents")
  return out
