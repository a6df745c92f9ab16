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

from mtp_jax.config import STDLIB, Config
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.data.manifest import DataError
from mtp_jax.errors import InputError
from mtp_jax.export import source
from mtp_jax.generate import decode
from mtp_jax.model import Transformer
from mtp_jax.model.moe import RouterBias
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


def weights(src: source.Source) -> Transformer:
  """The run's model holding the step's parameters and router biases, on the default device,
  in the compute dtype where every use casts them to it (`decode.in_compute_dtype`: bfloat16
  compute from float32 parameters holds half the bytes), but on a TPU, where XLA decodes faster
  from the weights as stored (`decode.for_steps`)."""
  cast = decode.in_compute_dtype if jax.default_backend() != "tpu" else lambda model: model
  abstract = nnx.eval_shape(lambda: cast(Transformer(src.config.model, rngs=nnx.Rngs(0))))
  graphdef, params, bias = nnx.split(abstract, nnx.Param, RouterBias)
  kept = {f"params.{leaf_name(p)}": v.dtype for p, v in jax.tree_util.tree_leaves_with_path(params)}
  kept |= {f"router_bias.{leaf_name(p)}": v.dtype for p, v in jax.tree_util.tree_leaves_with_path(bias)}
  leaves = source.abstract_leaves(src.config)
  arrays = {}
  reader = source.Reader(src, leaves)  # checks the saved names and shapes against the config first
  try:
    for group in source.read_groups([(name, None) for name in leaves], leaves, MAX_READ_BYTES):
      for (name, _), array in reader.read(group).items():
        # The model's dtype first, then the cast decoding would make, by XLA on the device.
        arrays[name] = jax.device_put(array.astype(leaves[name].dtype, copy=False)).astype(kept[name])
  finally:
    reader.close()

  def fill(prefix):
    return lambda path, _: arrays[f"{prefix}.{leaf_name(path)}"]

  params = jax.tree_util.tree_map_with_path(fill("params"), params)
  bias = jax.tree_util.tree_map_with_path(fill("router_bias"), bias)
  return nnx.merge(graphdef, params, bias)


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
