"""A trained run, ready to generate from: its model with the saved weights, its tokenizer, its config.

`--checkpoint` is read exactly as `mtp-export` reads it (`export.source`): a run's workdir, its
`checkpoints/` or one step's directory, the model settings from the run's `config.yaml`, every
array checked against the checksum saved with it. Only the parameters and router biases are
read (never the optimizer state), a group at a time, each group put on the device before the
next is read.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib

import jax
from etils import epath
from flax import nnx

from mtp_jax import sharding
from mtp_jax.config import STDLIB, Config
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.data.manifest import DataError
from mtp_jax.errors import InputError
from mtp_jax.export import source
from mtp_jax.generate import decode
from mtp_jax.model import Transformer
from mtp_jax.model.moe import RouterBias
from mtp_jax.model.transformer import stacks
from mtp_jax.train.checkpoint import leaf_name

MAX_READ_BYTES = 2**30  # arrays are read together up to this, so host memory holds about this much at a time


class LoadError(InputError):
  """A run that cannot be generated from, reported as one line."""


@dataclasses.dataclass(frozen=True)
class Loaded:
  model: Transformer
  tokenizer: tokenizer_lib.Tokenizer
  config: Config  # as the run recorded it
  step_dir: epath.Path  # local or in a bucket
  step: int

  @property
  def context(self) -> int:
    """Prompt plus new tokens allowed: the sequence length the model was trained on."""
    return self.config.data.seq_len


def load(checkpoint: str) -> Loaded:
  """The step `checkpoint` names (see `source.locate`); ExportError or LoadError with one line."""
  src = source.locate(checkpoint)
  tok = run_tokenizer(src.config, src.directory.parent)  # before the weights: the cheaper failure first
  return Loaded(weights(src), tok, src.config, src.step_dir, src.step)


def held(model: Transformer) -> Transformer:
  """The model as decoding holds it on this platform: cast to the compute dtype where every use
  casts a weight to it (`decode.in_compute_dtype`: bfloat16 compute from float32 parameters holds
  half the bytes), and on a GPU or TPU its trunk stored a block at a time (`Transformer.unstack`),
  which their decoding loops read in place. Compiled for an H200 and a v5p chip, small.yaml's
  loop moves what it moved from float32 stacks a step (4.1 and 4.3 GiB), holding 3.7 GiB in all
  where float32 stacks held 11.0 and 11.8 (benchmarks/RESULTS.md, 2026-12-07, ninth)."""
  model = decode.in_compute_dtype(model)
  return model if sharding.platform() == "cpu" else model.unstack()


def weights(src: source.Source) -> Transformer:
  """The run's model holding the step's parameters and router biases, on the default device,
  as decoding holds them there (`held`). Stored a block at a time, each block is read into its
  own array: no stack of the trunk's weights is held beside them."""
  abstract = nnx.eval_shape(lambda: held(Transformer(src.config.model, rngs=nnx.Rngs(0))))
  graphdef, params, bias = nnx.split(abstract, nnx.Param, RouterBias)
  kept = {f"params.{leaf_name(p)}": v.dtype for p, v in jax.tree_util.tree_leaves_with_path(params)}
  kept |= {f"router_bias.{leaf_name(p)}": v.dtype for p, v in jax.tree_util.tree_leaves_with_path(bias)}
  leaves = source.abstract_leaves(src.config)
  blocks = _blockwise(src.config, abstract, leaves)
  pieces = [(name, j) for name in leaves for j in (range(len(blocks[name])) if name in blocks else [None])]
  arrays = {}
  reader = source.Reader(src, leaves)  # checks the saved names and shapes against the config first
  try:
    for group in source.read_groups(pieces, leaves, MAX_READ_BYTES):
      for (name, j), array in reader.read(group).items():
        to, array = (name, array) if j is None else (blocks[name][j], array[None])  # a stack of one block
        # The model's dtype first, then the cast decoding would make, by XLA on the device.
        arrays[to] = jax.device_put(array.astype(leaves[name].dtype, copy=False)).astype(kept[to])
  finally:
    reader.close()

  def fill(prefix):
    return lambda path, _: arrays[f"{prefix}.{leaf_name(path)}"]

  params = jax.tree_util.tree_map_with_path(fill("params"), params)
  bias = jax.tree_util.tree_map_with_path(fill("router_bias"), bias)
  return nnx.merge(graphdef, params, bias)


def _blockwise(cfg: Config, held: Transformer, leaves: dict) -> dict[str, list[str]]:
  """Where the held model stores its trunk a block at a time (`Transformer.unstack`): each
  saved stack's name (`params.layers.r.…`, `router_bias.layers.r.…`) with the names its blocks
  are held under, block j of stack r as `….layers.i.…`, i its place in the trunk."""
  runs = stacks(cfg.model)
  if held.runs == runs:
    return {}
  out = {}
  for name in leaves:
    prefix, _, rest = name.partition(".layers.")
    if rest and prefix in ("params", "router_bias"):
      r, _, tail = rest.partition(".")
      a, b = runs[int(r)]
      out[name] = [f"{prefix}.layers.{i}.{tail}" for i in range(a, b)]
  return out


def run_tokenizer(cfg: Config, workdir: epath.Path) -> tokenizer_lib.Tokenizer:
  """The tokenizer the run's data was prepared with, refused when its file is gone or changed:
  another file would turn text into ids the model never learned."""
  found = source.tokenizer(cfg, workdir)
  info = found.info
  if info is None:
    if cfg.data.sources[0].path == STDLIB:
      return tokenizer_lib.BYTE_TOKENIZER
    why = (found.note or "").removeprefix("no tokenizer files written: ")
    raise LoadError(f"cannot tell which tokenizer the run used: {why}")
  if info.kind == "bytes":
    return tokenizer_lib.BYTE_TOKENIZER
  file = pathlib.Path(info.path)
  if not file.is_file():
    raise LoadError(f"the run's tokenizer {file} is missing (its data was prepared with it)")
  if hashlib.sha256(file.read_bytes()).hexdigest() != info.sha256:
    raise LoadError(f"the run's tokenizer {file} has changed since its data was prepared (sha256 differs)")
  try:
    return tokenizer_lib.load(str(file))
  except DataError as err:
    raise LoadError(str(err)) from None
