"""`import_()`: a Hugging Face directory -> a run of ours, `DIR/config.yaml` and `DIR/checkpoints/0`.

config.json's `model_type` picks the format module (those export writes, `exporter.FORMATS`): its
`model_config` gives the model settings, and its `tensors` table, the one export writes by, says
which file tensor fills which leaf of our train state. The rest of the run config comes from
`--config` (else the defaults) and dotted overrides, which may not change what config.json fixes
(`check_overrides`). The state is step 0 with a fresh optimizer state, so `mtp-train --config
DIR/config.yaml` continues training the model in place, and `checkpoint.restore_from=DIR` (with
`load_params_only` or without) starts another run from it.

Every safetensors header is read, and every tensor the table needs checked for presence, shape
and dtype, before anything is written. Each array is then built on the run's mesh with
`jax.make_array_from_callback`, its leaf converted from the files once and kept only until the
next leaf is asked for, so a process holds its own shards plus one leaf in conversion. Parameters
are stored in `model.param_dtype` (bf16 tensors become float32 exactly, so a bf16 re-export is bit
for bit). The output is written beside DIR and renamed into place once complete (`writer.output_dir`).
One process imports; the checkpoint restores onto any mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import shutil
import sys

import jax
import numpy as np
from safetensors import safe_open
from tqdm import tqdm

from mtp_jax import config as config_lib
from mtp_jax.config import Config, ConfigError, MeshConfig
from mtp_jax.errors import first_line
from mtp_jax.export import ExportError, writer
from mtp_jax.export.exporter import FORMATS
from mtp_jax.export.layout import Tensor
from mtp_jax.train import optimizer, step
from mtp_jax.train.checkpoint import Checkpointer, leaf_name
from mtp_jax.train.program import Program, build

# Model keys config.json sets that an override may still change: which token ends a document is the
# data's, init_std only matters for weights drawn afresh. model.mtp.depth may be lowered (see below).
OVERRIDABLE = ("model.eos_id", "model.init_std")
# The run's own: where it lives, and that it starts from the imported step rather than elsewhere.
IMPORT_SETS = ("train.workdir", "checkpoint.restore_from", "checkpoint.load_params_only")
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # safetensors' names; F8_* needs a dequantisation we do not do
TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "tokenizer.model",
  "vocab.json",
  "merges.txt",
)


@dataclasses.dataclass(frozen=True)
class Result:
  output: pathlib.Path
  format: str
  config: Config  # as written to DIR/config.yaml
  tensors: int  # read from the files
  bytes: int
  notes: list[str]


def import_(
  hf_dir: str,
  output: str,
  *,
  base_config: str | None = None,
  overrides: list[str] | tuple[str, ...] = (),
  overwrite: bool = False,
  progress: bool = False,
) -> Result:
  """Writes the model in `hf_dir` as a run of ours into `output` (see the module docstring)."""
  directory = _hf_directory(hf_dir)
  hf = _read_json(directory / "config.json")
  kind = hf.get("model_type")
  if kind not in FORMATS:
    raise ExportError(
      f"{directory / 'config.json'}: model_type {kind!r} cannot be imported (formats: {', '.join(FORMATS)})"
    )
  fmt = FORMATS[kind]
  final = writer.check_output(output, overwrite)
  try:
    model = fmt.model_config(hf)
  except ExportError as err:
    raise ExportError(f"{directory}: {err}") from None
  cfg, notes = run_config(model, base_config, overrides, final)
  program = _program(cfg)
  leaves = {
    **_named(program.abstract_state.params, "params"),
    **_named(program.abstract_state.router_bias, "router_bias"),
  }

  def tensors(modules: int) -> list[Tensor]:  # of our model with this many MTP modules stored
    mtp = cfg.model.mtp.model_copy(update={"depth": modules, "share_weights": False})
    return fmt.tensors(cfg.model.model_copy(update={"mtp": mtp}))

  modules = cfg.model.mtp.modules
  table = tensors(modules)
  files = _Files(directory, {t.file for t in table if t.file})
  in_files = tensors(model["mtp"]["depth"])  # all the directory may hold
  fresh = []
  if "model.mtp.depth" in _dotted(config_lib.parse_overrides(list(overrides)), ""):
    # An explicit depth: the MTP modules the files hold are read, the rest start afresh.
    held = _modules_held(tensors, modules, files)
    table, fresh = tensors(held), [f"mtp.{k}." for k in range(held, modules)]
    if fresh:
      which = ", ".join(str(k + 1) for k in range(held, modules))
      notes.append(
        f"MTP module(s) {which} are not in {directory}: initialised afresh (train them alone with train.trainable=mtp)"
      )
  notes += _check(table, in_files, leaves, files)

  converter = _Converter(table, leaves, files, notes, _fresh_leaves(program, cfg, fresh))
  tokenizer = [f for f in TOKENIZER_FILES if (directory / f).is_file()]
  with writer.output_dir(output, overwrite) as tmp:
    with tqdm(total=converter.total, unit="B", unit_scale=True, disable=not progress, file=sys.stderr) as bar:
      converter.bar = bar
      state = _state(program, cfg, leaves, converter)
    ckpt = Checkpointer(tmp / "checkpoints")
    try:
      ckpt.save(0, state, None)
      ckpt.wait()
    finally:
      ckpt.close()
    del state
    (tmp / "config.yaml").write_text(config_lib.to_yaml(cfg))
    if tokenizer:
      (tmp / "tokenizer").mkdir()
      for file in tokenizer:
        shutil.copyfile(directory / file, tmp / "tokenizer" / file)
  if tokenizer:
    notes.append(f"tokenizer files copied to {final / 'tokenizer'}: prepare data with mtp-prepare --tokenizer there")
  else:
    notes.append(f"{directory} holds no tokenizer files: prepare data with the model's own tokenizer")
  return Result(final, kind, cfg, converter.tensors, converter.bytes, notes)


# ----------------------------------------------------------------------------- the run config


def run_config(model: dict, base_config: str | None, overrides, workdir: pathlib.Path) -> tuple[Config, list[str]]:
  """The imported run's config: the model settings config.json fixes (`model`), the rest from
  `base_config` (else the defaults), then dotted overrides; `train.workdir` is the output."""
  try:
    base = config_lib.load(base_config) if base_config else Config()
    extra = config_lib.parse_overrides(list(overrides))
  except ConfigError as err:
    raise ExportError(str(err)) from None
  check_overrides(model, extra)
  notes = []
  if base.checkpoint.restore_from is not None:
    notes.append(f"{base_config}: checkpoint.restore_from dropped: the imported run starts from its own step 0")
  tree = base.model_dump(mode="json")
  tree["model"] = config_lib._merge(tree["model"], model)  # the merge config.load applies to overrides
  tree = config_lib._merge(tree, extra)
  tree["train"]["workdir"] = str(workdir)
  tree["checkpoint"].update(restore_from=None, load_params_only=False)
  try:
    return config_lib.from_dict(tree), notes
  except ConfigError as err:
    raise ExportError(str(err)) from None


def check_overrides(model: dict, overrides: dict) -> None:
  """An override may set anything config.json does not fix, `OVERRIDABLE`, and model.mtp.depth
  (modules past it are left out, modules the files lack start afresh); nothing in `IMPORT_SETS`."""
  fixed = set(_dotted(model, "model"))
  for key, value in _dotted(overrides, "").items():
    if key in IMPORT_SETS:
      raise ExportError(f"{key}: set by the import (the run lives in --output and starts from its step 0)")
    if key == "model.mtp.depth":
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ExportError(f"{key}={value}: not a number of MTP modules")
    elif key in fixed and key not in OVERRIDABLE:
      raise ExportError(
        f"{key}: fixed by config.json (an import takes the architecture from there; overridable: "
        f"{', '.join(OVERRIDABLE)}, model.mtp.depth)"
      )


def _dotted(tree: dict, prefix: str) -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}.{key}" if prefix else key
    out.update(_dotted(value, name) if isinstance(value, dict) else {name: value})
  return out


def _program(cfg: Config) -> Program:
  """The run's mesh and shardings where this process's devices form that mesh; else (one CPU
  importing for a pod, say) every device on the data axis: Orbax restores onto any mesh, so the
  checkpoint is the same either way."""
  try:
    cfg.mesh.shape(jax.device_count())
  except ConfigError:
    cfg = cfg.model_copy(update={"mesh": MeshConfig(rules=cfg.mesh.rules)})
  try:
    return build(cfg)
  except ConfigError as err:
    raise ExportError(str(err)) from None


def _named(tree, prefix: str) -> dict[str, jax.ShapeDtypeStruct]:
  return {f"{prefix}.{leaf_name(p)}": x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ----------------------------------------------------------------------------- the files


def _hf_directory(spec: str) -> pathlib.Path:
  path = pathlib.Path(spec).expanduser().absolute()
  if not path.exists():
    raise ExportError(f"{spec}: no such directory")
  if not path.is_dir():
    raise ExportError(f"{spec}: not a directory (give a Hugging Face model directory)")
  if not (path / "config.json").is_file():
    raise ExportError(f"{spec}: no config.json, so not a Hugging Face model directory")
  return path


def _read_json(path: pathlib.Path) -> dict:
  try:
    value = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError) as err:
    raise ExportError(f"{path}: not readable JSON ({first_line(err)})") from None
  if not isinstance(value, dict):
    raise ExportError(f"{path}: not a JSON object")
  return value


class _Files:
  """The safetensors files of a Hugging Face directory: those the index names (or a lone
  model.safetensors) and the extra files a format names. Every header is read here, so a damaged
  file fails before anything is written; tensors are then read one at a time."""

  def __init__(self, directory: pathlib.Path, extra: set[str]):
    self.directory = directory
    index = directory / writer.INDEX
    weight_map = {}
    if index.is_file():
      weight_map = _read_json(index).get("weight_map")
      if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ExportError(f"{index}: no weight_map of tensor names to files")
      names = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").is_file():
      names = ["model.safetensors"]
    else:
      raise ExportError(f"{directory}: no {writer.INDEX} or model.safetensors")
    names += sorted(f for f in extra if f not in names and (directory / f).is_file())
    self.file_of: dict[str, str] = {}
    self.shape: dict[str, tuple[int, ...]] = {}
    self.dtype: dict[str, str] = {}
    for file in names:
      path = directory / file
      if not path.is_file():
        raise ExportError(f"{index}: names {file}, which is missing")
      try:
        with safe_open(path, framework="numpy") as f:
          slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
          header = {name: (tuple(s.get_shape()), s.get_dtype()) for name, s in slices.items()}
      except Exception as err:  # safetensors raises its own error, or OSError; the user needs one line
        raise ExportError(f"{path}: not a readable safetensors file ({first_line(err)})") from None
      for name, (shape, dtype) in header.items():
        if name in self.file_of:
          raise ExportError(f"{path}: holds {name}, which {self.file_of[name]} holds too")
        self.file_of[name], self.shape[name], self.dtype[name] = file, shape, dtype
    for name, file in weight_map.items():
      if self.file_of.get(name) != file:
        raise ExportError(f"{index}: names {name} in {file}, which does not hold it")
    self._open: tuple[str, object] | None = None

  def where(self, name: str) -> pathlib.Path:
    return self.directory / self.file_of[name]

  def read(self, name: str) -> np.ndarray:
    file = self.file_of[name]
    if self._open is None or self._open[0] != file:  # tensors of one leaf mostly share a file
      self._open = (file, safe_open(self.directory / file, framework="numpy"))
    try:
      return self._open[1].get_tensor(name)
    except Exception as err:
      raise ExportError(f"{self.where(name)}: {name} unreadable ({first_line(err)})") from None


def _check(table: list[Tensor], in_files: list[Tensor], leaves: dict, files: _Files) -> list[str]:
  """Every tensor the table reads is there with the right shape and a float dtype, and the
  directory holds nothing the config does not imply. Copies of a leaf (the MTP layers' embedding
  and head, a tied lm_head) may be missing: the first Tensor of a leaf is the one read."""
  sources = _sources(table)
  for t in table:
    if t.zero or (t not in sources and t.hf not in files.file_of):
      continue
    if t.hf not in files.file_of:
      module = t.ours.split(".")[2] if t.ours.split(".")[1] == "mtp" else None
      hint = (
        f"; it belongs to MTP module {int(module) + 1}, and transformers' save_pretrained leaves MTP layers out: "
        f"import the model without them with model.mtp.depth={module}, or start them afresh by giving "
        "model.mtp.depth explicitly"
        if module is not None
        else ""
      )
      raise ExportError(f"{files.directory}: no tensor {t.hf}, which config.json implies{hint}")
    want, got = t.hf_shape(leaves[t.ours].shape), files.shape[t.hf]
    if got != want:
      raise ExportError(f"{files.where(t.hf)}: {t.hf} has shape {got}, config.json implies {want}")
    if files.dtype[t.hf] not in FLOAT_DTYPES:
      floats = ", ".join(FLOAT_DTYPES)
      raise ExportError(f"{files.where(t.hf)}: {t.hf} is {files.dtype[t.hf]}, not a float type ({floats})")
  known = {t.hf for t in in_files if not t.zero}
  if unexpected := sorted(set(files.file_of) - known):
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    raise ExportError(f"{files.where(unexpected[0])}: holds {unexpected[0]}{more}, which config.json does not imply")
  ignored = sorted((set(files.file_of) & known) - {t.hf for t in table})
  return [f"left out {len(ignored)} tensors of the MTP modules past model.mtp.depth"] if ignored else []


def _modules_held(tensors, depth: int, files: _Files) -> int:
  """How many of the first `depth` MTP modules the files hold any tensor of."""
  for k in range(depth):
    own = [t for t in tensors(k + 1) if t.ours.startswith(f"params.mtp.{k}.") and not t.zero]
    if not any(t.hf in files.file_of for t in own):
      return k
  return depth


def _sources(table: list[Tensor]) -> set[Tensor]:
  """The Tensor each leaf (or layer or expert slice of one) is read from: the first naming it."""
  first = {}
  for t in table:
    if not t.zero:
      first.setdefault((t.ours, *t.index()), t)
  return set(first.values())


# ----------------------------------------------------------------------------- the state


class _Converter:
  """Our leaves from the files, one at a time: make_array_from_callback asks for one device's
  slice after another, so the whole leaf is converted once and kept until the next is asked for."""

  def __init__(self, table: list[Tensor], leaves: dict, files: _Files, notes: list[str], fresh: dict):
    self.files, self.leaves, self.notes, self.fresh = files, leaves, notes, fresh
    self.by_leaf: dict[str, list[Tensor]] = {}
    for t in table:
      self.by_leaf.setdefault(t.ours, []).append(t)
    self.sources = _sources(table)
    self.total = sum(math.prod(files.shape[t.hf]) * np.dtype(leaves[t.ours].dtype).itemsize for t in self.sources)
    self.tensors = self.bytes = 0
    self.bar = None
    self._name, self._value = None, None

  def slice(self, name: str, index) -> np.ndarray:
    if self._name != name:
      self._name, self._value = None, None  # free the last leaf first
      self._value, self._name = self._convert(name), name
    return self._value[index]

  def _convert(self, name: str) -> np.ndarray:
    leaf = self.leaves[name]
    out = np.zeros(leaf.shape, leaf.dtype)  # what a `zero` Tensor leaves
    first: dict[tuple, tuple[str, np.ndarray]] = {}
    for t in self.by_leaf[name]:
      part = t.part_shape(leaf.shape)
      if t in self.sources:
        value = t.layout.from_hf(self.files.read(t.hf), part)
        out[t.index()] = value  # exact for bf16 -> float32
        self.tensors += 1
        self.bytes += value.nbytes
        if self.bar is not None:
          self.bar.update(math.prod(part) * out.itemsize)
        if any(c.index() == t.index() and c not in self.sources for c in self.by_leaf[name]):
          first[t.index()] = (t.hf, value)
      elif not t.zero and t.hf in self.files.file_of:  # a copy: the first was read, the copy must agree
        hf, value = first[t.index()]
        if not np.array_equal(t.layout.from_hf(self.files.read(t.hf), part), value):
          self.notes.append(f"{t.hf} differs from {hf}; our model shares one array, so {hf} was imported")
    return out


def _fresh_leaves(program: Program, cfg: Config, modules: list[str]) -> dict[str, jax.Array]:
  """The leaves of the MTP `modules` ("mtp.1.", ...) as a fresh run initialises them (train.seed),
  on the mesh; the compiler computes only these of the initialiser's outputs."""
  wanted = tuple(f"{part}.{m}" for part in ("params", "router_bias") for m in modules)
  if not wanted:
    return {}

  def pick(state):
    named = {**_named(state.params, "params"), **_named(state.router_bias, "router_bias")}
    return {k: v for k, v in named.items() if k.startswith(wanted)}

  init = step.make_init(cfg, optimizer.make(cfg.optimizer, cfg.train.steps))
  fresh = jax.jit(lambda key: pick(init(key)), out_shardings=pick(program.state_shardings))
  return fresh(jax.random.key(cfg.train.seed))


def _state(program: Program, cfg: Config, leaves: dict, converter: _Converter) -> step.TrainState:
  """Step 0: the parameters and router biases from the files, built on the mesh slice by slice,
  and the optimizer state initialised from them with the state's shardings."""

  def build(prefix):
    def one(path, abstract):
      name = f"{prefix}.{leaf_name(path)}"
      if name in converter.fresh:
        return converter.fresh[name]
      return jax.make_array_from_callback(abstract.shape, abstract.sharding, lambda i: converter.slice(name, i))

    return one

  abstract = program.abstract_state
  params = jax.tree_util.tree_map_with_path(build("params"), abstract.params)
  bias = jax.tree_util.tree_map_with_path(build("router_bias"), abstract.router_bias)
  tx = optimizer.make(cfg.optimizer, cfg.train.steps)
  init = functools.partial(step.init_optimizer, cfg, tx)
  opt_state = jax.jit(init, out_shardings=program.state_shardings.opt_state)(params)
  return jax.device_put(step.new_state(params, bias, opt_state), program.state_shardings)
