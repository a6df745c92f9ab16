"""Typed, validated configuration: YAML files plus dotted command-line overrides.

Every setting is declared once with its default and a one-line description: the model's sections
in model.py, the run's (data, optimizer, train, checkpoint, mesh, distributed) in run.py, the
shared base in base.py. Values that must fit together are checked by the smallest section that
holds them all (`Section.problems`), those of several sections by `Config.problems` below.
`load(path, overrides)` is the only way in; any problem raises `ConfigError`, one line naming
the key.
"""

from __future__ import annotations

import pathlib
from typing import Any

import pydantic
import yaml

from mtp_jax.config.base import ConfigError, Section
from mtp_jax.config.model import AttentionConfig, ModelConfig, MoEConfig, MTPConfig, RopeScaling
from mtp_jax.config.run import (
  MESH_AXES,
  STDLIB,
  CheckpointConfig,
  DataConfig,
  DcnConfig,
  DistributedConfig,
  MeshConfig,
  OptimizerConfig,
  SourceConfig,
  TrainConfig,
)

__all__ = [
  "AUTO",
  "MESH_AXES",
  "STDLIB",
  "AttentionConfig",
  "CheckpointConfig",
  "Config",
  "ConfigError",
  "DataConfig",
  "DcnConfig",
  "DistributedConfig",
  "MTPConfig",
  "MeshConfig",
  "MoEConfig",
  "ModelConfig",
  "OptimizerConfig",
  "RopeScaling",
  "SourceConfig",
  "TrainConfig",
  "from_dict",
  "load",
  "parse_overrides",
  "spec_prompt_len",
  "to_yaml",
]

AUTO = "auto"


class Config(Section):
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optimizer: OptimizerConfig = OptimizerConfig()
  train: TrainConfig = TrainConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  mesh: MeshConfig = MeshConfig()
  distributed: DistributedConfig = DistributedConfig()

  @pydantic.model_validator(mode="before")
  @classmethod
  def _tokenizer_defaults(cls, raw: Any) -> Any:
    """model.vocab_size and model.eos_id, when `auto` or left out: the data's tokenizer's."""
    if not isinstance(raw, dict) or not isinstance(raw.get("model", {}), dict):
      return raw
    model = raw.get("model", {})
    auto = [k for k in ("vocab_size", "eos_id") if model.get(k, AUTO) == AUTO]
    if auto:
      found = _tokenizer_of(raw.get("data"))
      defaults = {"vocab_size": -(-found[0] // 64) * 64, "eos_id": found[1]} if found else {}
      model = {k: v for k, v in model.items() if k not in auto} | {k: defaults[k] for k in auto if k in defaults}
      raw = {**raw, "model": model}
    return raw

  def problems(self):
    """Values of different sections that must fit together."""
    m, moe, mtp, t, seq_len = self.model, self.model.moe, self.model.mtp, self.train, self.data.seq_len
    if moe.num_experts and self.mesh.expert > 0 and moe.num_experts % self.mesh.expert:
      yield "model.moe.num_experts", f"{moe.num_experts} is not divisible by mesh.expert ({self.mesh.expert})"
    if t.trainable == "mtp" and not mtp.depth:
      yield "train.trainable", "mtp trains the MTP modules, and model.mtp.depth is 0"
    if mtp.depth >= seq_len - 1:
      yield "model.mtp.depth", f"{mtp.depth} leaves no target in a sequence of data.seq_len={seq_len}"
    if any(s.path == STDLIB for s in self.data.sources):
      if m.vocab_size < 257:
        yield "model.vocab_size", f"{m.vocab_size} is below the 257 byte-level tokens of the stdlib source"
      if m.eos_id != 256:
        yield "model.eos_id", f"{m.eos_id} is not the byte-level end-of-document id 256 of the stdlib source"
    if t.eval_every and t.eval_spec_prompts and mtp.depth:
      if t.eval_spec_prompts > t.batch_size:
        yield "train.eval_spec_prompts", f"{t.eval_spec_prompts} exceeds the rows of one eval batch ({t.batch_size})"
      prompt = spec_prompt_len(t, self.data)
      if prompt + t.eval_spec_tokens > seq_len:
        yield (
          "train.eval_spec_tokens",
          f"{prompt}-token prompts + {t.eval_spec_tokens} new tokens exceed data.seq_len ({seq_len}); "
          "lower it or train.eval_spec_prompt_len, or set train.eval_spec_prompts=0",
        )
    for key in ("loss_chunk_len", "attention_chunk_len"):
      chunk = getattr(t, key)
      if chunk and seq_len % chunk:
        yield f"train.{key}", f"{chunk} does not divide data.seq_len ({seq_len})"


def _tokenizer_of(data: Any) -> tuple[int, int] | None:
  """(vocab size, end-of-document id) of the first data source's tokenizer, from its manifest;
  None where it cannot be read (training then reports the data's problem in one line)."""
  if isinstance(data, DataConfig):
    path = data.sources[0].path
  elif isinstance(data, dict) and "path" in data:
    path = data["path"]
  elif isinstance(data, dict) and isinstance(data.get("sources"), list) and data["sources"]:
    first = data["sources"][0]
    path = (
      first.path if isinstance(first, SourceConfig) else first.get("path", STDLIB) if isinstance(first, dict) else None
    )
  else:
    path = STDLIB
  from mtp_jax.data import manifest, tokenizer  # here only: the config module needs no more of the data package

  if path == STDLIB:
    return tokenizer.BYTE_TOKENIZER.vocab_size, tokenizer.BYTE_TOKENIZER.eos_id

  try:
    t = manifest.read(str(path)).tokenizer
  except (manifest.DataError, TypeError):
    return None
  return t.vocab_size, t.eos_id


def spec_prompt_len(train: TrainConfig, data: DataConfig) -> int:
  """The longest speculative eval prompt: train.eval_spec_prompt_len, 0 meaning half a sequence."""
  return train.eval_spec_prompt_len or data.seq_len // 2


# ----------------------------------------------------------------------------- loading


def _config_error(err: pydantic.ValidationError) -> ConfigError:
  """Pydantic's first error as ours: a section's own ConfigError as it is, else the key and problem."""
  e = err.errors()[0]
  if isinstance(e.get("ctx", {}).get("error"), ConfigError):
    return e["ctx"]["error"]
  key = ".".join(str(p) for p in e["loc"])
  if e["type"] == "extra_forbidden":
    return ConfigError(key, "unknown key")
  return ConfigError(key, f"{e['msg']} (got {e.get('input')!r})")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = tree
  for i, p in enumerate(parents):
    child = node.setdefault(p, {})
    if not isinstance(child, dict):
      raise ConfigError(".".join(parents[: i + 1]), "is a value, not a section")
    node = child
  node[leaf] = value


def parse_overrides(args: list[str]) -> dict:
  """`a.b=1 c=x` -> nested dict; values are parsed as YAML scalars or lists."""
  tree: dict = {}
  for arg in args:
    key, sep, raw = arg.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
      raise ConfigError(repr(arg), "overrides take the form section.key=value")
    try:
      value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
      value = raw
    _set_dotted(tree, key, value)
  return tree


def _merge(base: dict, extra: dict) -> dict:
  out = dict(base)
  for k, v in extra.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = _merge(out[k], v)
    else:
      out[k] = v
  return out


def from_dict(tree: dict) -> Config:
  try:
    return Config.model_validate(tree)
  except pydantic.ValidationError as err:
    raise _config_error(err) from None


def load(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
  """Reads a YAML file (or the defaults when path is None) and applies dotted overrides."""
  tree: dict = {}
  if path is not None:
    from mtp_jax import storage  # a run's config.yaml may be in a bucket (mtp-export gs://...)

    p = storage.path(path) if storage.is_remote(path) else pathlib.Path(path)
    if not p.is_file():
      raise ConfigError(str(path), "is a folder, not a YAML file" if p.is_dir() else "no such file")
    try:
      tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
      mark = getattr(err, "problem_mark", None)
      where = f" line {mark.line + 1}" if mark else ""
      raise ConfigError(f"{path}{where}", "not valid YAML") from None
    if not isinstance(tree, dict):
      raise ConfigError(str(path), "top level must be a mapping of sections")
  return from_dict(_merge(tree, parse_overrides(list(overrides))))


def to_yaml(cfg: Config) -> str:
  return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
