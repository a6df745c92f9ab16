"""`export()`: one checkpoint step -> a Hugging Face directory, one array at a time."""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys

import ml_dtypes
import numpy as np
from etils import epath
from tqdm import tqdm

from mtp_jax.export import ExportError, deepseek_v3, glm4_moe, qwen3_moe, source, writer
from mtp_jax.export.layout import Tensor

MAX_READ_BYTES = 2**30  # small arrays are read together up to this; a larger one alone
# --format name -> its layout module: problems(m), check(m), config_json(cfg, dtype, tok), tensors(m),
# mtp_layers(m), model_config(hf_config), serving_notes(m).
FORMATS = {"deepseek_v3": deepseek_v3, "qwen3_moe": qwen3_moe, "glm4_moe": glm4_moe}
DTYPES = {"bf16": ("bfloat16", np.dtype(ml_dtypes.bfloat16)), "fp32": ("float32", np.dtype(np.float32))}


@dataclasses.dataclass(frozen=True)
class Result:
  output: pathlib.Path
  step_dir: epath.Path  # local or in a bucket
  tensors: int
  shards: int
  bytes: int  # tensor bytes written, extra files included
  mtp_layers: list[str]  # the HF layer prefixes holding the MTP modules ("FILE:prefix" outside the shards)
  notes: list[str]


def export(
  checkpoint: str,
  output: str,
  *,
  format: str = "deepseek_v3",
  dtype: str = "bf16",
  overwrite: bool = False,
  max_shard_bytes: int = writer.MAX_SHARD_BYTES,
  max_read_bytes: int = MAX_READ_BYTES,
  progress: bool = False,
) -> Result:
  """Writes the checkpoint step `checkpoint` names (see `source.locate`) into `output`."""
  if format not in FORMATS:
    raise ExportError(f"--format {format}: not supported (formats: {', '.join(FORMATS)})")
  fmt = FORMATS[format]
  if dtype not in DTYPES:
    raise ExportError(f"--dtype {dtype}: unknown (dtypes: {', '.join(DTYPES)})")
  writer.check_output(output, overwrite)
  src = source.locate(checkpoint)
  cfg = src.config
  fmt.check(cfg.model)
  dtype_name, np_dtype = DTYPES[dtype]
  leaves = source.abstract_leaves(cfg)
  table = fmt.tensors(cfg.model)
  _check_covers(table, leaves)
  tok = source.tokenizer(cfg, src.directory.parent)

  # Read each piece (a leaf, or one block of a stack) once: its tensors go out together
  # (per-expert slices, the MTP layer's copies).
  order = list(dict.fromkeys(t.piece for t in table))
  by_piece = {piece: [t for t in table if t.piece == piece] for piece in order}
  written = [t for piece in order for t in by_piece[piece] if not t.zero]
  out_dtype = {t.hf: np.dtype(np.float32) if t.keep_fp32 else np_dtype for t in written}
  size = {t.hf: math.prod(t.hf_shape(leaves[t.ours].shape)) * out_dtype[t.hf].itemsize for t in written}
  sharded = [t.hf for t in written if t.file is None]
  shard_of = writer.plan_shards([size[n] for n in sharded], max_shard_bytes)

  reader = source.Reader(src, leaves)  # checks the saved names and shapes before anything is written
  try:
    with writer.output_dir(output, overwrite) as tmp:
      shards = writer.ShardWriter(tmp, sharded, shard_of)
      extra: dict[str, dict[str, np.ndarray]] = {}  # file -> its tensors, written whole at the end
      with tqdm(total=sum(size.values()), unit="B", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
        for group in source.read_groups(order, leaves, max_read_bytes):
          for piece, value in reader.read(group).items():
            for t in by_piece[piece]:
              if t.zero:
                if np.any(value):
                  what = piece[0] if piece[1] is None else f"block {piece[1]} of {piece[0]}"
                  raise ExportError(f"--format {format} cannot express {what}: it is nonzero and there is no {t.hf}")
                continue
              array = t.to_hf(value).astype(out_dtype[t.hf], copy=False)
              if t.file is None:
                shards.add(t.hf, array)
              else:
                extra.setdefault(t.file, {})[t.hf] = np.ascontiguousarray(array)
              bar.update(array.nbytes)
      shards.write_index()
      extra_bytes = sum(writer.write_safetensors(tmp / file, tensors) for file, tensors in extra.items())
      _write_configs(tmp, fmt, cfg, dtype_name, tok)
  finally:
    reader.close()
  return Result(
    output=pathlib.Path(output).expanduser().absolute(),
    step_dir=src.step_dir,
    tensors=len(written),
    shards=len(shards.files),
    bytes=shards.bytes + extra_bytes,
    mtp_layers=fmt.mtp_layers(cfg.model),
    notes=([tok.note] if tok.note else []) + fmt.serving_notes(cfg.model),
  )


def _write_configs(directory: pathlib.Path, fmt, cfg, dtype_name: str, tok: source.Tokenizer) -> None:
  info = tok.info
  writer.write_json(directory / "config.json", fmt.config_json(cfg, dtype_name, info))
  generation = {"bos_token_id": info.bos_id if info else None, "eos_token_id": cfg.model.eos_id}
  if info and info.pad_id is not None:
    generation["pad_token_id"] = info.pad_id
  writer.write_json(directory / "generation_config.json", generation)
  if (text := tok.json()) is not None:
    writer.write_tokenizer(directory, text, info.bos_id, info.eos_id, info.pad_id, cfg.data.seq_len)


def _check_covers(table: list[Tensor], leaves: dict) -> None:
  """Every parameter and router bias is exported, and nothing else is asked for."""
  used = {t.ours for t in table}
  if missing := [n for n in leaves if n not in used]:
    raise AssertionError(f"the tensor table leaves out {missing[0]}")
  if unknown := sorted(used - set(leaves)):
    raise AssertionError(f"the tensor table names {unknown[0]}, which this model does not have")
  names = [t.hf for t in table]
  if len(set(names)) != len(names):
    raise AssertionError("the tensor table names a tensor twice")
