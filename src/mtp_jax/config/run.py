"""How a run trains: its data, optimizer, steps, checkpoints, device mesh and processes."""

from __future__ import annotations

import math
from typing import Any, Literal

import pydantic

from mtp_jax.config.base import ConfigError, Section, field

MESH_AXES = ("data", "fsdp", "sequence", "expert", "tensor")  # most communication-heavy last

STDLIB = "stdlib"  # data source name of the embedded corpus


class SourceConfig(Section):
  path: str = field(
    STDLIB, "A directory written by mtp-prepare, or `stdlib` for the embedded corpus (./stdlib: a directory)."
  )
  weight: float = field(1.0, "Mixture weight relative to the other sources (share of packed rows).", gt=0)


class DataConfig(Section):
  sources: list[SourceConfig] = field(
    [SourceConfig()], "Datasets to mix, [{path, weight}, ...]; `data.path=DIR` is shorthand for one source."
  )
  seq_len: int = field(128, "Tokens per packed training sequence.", ge=2)
  packing: Literal["first_fit", "concat"] = field(
    "first_fit", "first_fit: documents cut to seq_len pieces, placed whole; concat: concatenate, split at row ends."
  )
  shuffle: bool = field(True, "Shuffle documents globally each epoch (and rows within the packing bins).")
  max_documents: int = field(0, "Use only the first this many documents of each source (0: all).", ge=0)
  workers: int = field(0, "Threads reading a batch's documents (0: the one thread that prepares batches).", ge=0)
  prefetch: int = field(2, "Batches prepared ahead of the step (0: none).", ge=0)

  @pydantic.model_validator(mode="before")
  @classmethod
  def _path_shorthand(cls, data: Any) -> Any:
    if isinstance(data, dict) and "path" in data:
      if "sources" in data:
        raise ConfigError("data.path", "give data.path or data.sources, not both")
      data = {**{k: v for k, v in data.items() if k != "path"}, "sources": [{"path": data["path"], "weight": 1.0}]}
    return data

  def problems(self):
    if not self.sources:
      yield "data.sources", "empty: name at least one dataset"
    for i, source in enumerate(self.sources):
      if not source.path.strip():  # "": the current folder
        yield f"data.sources[{i}].path", f"empty; give a folder mtp-prepare wrote, or {STDLIB}"
      elif "://" in source.path:  # ArrayRecord reads local files only
        yield (
          f"data.sources[{i}].path",
          f"{source.path} is a URL; training reads datasets from a file system (mount the bucket, e.g. with gcsfuse)",
        )


class OptimizerConfig(Section):
  learning_rate: float = field(3e-3, "Peak learning rate.", gt=0)
  warmup_steps: int = field(20, "Linear warmup steps.", ge=0)
  decay_steps: int = field(0, "Cosine decay length including warmup (0: train.steps).", ge=0)
  min_lr_ratio: float = field(0.1, "Final learning rate as a fraction of the peak.", ge=0, le=1)
  b1: float = field(0.9, "Adam beta1.", ge=0, lt=1)
  b2: float = field(0.95, "Adam beta2.", ge=0, lt=1)
  eps: float = field(1e-8, "Adam epsilon.", gt=0)
  weight_decay: float = field(0.1, "Decoupled weight decay (matrices only; not norms, biases, router bias).", ge=0)
  grad_clip: float = field(1.0, "Global-norm gradient clip (0: off).", ge=0)


class TrainConfig(Section):
  steps: int = field(200, "Optimizer steps to train for.", ge=1)
  workdir: str = field("runs/tiny", "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
  seed: int = field(0, "Seed for parameters and data order.")
  batch_size: int = field(16, "Global batch size in sequences.", ge=1)
  grad_accum_steps: int = field(
    1,
    "Microbatches per optimizer step (divides batch_size), and per eval batch; -1: as many as give each "
    "batch-sharded device one sequence per microbatch, whatever the device count.",
    ge=-1,
  )
  data_grad_sum: Literal["step", "microbatch"] = field(
    "step",
    "With microbatches over a data axis: step sums each replica's microbatch gradients locally and adds the "
    "replicas' sums once a step (one all-reduce, after the last backward pass); microbatch lets the compiler sum "
    "each microbatch's gradient over data as it is made (beside the next microbatch's compute, k times the bytes).",
  )
  log_every: int = field(10, "Log metrics every this many steps.", ge=1)
  remat: Literal["none", "full", "dots", "dots_no_batch", "save_attn", "save_attn_moe", "save_moe"] = field(
    "none",
    "Rematerialisation per block: none; full (recompute the whole block); dots, dots_no_batch (keep matmul "
    "outputs); save_attn, save_moe, save_attn_moe (keep the attention kernel's inputs and output, the expert "
    "kernels' input and output rows, or both; recompute the rest).",
  )
  remat_save: list[Literal["attn_qkv", "attn_context", "moe_in", "moe_out"]] = field(
    [],
    "Values the rematerialised blocks keep besides what train.remat keeps, by checkpoint name: attn_qkv and "
    "attn_context (the attention kernel's inputs and output), moe_in and moe_out (the rows the expert kernels "
    "run on, as the dispatch exchange brought them, and their outputs). [moe_in] with full remat spares the "
    "recompute its token exchange.",
  )
  remat_offload: list[Literal["layer_in", "attn_qkv", "attn_context", "moe_in", "moe_out"]] = field(
    [],
    "Values the rematerialised blocks keep in host memory instead of HBM, copied out in the forward pass and "
    "back for the backward one, by checkpoint name: layer_in (each layer's input that a scanned stack keeps, "
    "the stack's largest saved value) or any name train.remat_save takes.",
  )
  scan_layers: bool = field(
    True,
    "Run consecutive trunk blocks of one structure as one scanned layer: compiled once, and sharded weights "
    "gathered a layer at a time (false: unrolled, each block its own code).",
  )
  trainable: Literal["all", "mtp"] = field(
    "all",
    "What the optimizer trains: all parameters, or only the MTP modules (model.mtp), the trunk, embedding and "
    "head frozen and run forward only (a drafter for a model as it is; no trunk gradients or optimizer state).",
  )
  compiler_options: dict[str, bool | int | float | str | None] = field(
    {},
    "XLA options for compiling the train and eval steps, {name: value}. One named xla_tpu_*, xla_gpu_* or "
    "xla_cpu_* applies on that platform only, so a config can carry each platform's; any other on every platform. "
    "null leaves XLA's default (train.compiler_options.NAME=null undoes a config's option). A name the "
    "platform's XLA does not know is an error before training starts.",
  )
  loss_chunk_len: int = field(0, "Sequence chunk for output-head + CE (0: whole sequence).", ge=0)
  attention_chunk_len: int = field(
    0,
    "Queries per attention block with model.attention.impl xla: float32 scores exist for this many at a time "
    "(0: whole sequence). The fused kernels hold no scores and ignore it.",
    ge=0,
  )
  progress_bar: bool = field(True, "Show a progress bar on the terminal.")
  eval_every: int = field(
    0,
    "Evaluate on the sources' held-out splits every this many steps: loss, accuracy and agreement with the main "
    "model per MTP depth, and speculative acceptance (0: never). Its programs compile beside the first steps.",
    ge=0,
  )
  eval_batches: int = field(8, "Batches of train.batch_size per evaluation (the same ones every time).", ge=1)
  eval_spec_prompts: int = field(
    4,
    "Held-out prompts (the first rows of the first eval batch) decoded greedily at each evaluation, the MTP "
    "depths drafting, to measure speculative acceptance (0: off; nothing to draft with model.mtp.depth=0).",
    ge=0,
  )
  eval_spec_prompt_len: int = field(
    0,
    "Tokens per speculative prompt, at most: each is cut at its row's first document end (0: data.seq_len / 2).",
    ge=0,
  )
  eval_spec_tokens: int = field(
    32, "New tokens decoded per speculative prompt (prompt + these fit data.seq_len).", ge=2
  )
  max_bad_steps: int = field(
    5, "Stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped).", ge=1
  )
  inject_nan_at_steps: list[int] = field(
    [], "For testing the non-finite guard: make the loss and gradients of these steps (1-based) NaN."
  )

  def problems(self):
    if not self.workdir.strip():  # "": the current folder, which would fill with the run's files
      yield "train.workdir", "empty; give the run's folder"
    yield from _output_problems("train.workdir", self.workdir)
    for name in self.compiler_options:
      if not name.startswith("xla_"):
        yield f"train.compiler_options.{name}", "is not an XLA option (their names begin xla_)"
    if self.remat_save and self.remat == "none":
      yield "train.remat_save", "keeps values of rematerialised blocks, and train.remat is none"
    if self.remat_offload and self.remat == "none":
      yield "train.remat_offload", "moves values of rematerialised blocks to host memory, and train.remat is none"
    if "layer_in" in self.remat_offload and not self.scan_layers:
      yield "train.remat_offload", "layer_in is what a scanned stack saves of each layer, and train.scan_layers is off"
    if both := sorted(set(self.remat_save) & set(self.remat_offload)):
      yield (
        "train.remat_offload",
        f"{', '.join(both)} also in train.remat_save: a value is kept in HBM or in host memory",
      )
    if self.grad_accum_steps == 0:
      yield "train.grad_accum_steps", "must be at least 1, or -1 for one sequence per device per microbatch"
    elif self.grad_accum_steps > 0 and self.batch_size % self.grad_accum_steps:
      yield "train.grad_accum_steps", f"{self.grad_accum_steps} does not divide train.batch_size ({self.batch_size})"


class CheckpointConfig(Section):
  enabled: bool = field(True, "Save and resume checkpoints in train.workdir/checkpoints.")
  every: int = field(100, "Save every this many steps (and always at the end and on preemption).", ge=1)
  max_to_keep: int = field(3, "Keep the latest this many checkpoints...", ge=1)
  keep_every: int = field(0, "...and also every checkpoint whose step is a multiple of this (0: none).", ge=0)
  async_save: bool = field(True, "Write checkpoints in the background while training continues.")
  restore_from: str | None = field(
    None,
    "Start from this checkpoint: a step of train.workdir, or a path to a run, its checkpoints/ or one step.",
  )
  load_params_only: bool = field(
    False, "With restore_from: take only the parameters and router biases, and start a new run at step 0."
  )
  strict: bool = field(False, "Stop on a damaged latest checkpoint instead of falling back to an earlier one.")
  restore_data: bool = field(
    True, "Restore the data position too (false: the data order starts over, e.g. after changing data.sources)."
  )

  @pydantic.field_validator("restore_from", mode="before")
  @classmethod
  def _step_number(cls, v):
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # `restore_from=400` parses as an int

  def problems(self):
    if self.load_params_only and not self.restore_from:
      yield "checkpoint.load_params_only", "needs checkpoint.restore_from (the run to take the parameters from)"
    if self.restore_from is not None and not self.restore_from.strip():
      yield "checkpoint.restore_from", "is empty"
    yield from _output_problems("checkpoint.restore_from", self.restore_from or "")


def _output_problems(key: str, path: str):
  """Where a run writes or reads its checkpoints: a local path or a gs:// bucket."""
  if "://" in path and not path.startswith("gs://"):  # pathlib would quietly make a directory named `s3:`
    yield key, f"{path}: runs write local paths or gs:// buckets"
  elif path.startswith("gs://") and not _has_gcsfs():
    yield key, f"{path}: gs:// needs gcsfs (pip install 'mtp-jax[gcs]')"


def _has_gcsfs() -> bool:
  import importlib.util

  return importlib.util.find_spec("gcsfs") is not None


def _default_rules() -> dict[str, list[str]]:
  return {
    # Parameters.
    "embed": ["fsdp"],
    "q_lora": ["fsdp"],  # MLA's compressed query and key/value ranks: the up-projections' rows
    "kv_lora": ["fsdp"],
    "vocab": ["tensor"],
    "heads": ["tensor"],
    "kv_heads": ["tensor"],
    "mlp": ["tensor"],
    "experts": ["expert"],
    "expert_mlp": ["tensor"],
    # Activations.
    "act_batch": ["data", "fsdp", "expert"],
    "act_length": ["sequence"],
    "act_embed": [],
    "act_heads": ["tensor"],
    "act_mlp": ["tensor"],
    # The output head's logits. mesh.vocab_split adds fsdp (train/losses.py).
    "act_vocab": ["tensor"],
  }


class DcnConfig(Section):
  data: int = field(1, "Data-parallel ways across slices (-1: fill with the remaining slices).")
  fsdp: int = field(1, "FSDP ways across slices.")
  sequence: int = field(1, "Sequence-parallel ways across slices.")
  expert: int = field(1, "Expert-parallel ways across slices.")
  tensor: int = field(1, "Tensor-parallel ways across slices.")


class MeshConfig(Section):
  """Axis sizes within a slice (ICI); `dcn` multiplies them across slices (multi-slice TPU,
  or processes where devices have no slice). Each axis's full size is ici * dcn."""

  data: int = field(-1, "Data-parallel axis size within a slice (-1: fill with the remaining devices).")
  fsdp: int = field(1, "Fully-sharded data-parallel axis size.")
  sequence: int = field(1, "Sequence (context) parallel axis size: activations split along the sequence.")
  expert: int = field(1, "Expert-parallel axis size.")
  tensor: int = field(1, "Tensor-parallel axis size.")
  vocab_split: Literal["auto", True, False] = field(
    "auto",
    "Split the output head's vocabulary over fsdp too (adds fsdp to rules.act_vocab, where it divides the "
    "vocabulary). auto and true: wherever fsdp splits the batch, since left whole the head is gathered and its "
    "whole gradient summed every loss chunk (benchmarks/RESULTS.md); false keeps the head whole, for a lower "
    "peak where the MoE layers make it.",
  )
  dcn: DcnConfig = DcnConfig()
  rules: dict[str, list[str]] = field(
    _default_rules(),
    "Logical axis name -> mesh axes (the one sharding rules table); entries given override the defaults by name.",
  )

  @pydantic.field_validator("rules")
  @classmethod
  def _over_defaults(cls, rules: dict[str, list[str]]) -> dict[str, list[str]]:
    return {**_default_rules(), **rules}

  def problems(self):
    for key, section in [("mesh", self), ("mesh.dcn", self.dcn)]:
      sizes = {ax: getattr(section, ax) for ax in MESH_AXES}
      if any(s == 0 or s < -1 for s in sizes.values()):
        yield key, f"axis sizes must be positive or -1, got {sizes}"
      if list(sizes.values()).count(-1) > 1:
        yield key, "at most one axis may be -1"
    for name, axes in self.rules.items():
      bad = [ax for ax in axes if ax not in MESH_AXES]
      if bad:
        yield f"mesh.rules.{name}", f"unknown mesh axis {bad[0]!r} (axes: {', '.join(MESH_AXES)})"
      elif len(set(axes)) != len(axes):
        yield f"mesh.rules.{name}", "names a mesh axis twice"

  def ici_dcn(self, num_devices: int, num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI, DCN) axis sizes with -1 filled. With every DCN size 1 the ICI sizes tile all the
    devices; otherwise the DCN sizes tile the slices and the ICI sizes one slice. Raises
    ConfigError when they do not."""
    dcn = {a: getattr(self.dcn, a) for a in MESH_AXES}
    if all(s == 1 for s in dcn.values()):
      return _fill({a: getattr(self, a) for a in MESH_AXES}, num_devices, "mesh", "devices"), dcn
    granules = f"slice{'s' * (num_slices != 1)} present (TPU slices; elsewhere one a process)"
    dcn = _fill(dcn, num_slices, "mesh.dcn", granules)
    if num_devices % num_slices:
      raise ConfigError("mesh.dcn", f"{num_devices} devices do not split into {num_slices} equal slices")
    per_slice = num_devices // num_slices
    return _fill({a: getattr(self, a) for a in MESH_AXES}, per_slice, "mesh", "devices of one slice"), dcn

  def shape(self, num_devices: int, num_slices: int = 1) -> dict[str, int]:
    """Full axis sizes (ICI x DCN) with -1 filled."""
    ici, dcn = self.ici_dcn(num_devices, num_slices)
    return {a: ici[a] * dcn[a] for a in MESH_AXES}


def _fill(sizes: dict[str, int], total: int, key: str, what: str) -> dict[str, int]:
  known = math.prod(s for s in sizes.values() if s != -1)
  fill = [a for a, s in sizes.items() if s == -1]
  if fill:
    if total % known:
      fixed = {a: s for a, s in sizes.items() if s != -1 and s != 1}
      raise ConfigError(key, f"fixed axes {fixed} ({known}-way) do not divide the {total} {what}")
    sizes = {**sizes, fill[0]: total // known}
  if math.prod(sizes.values()) != total:
    shown = {a: s for a, s in sizes.items() if s != 1} or sizes
    raise ConfigError(key, f"axis sizes {shown} multiply to {math.prod(sizes.values())}, not the {total} {what}")
  return sizes


class DistributedConfig(Section):
  initialize: Literal["auto", "always", "never"] = field(
    "auto",
    "Start jax.distributed: auto when a coordinator or process count is given here or in JAX_COORDINATOR_ADDRESS, "
    "or JAX detects a cluster (TPU pod, SLURM, Kubernetes); always; never.",
  )
  coordinator_address: str | None = field(None, "host:port of process 0 (default: detected from the cluster).")
  num_processes: int | None = field(None, "Processes in the job (default: detected).", ge=1)
  process_id: int | None = field(None, "This process's index, 0-based (default: detected).", ge=0)
  local_device_ids: list[int] | None = field(None, "Devices this process uses (default: all it sees).")
  initialization_timeout_s: int = field(300, "Give up when the other processes have not joined after this.", ge=1)
  heartbeat_timeout_s: int = field(100, "The coordinator declares a silent process dead after this.", ge=1)
  peer_timeout_s: float = field(
    60.0,
    "Stop with an error when another process has sent no heartbeat for this long (it died or hangs); "
    "keep it below heartbeat_timeout_s so the error is ours, not a crash report (0: off).",
    ge=0,
  )
  step_timeout_s: float = field(
    1800.0,
    "Stop with an error when no step (with its saving and evaluation) finishes for this long, e.g. because a "
    "collective hangs (0: wait forever).",
    ge=0,
  )
  cpu_collectives: Literal["gloo", "mpi"] = field("gloo", "Cross-process collectives for the CPU backend.")

  def problems(self):
    if self.num_processes is not None and self.process_id is not None and self.process_id >= self.num_processes:
      yield "distributed.process_id", f"{self.process_id} is not below distributed.num_processes ({self.num_processes})"
