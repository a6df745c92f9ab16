"""The `stdlib` corpus: the running interpreter's own standard-library sources.

Always present, so training needs no download. A document is one `.py` file.
Skipped: third-party code (`site-packages`, `dist-packages`), caches, empty files
and the test suites (`test/`, `tests/`, `idle_test/`): those hold deliberately
malformed or oddly encoded sources and large data blobs, and would more than
double the corpus with text unlike ordinary library code.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig

import numpy as np

from mtp_jax.data import tokenizer as tokenizer_lib

_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


def stdlib_dir() -> str:
  """Directory holding the running interpreter's standard library."""
  return sysconfig.get_paths()["stdlib"]


def list_files(root: str | None = None, max_documents: int = 0) -> list[str]:
  """Sorted absolute paths of the corpus' `.py` files (the first `max_documents`, 0: all)."""
  root = root or stdlib_dir()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
    for name in filenames:
      path = os.path.join(dirpath, name)
      if name.endswith(".py") and os.path.isfile(path) and os.path.getsize(path) > 0:
        found.append(os.path.relpath(path, root))
  # Sort on the relative path split into parts: the same order on every machine.
  found.sort(key=lambda rel: rel.split(os.sep))
  if max_documents:
    found = found[:max_documents]
  return [os.path.join(root, rel) for rel in found]


EVAL_ONE_IN = 50  # the held-out split: files whose path hashes to 0 mod this


def split_files(split: str, root: str | None = None, max_documents: int = 0) -> list[str]:
  """The `train` or `eval` files (the first `max_documents`, 0: all).

  A file is held out by a hash of its path relative to the library, so the split is
  the same on every machine and does not move when max_documents changes.
  """
  root = root or stdlib_dir()

  def held_out(path: str) -> bool:
    rel = os.path.relpath(path, root).replace(os.sep, "/").encode()
    return int.from_bytes(hashlib.blake2b(rel, digest_size=8).digest(), "little") % EVAL_ONE_IN == 0

  found = [p for p in list_files(root) if held_out(p) == (split == "eval")]
  return found[:max_documents] if max_documents else found


def read_text(path: str) -> str:
  """The file as text: UTF-8, bad bytes replaced, line endings untouched."""
  with open(path, "rb") as f:
    return f.read().decode("utf-8", errors="replace")


class DocumentSource:
  """Random-access grain source: index -> token ids of one file + EOS (int32).

  Files are read and encoded on access, never up front.
  """

  def __init__(self, paths: list[str], tokenizer: tokenizer_lib.Tokenizer = tokenizer_lib.BYTE_TOKENIZER):
    self._paths = list(paths)
    self._tokenizer = tokenizer

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> np.ndarray:
    ids = self._tokenizer.encode(read_text(self._paths[index]))
    return np.append(ids, np.int32(self._tokenizer.eos_id)).astype(np.int32, copy=False)

  def __repr__(self) -> str:
    return f"DocumentSource({len(self._paths)} files)"
