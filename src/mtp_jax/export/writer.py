"""The output directory: sharded safetensors with their index, JSON files, tokenizer files.

Everything is written into a hidden temporary directory beside DIR (`.DIR.incomplete-<pid>`)
and renamed to DIR only once complete, so an export cut short never leaves anything that looks
like a finished one. Shards follow the Hugging Face naming (`model-00001-of-00003.safetensors`
with `model.safetensors.index.json`); a shard is held in memory until its last tensor arrives,
then written, so memory stays near one shard plus the array being converted. Tensors a format
places in an extra file (`Tensor.file`, e.g. qwen3_moe's mtp.safetensors) are held until the end
and written whole beside the shards, outside the index, so Hugging Face loaders never see them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save_file

from mtp_jax.export import ExportError

INDEX = "model.safetensors.index.json"
_UMASK = os.umask(0o022)  # the process umask: read by setting it, then put back
os.umask(_UMASK)
MAX_SHARD_BYTES = 5 * 10**9  # what save_pretrained has long used; DeepSeek-V3's own shards are ~4.3 GB


def check_output(path: str, overwrite: bool) -> pathlib.Path:
  """The absolute output path, once it is known that it can be written."""
  final = pathlib.Path(path).expanduser().absolute()
  if final.exists() and not final.is_dir():
    raise ExportError(f"--output {path}: exists and is not a directory")
  if final.is_dir() and any(final.iterdir()) and not overwrite:
    raise ExportError(f"--output {path}: already exists and is not empty; pass --overwrite to replace it")
  if not final.parent.is_dir():
    problem = "is not a directory" if final.parent.exists() else "does not exist"
    raise ExportError(f"--output {path}: its parent {final.parent} {problem}")
  return final


@contextlib.contextmanager
def output_dir(path: str, overwrite: bool):
  """Yields a fresh temporary directory that becomes `path` when the block completes without
  an exception (replacing what was there with `overwrite`), and is removed otherwise."""
  final = check_output(path, overwrite)
  tmp = final.with_name(f".{final.name}.incomplete-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  try:
    tmp.mkdir()
  except OSError as err:
    raise ExportError(f"--output {path}: cannot write beside it ({err.strerror})") from None
  try:
    yield tmp
    old = final.with_name(f".{final.name}.replaced-{os.getpid()}")
    if final.exists():
      final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def plan_shards(sizes: list[int], max_bytes: int) -> list[int]:
  """Shard index of each tensor, in order: a shard closes before the tensor that would take
  it past `max_bytes` (a tensor larger than that gets a shard of its own)."""
  shard, used, out = 0, 0, []
  for size in sizes:
    if used and used + size > max_bytes:
      shard, used = shard + 1, 0
    out.append(shard)
    used += size
  return out


class ShardWriter:
  """Collects tensors in the planned order and writes each shard as soon as it is complete."""

  def __init__(self, directory: pathlib.Path, names: list[str], shard_of: list[int]):
    self.directory = directory
    total = shard_of[-1] + 1 if shard_of else 0
    self.files = [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    self.file_of = {n: self.files[s] for n, s in zip(names, shard_of, strict=True)}
    self._left = [shard_of.count(i) for i in range(total)]
    self._pending: dict[int, dict[str, np.ndarray]] = {}
    self._shard_of = dict(zip(names, shard_of, strict=True))
    self.bytes = 0

  def add(self, name: str, array: np.ndarray) -> None:
    s = self._shard_of[name]
    self._pending.setdefault(s, {})[name] = np.ascontiguousarray(array)
    self._left[s] -= 1
    if not self._left[s]:
      self.bytes += write_safetensors(self.directory / self.files[s], self._pending.pop(s))

  def write_index(self) -> None:
    if self._pending or any(self._left):
      raise AssertionError(f"shards left incomplete: {[self.files[s] for s, n in enumerate(self._left) if n]}")
    index = {"metadata": {"total_size": self.bytes}, "weight_map": dict(sorted(self.file_of.items()))}
    write_json(self.directory / INDEX, index)


def write_safetensors(path: pathlib.Path, tensors: dict[str, np.ndarray]) -> int:
  """Writes one safetensors file; returns its tensor bytes."""
  save_file(tensors, path, metadata={"format": "pt"})
  path.chmod(0o666 & ~_UMASK)  # safetensors creates its files private (0600); the rest of DIR is not
  return sum(t.nbytes for t in tensors.values())


def write_json(path: pathlib.Path, value: dict) -> None:
  path.write_text(json.dumps(value, indent=2) + "\n")


def write_tokenizer(directory: pathlib.Path, text: bytes, bos_id, eos_id: int, pad_id, max_length: int) -> None:
  """tokenizer.json (`text`: as the run used it) and a tokenizer_config.json naming its special
  tokens (documents were encoded without them and end in EOS; nothing is added to a prompt)."""
  from tokenizers import Tokenizer

  (directory / "tokenizer.json").write_bytes(text)
  tok = Tokenizer.from_str(text.decode())

  def token(i):
    return None if i is None else tok.id_to_token(i)

  write_json(
    directory / "tokenizer_config.json",
    {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": token(bos_id),
      "eos_token": token(eos_id),
      "pad_token": token(pad_id),
      "add_bos_token": False,
      "add_eos_token": False,
      "model_max_length": max_length,
      "clean_up_tokenization_spaces": False,
    },
  )
