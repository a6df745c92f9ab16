"""What is exported: a checkpoint step, the config its run recorded, its tokenizer, its arrays.

`--checkpoint` names a run's workdir (its latest complete step), its `checkpoints/` directory,
or one step's directory, on local disk or in a bucket (`gs://...`). The model settings come from
`config.yaml`, which `mtp-train` writes into the workdir, two levels above a step. Arrays are
read by name with Orbax partial restores of the train state item (a few small ones together, a
large one alone, each checked against the checksum `Checkpointer` saved with it), straight into
host memory: a sharded checkpoint written by many hosts is read by one process that never holds
more than about the largest parameter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx

from mtp_jax import config as config_lib
from mtp_jax import storage
from mtp_jax.config import STDLIB, Config
from mtp_jax.data import manifest as manifest_lib
from mtp_jax.data.manifest import DataError, TokenizerInfo
from mtp_jax.data.tokenizer import EOS_ID, VOCAB_SIZE_MIN, byte_level_json
from mtp_jax.export import ExportError
from mtp_jax.model import Transformer
from mtp_jax.model.moe import RouterBias

# _QUIET and _root_cause: the one-line reporting of Orbax failures that restoring uses too.
from mtp_jax.train.checkpoint import _QUIET, Checkpointer, _root_cause, named_leaves, slice_checksum

CONFIG_FILE = "config.yaml"  # written by mtp-train into its workdir


@dataclasses.dataclass(frozen=True)
class Source:
  directory: epath.Path  # the run's checkpoints/ directory, local or in a bucket
  step: int
  config: Config  # as the run recorded it

  @property
  def step_dir(self) -> epath.Path:
    return self.directory / str(self.step)


def locate(spec: str) -> Source:
  """`--checkpoint` -> the step to export and the config of its run."""
  key = f"--checkpoint {spec}"
  path = storage.path(spec)
  run_dir = (path / "checkpoints").is_dir()
  if run_dir:
    path = path / "checkpoints"
  if not run_dir and path.name.isdigit() and path.parent.is_dir() and _holds_steps(path.parent):
    directory, step = path.parent, int(path.name)
    steps = _complete_steps(directory)
    if step not in steps:
      there = f"steps there: {', '.join(map(str, steps))}" if steps else "it holds no complete checkpoint"
      what = "not a complete checkpoint (a save cut short or still in flight?)" if path.exists() else "no such step"
      raise ExportError(f"{key}: {what}; {there}")
  elif not path.exists():
    raise ExportError(f"{key}: no such file or directory")
  elif run_dir or (path.is_dir() and _holds_steps(path)):
    steps = _complete_steps(path)
    if not steps:
      raise ExportError(f"{key}: holds no complete checkpoint")
    directory, step = path, steps[-1]
  else:
    raise ExportError(f"{key}: not a checkpoint (give a run's workdir, its checkpoints/ or one step's directory)")
  return Source(directory, step, _run_config(directory.parent, key))


def _holds_steps(directory: epath.Path) -> bool:
  return any(p.name.isdigit() and p.is_dir() for p in directory.iterdir())


def _complete_steps(directory: epath.Path) -> list[int]:
  ckpt = Checkpointer(directory, read_only=True)
  try:
    return ckpt.steps()
  finally:
    ckpt.close()


def _run_config(workdir: epath.Path, key: str) -> Config:
  path = workdir / CONFIG_FILE
  if not path.is_file():
    raise ExportError(f"{key}: no {path}: the model settings are read from the config.yaml mtp-train writes there")
  try:
    return config_lib.load(path)
  except config_lib.ConfigError as err:
    raise ExportError(f"{path}: {err}") from None


def abstract_leaves(cfg: Config) -> dict[str, jax.ShapeDtypeStruct]:
  """Every array a checkpoint of this model holds besides the optimizer state, by train-state
  name (`params.…`, `router_bias.…`), with its shape and dtype; nothing is allocated."""
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  _, params, bias = nnx.split(model, nnx.Param, RouterBias)
  return named_leaves({"params": params, "router_bias": bias})


class _Mismatch(Exception):
  """An array that reads back different from what was saved."""


class Reader:
  """Reads arrays of one checkpoint step by name into host memory, one at a time, each checked
  against the checksum saved with it. The saved names and shapes are checked up front, so a
  checkpoint that does not fit its config fails before anything is written."""

  def __init__(self, source: Source, leaves: dict[str, jax.ShapeDtypeStruct]):
    self.source, self.leaves = source, leaves
    self._state_dir = source.step_dir / "state"  # the train state item of the step
    self._orbax = ocp.PyTreeCheckpointHandler()
    self._stores: dict[str, ts.TensorStore] = {}  # stacks being read block by block
    self._blocks: dict[str, tuple[set[int], int]] = {}  # ... their blocks read so far and checksum terms
    try:
      self._check_fits()
    except BaseException:
      self.close()
      raise

  def _check_fits(self) -> None:
    source, ckpt = self.source, Checkpointer(self.source.directory, read_only=True)
    try:
      with _QUIET:
        saved = named_leaves(self._orbax.metadata(self._state_dir).tree)
        self._checksums = ckpt.run_record(source.step)["checksums"]
    except Exception as err:  # storage layers raise anything; the user needs one line
      raise self._damaged(err) from None
    finally:
      ckpt.close()
    config = source.directory.parent / CONFIG_FILE
    for name, want in self.leaves.items():
      if name not in saved:
        raise ExportError(f"checkpoint {source.step_dir} has no {name}, which its run's {config} implies")
      if tuple(saved[name].shape) != tuple(want.shape):
        raise ExportError(
          f"checkpoint {source.step_dir} does not fit its run's {config}: {name} has shape "
          f"{tuple(saved[name].shape)} there, {tuple(want.shape)} by the config"
        )

  def read(self, pieces: list[tuple[str, int | None]]) -> dict[tuple[str, int | None], np.ndarray]:
    """The named pieces: (name, None) a whole array, (name, j) block j of a stack. Whole arrays
    come in one Orbax restore (each call rereads the checkpoint's tree metadata, so reading
    small arrays together saves time); blocks straight from their chunks, a stack's checksum
    checked once all its blocks have been read. Memory is what the caller asks for."""
    out = self._read_whole([name for name, j in pieces if j is None])
    try:
      for name, j in pieces:
        if j is not None:
          out[name, j] = self._read_block(name, j)
    except Exception as err:  # storage layers raise anything; the user needs one line
      raise self._damaged(err) from None
    return out

  def _read_whole(self, names: list[str]) -> dict[tuple[str, None], np.ndarray]:
    if not names:
      return {}
    item, restore_args = {}, {}
    for name in names:
      *parents, last = name.split(".")
      node, args = item, restore_args
      for part in parents:
        node, args = node.setdefault(part, {}), args.setdefault(part, {})
      node[last] = {"value": 0}  # nnx Variables are saved as {"value": array}
      args[last] = {"value": ocp.RestoreArgs(restore_type=np.ndarray)}
    try:
      with _QUIET:
        out = self._orbax.restore(
          self._state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )
      arrays = named_leaves(out)
      for name in names:
        if slice_checksum(arrays[name]) != self._checksums.get(name):
          raise _Mismatch(f"{name} does not match its checksum")
    except Exception as err:  # storage layers raise anything; the user needs one line
      raise self._damaged(err) from None
    return {(name, None): arrays[name] for name in names}

  def _read_block(self, name: str, j: int) -> np.ndarray:
    if name not in self._stores:
      self._stores[name] = _open_array(self._state_dir, f"{name}.value")
      self._blocks[name] = (set(), 0)
    block = np.asarray(self._stores[name][j].read().result())
    done, total = self._blocks[name]
    done.add(j)
    total = (total + slice_checksum(block, j * block.size)) % 2**32
    self._blocks[name] = (done, total)
    if len(done) == self.leaves[name].shape[0]:
      del self._stores[name]
      if total != self._checksums.get(name):
        raise _Mismatch(f"{name} does not match its checksum")
    return block

  def close(self) -> None:
    self._orbax.close()

  def _damaged(self, err: Exception) -> ExportError:
    why = str(err) if isinstance(err, _Mismatch) else _root_cause(err)
    return ExportError(
      f"checkpoint {self.source.step_dir} is damaged ({why}); export an earlier step by naming its directory"
    )


def _open_array(directory: epath.Path, name: str) -> ts.TensorStore:
  """One array of an Orbax PyTree item, opened with TensorStore for reads of any slice: zarr
  in an OCDBT database (Orbax's default), or zarr3, or either as plain files."""
  base = str(directory) if "://" in str(directory) else f"file://{directory}"
  kvstores = [{"driver": "ocdbt", "base": f"{base}/", "path": f"{name}/"}, f"{base}/{name}/"]
  errors = []
  for kvstore in kvstores:
    for driver in ("zarr", "zarr3"):
      try:
        return ts.open({"driver": driver, "kvstore": kvstore}, open=True, read=True).result()
      except ValueError as err:
        errors.append(err)
  raise errors[0]


def read_groups(pieces: list[tuple[str, int | None]], leaves: dict[str, jax.ShapeDtypeStruct], max_bytes: int):
  """Consecutive pieces ((name, None) an array, (name, j) block j of a stack) grouped while they
  fit in `max_bytes` together: each `Reader.read` rereads the tree metadata, so small arrays are
  read together, and host memory holds about `max_bytes` (or the largest piece) at a time."""
  groups, used = [], 0
  for name, j in pieces:
    shape = leaves[name].shape if j is None else leaves[name].shape[1:]
    size = math.prod(shape) * leaves[name].dtype.itemsize
    if not groups or used + size > max_bytes:
      groups.append([])
      used = 0
    groups[-1].append((name, j))
    used += size
  return groups


@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """The run's tokenizer as a Hugging Face directory wants it: `file` (its tokenizer.json) or
  `text` (one built for it); neither when it cannot be written there (`note` says why)."""

  info: TokenizerInfo | None
  file: pathlib.Path | None = None
  note: str | None = None
  text: str | None = None

  def json(self) -> bytes | None:
    """tokenizer.json's bytes, or None."""
    return self.file.read_bytes() if self.file is not None else None if self.text is None else self.text.encode()


def tokenizer(cfg: Config, workdir: epath.Path) -> Tokenizer:
  """The tokenizer recorded in the manifest of the run's first data source (training checked
  that every source shares it)."""
  path = cfg.data.sources[0].path
  if path == STDLIB:
    return _bytes(TokenizerInfo(kind="bytes", vocab_size=VOCAB_SIZE_MIN, eos_id=EOS_ID))
  where = pathlib.Path(path)
  if not where.is_absolute() and not where.exists() and (workdir / where).exists():
    where = workdir / where
  try:
    info = manifest_lib.read(where).tokenizer
  except DataError as err:
    return Tokenizer(None, note=f"no tokenizer files written: data.sources[0]: {err}")
  if info.kind == "bytes":
    return _bytes(info)
  if info.kind != "huggingface":
    return Tokenizer(info, note=f"no tokenizer files written: the run's tokenizer is {info.kind}, not Hugging Face")
  file = pathlib.Path(info.path)
  if not file.is_file():
    return Tokenizer(info, note=f"no tokenizer files written: {file} (the run's tokenizer) is missing")
  if hashlib.sha256(file.read_bytes()).hexdigest() != info.sha256:
    return Tokenizer(info, note=f"no tokenizer files written: {file} changed since the data was prepared")
  return Tokenizer(info, file=file)


def _bytes(info: TokenizerInfo) -> Tokenizer:
  """Byte-level tokens: a tokenizer.json that encodes UTF-8 bytes to their values, EOS 256."""
  if info.eos_id != EOS_ID:
    return Tokenizer(
      info, note=f"no tokenizer files written: byte-level tokens with eos_id {info.eos_id}, not {EOS_ID}"
    )
  return Tokenizer(info, text=byte_level_json())
