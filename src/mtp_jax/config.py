"""Typed, validated configuration: YAML files plus dotted command-line overrides.

Every setting is declared once below with its default and a one-line description.
`load(path, overrides)` is the only way in; any problem raises `ConfigError` whose
message is one line naming the key.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

MESH_AXES = ("data", "fsdp", "sequence", "expert", "tensor")  # most communication-heavy last


class ConfigError(ValueError):
  """A configuration problem, reported to the user as one line."""


class _Section(BaseModel):
  model_config = ConfigDict(extra="forbid", frozen=True)


def _field(default: Any, doc: str, **kw: Any) -> Any:
  return Field(default, description=doc, **kw)


class RopeScaling(_Section):
  """Hugging Face's `rope_scaling` keys, for YaRN (DeepSeek-V3: factor 40 over 4096 positions)."""

  type: Literal["yarn"] = _field("yarn", "The scaling method: yarn (Peng et al. 2023).")
  factor: float = _field(..., "How many times the original context the frequencies are stretched to.", ge=1)
  original_max_position_embeddings: int = _field(..., "The context the model was pretrained on.", ge=1)
  beta_fast: float = _field(32.0, "Dimensions rotating more often than this over that context are kept.", gt=0)
  beta_slow: float = _field(1.0, "Dimensions rotating less often than this are stretched by factor.", gt=0)
  mscale: float = _field(1.0, "Scales log(factor) in the attention temperature.", ge=0)
  mscale_all_dim: float = _field(
    0.0,
    "With mscale, the temperature's divisor; for MLA also the softmax scale's correction "
    "(DeepSeek-V3: mscale(factor, mscale_all_dim)^2). 0: not set.",
    ge=0,
  )
  truncate: bool = _field(True, "Round the ramp's ends to whole dimensions (as DeepSeek-V3 and Hugging Face).")


class AttentionConfig(_Section):
  kind: Literal["gqa", "mla"] = _field(
    "gqa", "gqa: grouped-query attention; mla: DeepSeek Multi-head Latent Attention."
  )
  num_heads: int = _field(4, "Query heads.", ge=1)
  num_kv_heads: int = _field(2, "gqa: key/value heads (divides num_heads).", ge=1)
  head_dim: int = _field(16, "gqa: per-head dimension (even, for RoPE).", ge=2)
  qk_norm: bool = _field(False, "gqa: RMS-normalise each query and key head before RoPE (Qwen3).")
  qkv_bias: bool = _field(False, "gqa: biases on the query, key and value projections (GLM-4.5, Qwen2).")
  partial_rotary_factor: float = _field(
    1.0, "gqa: the share of each head's dimensions RoPE rotates, its first ones (GLM-4.5: 0.5).", gt=0, le=1
  )
  q_lora_rank: int = _field(0, "mla: rank of the compressed query (0: full-rank query projection).", ge=0)
  kv_lora_rank: int = _field(32, "mla: rank of the compressed key/value latent.", ge=1)
  qk_nope_head_dim: int = _field(16, "mla: per-head query/key dims without RoPE.", ge=1)
  qk_rope_head_dim: int = _field(8, "mla: decoupled RoPE dims (key shared across heads; even).", ge=2)
  v_head_dim: int = _field(16, "mla: per-head value dimension.", ge=1)
  absorb: bool = _field(
    True,
    "mla: decoding steps attend over the cached latent, W_uk folded into the query and W_uv into the output "
    "(DeepSeek-V3 absorbed attention); false: up-project the whole cache every step (the reference). "
    "The prefill and training always up-project.",
  )
  rope_theta: float = _field(10000.0, "RoPE base frequency.", gt=0)
  rope_scaling: RopeScaling | None = _field(
    None, "YaRN context extension (Hugging Face's rope_scaling keys), e.g. rope_scaling.factor=4 (null: plain RoPE)."
  )
  impl: Literal["auto", "xla", "splash", "cudnn"] = _field(
    "auto",
    "Training's attention kernel. auto: splash on TPU, cudnn on GPU, xla elsewhere or where those cannot serve "
    "the step; xla: einsums with a materialised mask (the reference); splash: Pallas splash attention (TPU; off "
    "TPU in Pallas interpret mode, slow, for tests; data.seq_len a multiple of 128); cudnn: cuDNN flash attention "
    "(GPU, bfloat16, heads up to 256 wide on Hopper). Decoding always runs xla.",
  )


class MoEConfig(_Section):
  num_experts: int = _field(8, "Routed experts per MoE layer (0: every layer is a dense FFN).", ge=0)
  top_k: int = _field(2, "Experts chosen per token.", ge=1)
  expert_d_ff: int = _field(64, "Hidden width of each routed and shared expert.", ge=1)
  num_shared_experts: int = _field(1, "Always-active shared experts (DeepSeek-V3: 1).", ge=0)
  score_func: Literal["softmax", "sigmoid"] = _field("sigmoid", "Router affinity function.")
  norm_topk_prob: bool = _field(True, "Normalise the selected gate weights to sum to 1.")
  routed_scaling_factor: float = _field(1.0, "Multiplier on routed gate weights (DeepSeek-V3: 2.5).", gt=0)
  n_group: int = _field(1, "Expert groups for group-limited routing (1: off).", ge=1)
  topk_group: int = _field(1, "Groups kept per token, ranked by the sum of their top-2 scores.", ge=1)
  mode: Literal["dropless", "capacity"] = _field(
    "dropless", "dropless: sort + ragged_dot; capacity: fixed buffers, overflow dropped (not causal)."
  )
  capacity_factor: float = _field(
    1.25,
    "capacity mode: buffer slots per expert = factor * tokens * top_k / experts, counted per device (its own "
    "tokens; the whole microbatch only with dispatch gspmd), so what overflows can change with the device count.",
    gt=0,
  )
  balance_loss_weight: float = _field(1e-4, "Sequence-wise balance loss alpha (DeepSeek-V3 eq. 17; 0: off).", ge=0)
  z_loss_weight: float = _field(0.0, "Router z-loss weight (0: off).", ge=0)
  bias_update_rate: float = _field(1e-3, "Aux-loss-free bias step gamma (DeepSeek-V3 eq. 16; 0: off).", ge=0)
  dispatch: Literal["auto", "all_to_all", "ragged_all_to_all", "gspmd"] = _field(
    "auto",
    "How tokens reach experts sharded over the expert mesh axis (with no such axis each device computes its own "
    "tokens, whatever is asked but gspmd). all_to_all: capacity buffers, every backend (mode: capacity); "
    "ragged_all_to_all: dropless, GPU and TPU only (mode: dropless); gspmd: the whole microbatch in one program, "
    "the compiler moves the tokens; auto: all_to_all in capacity mode, else ragged_all_to_all where the backend "
    "has it, else gspmd.",
  )
  ragged_buffer_factor: float = _field(
    0.0,
    "ragged_all_to_all: the rows one device can receive, as a multiple of the rows it sends (what it receives "
    "when routing is balanced); on overflow every source device keeps the same share of the rows it sends there "
    "and the rest are dropped. 0: room for the worst case (every row to one device), so nothing drops.",
    ge=0,
  )


class MTPConfig(_Section):
  kind: Literal["sequential", "parallel"] = _field(
    "sequential", "sequential: DeepSeek-V3 modules; parallel: Gloeckle et al. heads."
  )
  depth: int = _field(1, "Extra future tokens predicted (0 turns MTP off).", ge=0)
  loss_weight: float = _field(0.3, "lambda: weight of the mean MTP loss (DeepSeek-V3 eq. 25).", ge=0)
  loss_weight_schedule: list[tuple[int, float]] = _field(
    [], "Step schedule: [[from_step, weight], ...] overriding loss_weight from each step on."
  )
  use_moe: bool = _field(True, "MTP blocks use an MoE FFN when the model has experts (as DeepSeek-V3).")
  share_weights: bool = _field(
    False,
    "sequential: one module applied at every depth, trained on all depth losses (Nemotron 3 Super's shared MTP "
    "head, Megatron's repeated layer); exported as one NextN layer, decoding drafts depth tokens by reusing it.",
  )

  @property
  def modules(self) -> int:
    """MTP modules stored: one when they share weights, else one per depth."""
    return min(self.depth, 1) if self.share_weights else self.depth


class ModelConfig(_Section):
  vocab_size: int = _field(
    320,
    "Vocabulary size, at least the tokenizer's. auto (what a config file leaves out means): the first data "
    "source's tokenizer's, rounded up to a multiple of 64 (320 for the stdlib corpus's 257 byte-level tokens).",
    ge=2,
  )
  eos_id: int = _field(
    256, "End-of-document token id; must match the data's tokenizer. auto (or left out): the first source's.", ge=0
  )
  d_model: int = _field(64, "Model (residual) width.", ge=1)
  num_layers: int = _field(2, "Transformer blocks in the trunk.", ge=1)
  first_k_dense: int = _field(1, "Leading blocks with a dense FFN; the rest use MoE.", ge=0)
  d_ff: int = _field(128, "Hidden width of the dense SwiGLU FFN.", ge=1)
  norm_eps: float = _field(1e-6, "RMSNorm epsilon.", gt=0)
  init_std: float = _field(0.02, "Std of the normal initialiser for weights.", gt=0)
  tie_embeddings: bool = _field(False, "Use the embedding matrix as the output head.")
  dtype: Literal["float32", "bfloat16"] = _field("float32", "Compute dtype.")
  param_dtype: Literal["float32", "bfloat16"] = _field("float32", "Parameter storage dtype.")
  attention: AttentionConfig = AttentionConfig()
  moe: MoEConfig = MoEConfig()
  mtp: MTPConfig = MTPConfig()


STDLIB = "stdlib"  # data source name of the embedded corpus


class SourceConfig(_Section):
  path: str = _field(
    STDLIB, "A directory written by mtp-prepare, or `stdlib` for the embedded corpus (./stdlib: a directory)."
  )
  weight: float = _field(1.0, "Mixture weight relative to the other sources (share of packed rows).", gt=0)


class DataConfig(_Section):
  sources: list[SourceConfig] = _field(
    [SourceConfig()], "Datasets to mix, [{path, weight}, ...]; `data.path=DIR` is shorthand for one source."
  )
  seq_len: int = _field(128, "Tokens per packed training sequence.", ge=2)
  packing: Literal["first_fit", "concat"] = _field(
    "first_fit", "first_fit: documents cut to seq_len pieces, placed whole; concat: concatenate, split at row ends."
  )
  shuffle: bool = _field(True, "Shuffle documents globally each epoch (and rows within the packing bins).")
  max_documents: int = _field(0, "Use only the first this many documents of each source (0: all).", ge=0)
  workers: int = _field(0, "Threads reading a batch's documents (0: the one thread that prepares batches).", ge=0)
  prefetch: int = _field(2, "Batches prepared ahead of the step (0: none).", ge=0)

  @pydantic.model_validator(mode="before")
  @classmethod
  def _path_shorthand(cls, data: Any) -> Any:
    if isinstance(data, dict) and "path" in data:
      if "sources" in data:
        raise ConfigError("config error: data.path: give data.path or data.sources, not both")
      data = {**{k: v for k, v in data.items() if k != "path"}, "sources": [{"path": data["path"], "weight": 1.0}]}
    return data


class OptimizerConfig(_Section):
  learning_rate: float = _field(3e-3, "Peak learning rate.", gt=0)
  warmup_steps: int = _field(20, "Linear warmup steps.", ge=0)
  decay_steps: int = _field(0, "Cosine decay length including warmup (0: train.steps).", ge=0)
  min_lr_ratio: float = _field(0.1, "Final learning rate as a fraction of the peak.", ge=0, le=1)
  b1: float = _field(0.9, "Adam beta1.", ge=0, lt=1)
  b2: float = _field(0.95, "Adam beta2.", ge=0, lt=1)
  eps: float = _field(1e-8, "Adam epsilon.", gt=0)
  weight_decay: float = _field(0.1, "Decoupled weight decay (matrices only; not norms, biases, router bias).", ge=0)
  grad_clip: float = _field(1.0, "Global-norm gradient clip (0: off).", ge=0)


class TrainConfig(_Section):
  steps: int = _field(200, "Optimizer steps to train for.", ge=1)
  workdir: str = _field("runs/tiny", "Directory for checkpoints, metrics.jsonl and TensorBoard events.")
  seed: int = _field(0, "Seed for parameters and data order.")
  batch_size: int = _field(16, "Global batch size in sequences.", ge=1)
  grad_accum_steps: int = _field(
    1,
    "Microbatches per optimizer step (divides batch_size); -1: as many as give each batch-sharded device one "
    "sequence per microbatch, whatever the device count.",
    ge=-1,
  )
  log_every: int = _field(10, "Log metrics every this many steps.", ge=1)
  remat: Literal["none", "full", "dots", "dots_no_batch", "save_attn", "save_attn_moe", "save_moe"] = _field(
    "none",
    "Rematerialisation per block: none; full (recompute the whole block); dots, dots_no_batch (keep matmul "
    "outputs); save_attn, save_moe, save_attn_moe (keep the attention kernel's inputs and output, the expert "
    "kernels' input and output rows, or both; recompute the rest).",
  )
  scan_layers: bool = _field(
    True,
    "Run consecutive trunk blocks of one structure as one scanned layer: compiled once, and sharded weights "
    "gathered a layer at a time (false: unrolled, each block its own code).",
  )
  trainable: Literal["all", "mtp"] = _field(
    "all",
    "What the optimizer trains: all parameters, or only the MTP modules (model.mtp), the trunk, embedding and "
    "head frozen and run forward only (a drafter for a model as it is; no trunk gradients or optimizer state).",
  )
  loss_chunk_len: int = _field(0, "Sequence chunk for output-head + CE (0: whole sequence).", ge=0)
  attention_chunk_len: int = _field(
    0,
    "Queries per attention block with model.attention.impl xla: float32 scores exist for this many at a time "
    "(0: whole sequence). The fused kernels hold no scores and ignore it.",
    ge=0,
  )
  progress_bar: bool = _field(True, "Show a progress bar on the terminal.")
  eval_every: int = _field(
    0,
    "Evaluate on the sources' held-out splits every this many steps: loss, accuracy and agreement with the main "
    "model per MTP depth, and speculative acceptance (0: never).",
    ge=0,
  )
  eval_batches: int = _field(8, "Batches of train.batch_size per evaluation (the same ones every time).", ge=1)
  eval_spec_prompts: int = _field(
    4,
    "Held-out prompts (the first rows of the first eval batch) decoded greedily at each evaluation, the MTP "
    "depths drafting, to measure speculative acceptance (0: off; nothing to draft with model.mtp.depth=0).",
    ge=0,
  )
  eval_spec_prompt_len: int = _field(
    0,
    "Tokens per speculative prompt, at most: each is cut at its row's first document end (0: data.seq_len / 2).",
    ge=0,
  )
  eval_spec_tokens: int = _field(
    32, "New tokens decoded per speculative prompt (prompt + these fit data.seq_len).", ge=2
  )
  max_bad_steps: int = _field(
    5, "Stop after this many consecutive steps with a non-finite loss or gradient (each one is skipped).", ge=1
  )
  inject_nan_at_steps: list[int] = _field(
    [], "For testing the non-finite guard: make the loss and gradients of these steps (1-based) NaN."
  )


class CheckpointConfig(_Section):
  enabled: bool = _field(True, "Save and resume checkpoints in train.workdir/checkpoints.")
  every: int = _field(100, "Save every this many steps (and always at the end and on preemption).", ge=1)
  max_to_keep: int = _field(3, "Keep the latest this many checkpoints...", ge=1)
  keep_every: int = _field(0, "...and also every checkpoint whose step is a multiple of this (0: none).", ge=0)
  async_save: bool = _field(True, "Write checkpoints in the background while training continues.")
  restore_from: str | None = _field(
    None,
    "Start from this checkpoint: a step of train.workdir, or a path to a run, its checkpoints/ or one step.",
  )
  load_params_only: bool = _field(
    False, "With restore_from: take only the parameters and router biases, and start a new run at step 0."
  )
  strict: bool = _field(False, "Stop on a damaged latest checkpoint instead of falling back to an earlier one.")
  restore_data: bool = _field(
    True, "Restore the data position too (false: the data order starts over, e.g. after changing data.sources)."
  )

  @pydantic.field_validator("restore_from", mode="before")
  @classmethod
  def _step_number(cls, v):
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v  # `restore_from=400` parses as an int


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
    # The output head's logits. mesh.vocab_split adds fsdp where it pays (train/losses.py).
    "act_vocab": ["tensor"],
  }


class DcnConfig(_Section):
  data: int = _field(1, "Data-parallel ways across slices (-1: fill with the remaining slices).")
  fsdp: int = _field(1, "FSDP ways across slices.")
  sequence: int = _field(1, "Sequence-parallel ways across slices.")
  expert: int = _field(1, "Expert-parallel ways across slices.")
  tensor: int = _field(1, "Tensor-parallel ways across slices.")


class MeshConfig(_Section):
  """Axis sizes within a slice (ICI); `dcn` multiplies them across slices (multi-slice TPU,
  or processes where devices have no slice). Each axis's full size is ici * dcn."""

  data: int = _field(-1, "Data-parallel axis size within a slice (-1: fill with the remaining devices).")
  fsdp: int = _field(1, "Fully-sharded data-parallel axis size.")
  sequence: int = _field(1, "Sequence (context) parallel axis size: activations split along the sequence.")
  expert: int = _field(1, "Expert-parallel axis size.")
  tensor: int = _field(1, "Tensor-parallel axis size.")
  vocab_split: Literal["auto", True, False] = _field(
    "auto",
    "Split the output head's vocabulary over fsdp too (adds fsdp to rules.act_vocab, where it divides the "
    "vocabulary). auto: where the head holds at least a quarter of the blocks' parameters, where it measurably "
    "lowers the peak (benchmarks/RESULTS.md); not elsewhere, where it raised it.",
  )
  dcn: DcnConfig = DcnConfig()
  rules: dict[str, list[str]] = _field(
    _default_rules(),
    "Logical axis name -> mesh axes (the one sharding rules table); entries given override the defaults by name.",
  )

  @pydantic.field_validator("rules")
  @classmethod
  def _over_defaults(cls, rules: dict[str, list[str]]) -> dict[str, list[str]]:
    return {**_default_rules(), **rules}

  def ici_dcn(self, num_devices: int, num_slices: int = 1) -> tuple[dict[str, int], dict[str, int]]:
    """(ICI, DCN) axis sizes with -1 filled. With every DCN size 1 the ICI sizes tile all the
    devices; otherwise the DCN sizes tile the slices and the ICI sizes one slice. Raises
    ConfigError when they do not."""
    dcn = {a: getattr(self.dcn, a) for a in MESH_AXES}
    if all(s == 1 for s in dcn.values()):
      return _fill({a: getattr(self, a) for a in MESH_AXES}, num_devices, "mesh", "devices"), dcn
    dcn = _fill(dcn, num_slices, "mesh.dcn", "slice(s) present")
    if num_devices % num_slices:
      raise ConfigError(f"config error: mesh.dcn: {num_devices} devices do not split into {num_slices} equal slices")
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
      raise ConfigError(f"config error: {key}: fixed axes {fixed} ({known}-way) do not divide the {total} {what}")
    sizes = {**sizes, fill[0]: total // known}
  if math.prod(sizes.values()) != total:
    shown = {a: s for a, s in sizes.items() if s != 1} or sizes
    raise ConfigError(
      f"config error: {key}: axis sizes {shown} multiply to {math.prod(sizes.values())}, not the {total} {what}"
    )
  return sizes


class DistributedConfig(_Section):
  initialize: Literal["auto", "always", "never"] = _field(
    "auto",
    "Start jax.distributed: auto when a coordinator or process count is given here or in JAX_COORDINATOR_ADDRESS, "
    "or JAX detects a cluster (TPU pod, SLURM, Kubernetes); always; never.",
  )
  coordinator_address: str | None = _field(None, "host:port of process 0 (default: detected from the cluster).")
  num_processes: int | None = _field(None, "Processes in the job (default: detected).", ge=1)
  process_id: int | None = _field(None, "This process's index, 0-based (default: detected).", ge=0)
  local_device_ids: list[int] | None = _field(None, "Devices this process uses (default: all it sees).")
  initialization_timeout_s: int = _field(300, "Give up when the other processes have not joined after this.", ge=1)
  heartbeat_timeout_s: int = _field(100, "The coordinator declares a silent process dead after this.", ge=1)
  peer_timeout_s: float = _field(
    60.0,
    "Stop with an error when another process has sent no heartbeat for this long (it died or hangs); "
    "keep it below heartbeat_timeout_s so the error is ours, not a crash report (0: off).",
    ge=0,
  )
  step_timeout_s: float = _field(
    1800.0,
    "Stop with an error when no step (with its saving and evaluation) finishes for this long, e.g. because a "
    "collective hangs (0: wait forever).",
    ge=0,
  )
  cpu_collectives: Literal["gloo", "mpi"] = _field("gloo", "Cross-process collectives for the CPU backend.")


class Config(_Section):
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

  @pydantic.model_validator(mode="after")
  def _consistent(self) -> Config:
    for key, problem in _problems(self):
      raise ConfigError(f"config error: {key}: {problem}")
    return self


AUTO = "auto"


def _has_gcsfs() -> bool:
  import importlib.util

  return importlib.util.find_spec("gcsfs") is not None


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


def _problems(c: Config):
  """Yields (key, problem) for cross-field inconsistencies."""
  m, a, moe, mtp = c.model, c.model.attention, c.model.moe, c.model.mtp
  if m.first_k_dense > m.num_layers:
    yield "model.first_k_dense", f"{m.first_k_dense} exceeds model.num_layers ({m.num_layers})"
  if a.kind == "gqa":
    if a.num_heads % a.num_kv_heads:
      yield "model.attention.num_kv_heads", f"{a.num_kv_heads} does not divide num_heads ({a.num_heads})"
    if a.head_dim % 2:
      yield "model.attention.head_dim", f"{a.head_dim} must be even for RoPE"
    elif (rotary := int(a.head_dim * a.partial_rotary_factor)) % 2 or not rotary:
      why = f"rotates {rotary} of head_dim {a.head_dim}; RoPE needs an even, nonzero count"
      yield "model.attention.partial_rotary_factor", why
  elif a.qk_rope_head_dim % 2:
    yield "model.attention.qk_rope_head_dim", f"{a.qk_rope_head_dim} must be even for RoPE"
  if a.kind == "mla" and a.qk_norm:
    yield "model.attention.qk_norm", "gqa only: MLA already normalises its query and key/value latents"
  if moe.num_experts:
    if moe.top_k > moe.num_experts:
      yield "model.moe.top_k", f"{moe.top_k} exceeds model.moe.num_experts ({moe.num_experts})"
    if moe.num_experts % moe.n_group:
      yield "model.moe.n_group", f"{moe.n_group} does not divide num_experts ({moe.num_experts})"
    elif moe.topk_group > moe.n_group:
      yield "model.moe.topk_group", f"{moe.topk_group} exceeds n_group ({moe.n_group})"
    elif moe.top_k > moe.topk_group * (moe.num_experts // moe.n_group):
      yield "model.moe.top_k", f"{moe.top_k} exceeds the experts in {moe.topk_group} kept group(s)"
    elif moe.n_group > 1 and moe.num_experts // moe.n_group < 2:
      yield "model.moe.n_group", "groups need at least 2 experts each (scored by their top-2)"
    if c.mesh.expert > 0 and moe.num_experts % c.mesh.expert:
      yield "model.moe.num_experts", f"{moe.num_experts} is not divisible by mesh.expert ({c.mesh.expert})"
  if mtp.share_weights and mtp.kind != "sequential":
    yield "model.mtp.share_weights", "shares one sequential module over the depths; parallel heads each branch alone"
  if c.train.trainable == "mtp" and not mtp.depth:
    yield "train.trainable", "mtp trains the MTP modules, and model.mtp.depth is 0"
  if mtp.depth >= c.data.seq_len - 1:
    yield "model.mtp.depth", f"{mtp.depth} leaves no target in a sequence of data.seq_len={c.data.seq_len}"
  steps = [s for s, _ in mtp.loss_weight_schedule]
  if steps != sorted(set(steps)):
    yield "model.mtp.loss_weight_schedule", "steps must be strictly increasing"
  if m.dtype == "float32" and m.param_dtype == "bfloat16":
    yield "model.param_dtype", "bfloat16 parameters with float32 compute is not supported"
  if not c.data.sources:
    yield "data.sources", "empty: name at least one dataset"
  if any(s.path == STDLIB for s in c.data.sources):
    if m.vocab_size < 257:
      yield "model.vocab_size", f"{m.vocab_size} is below the 257 byte-level tokens of the stdlib source"
    if m.eos_id != 256:
      yield "model.eos_id", f"{m.eos_id} is not the byte-level end-of-document id 256 of the stdlib source"
  if m.eos_id >= m.vocab_size:
    yield "model.eos_id", f"{m.eos_id} is outside the vocabulary (model.vocab_size {m.vocab_size})"
  if c.checkpoint.load_params_only and not c.checkpoint.restore_from:
    yield "checkpoint.load_params_only", "needs checkpoint.restore_from (the run to take the parameters from)"
  if c.checkpoint.restore_from is not None and not c.checkpoint.restore_from.strip():
    yield "checkpoint.restore_from", "is empty"
  outputs = [("train.workdir", c.train.workdir), ("checkpoint.restore_from", c.checkpoint.restore_from or "")]
  for key, path in outputs:
    if "://" in path and not path.startswith("gs://"):  # pathlib would quietly make a directory named `s3:`
      yield key, f"{path}: runs write local paths or gs:// buckets"
    elif path.startswith("gs://") and not _has_gcsfs():
      yield key, f"{path}: gs:// needs gcsfs (pip install 'mtp-jax[gcs]')"
  for i, source in enumerate(c.data.sources):
    if "://" in source.path:  # ArrayRecord reads local files only
      yield (
        f"data.sources[{i}].path",
        f"{source.path} is a URL; training reads datasets from a file system (mount the bucket, e.g. with gcsfuse)",
      )
  accum, batch = c.train.grad_accum_steps, c.train.batch_size
  if accum == 0:
    yield "train.grad_accum_steps", "must be at least 1, or -1 for one sequence per device per microbatch"
  elif accum > 0 and batch % accum:
    yield "train.grad_accum_steps", f"{accum} does not divide train.batch_size ({batch})"
  if c.train.eval_every and c.train.eval_spec_prompts and mtp.depth:
    if c.train.eval_spec_prompts > batch:
      yield "train.eval_spec_prompts", f"{c.train.eval_spec_prompts} exceeds the rows of one eval batch ({batch})"
    prompt = spec_prompt_len(c.train, c.data)
    if prompt + c.train.eval_spec_tokens > c.data.seq_len:
      yield (
        "train.eval_spec_tokens",
        f"{prompt}-token prompts + {c.train.eval_spec_tokens} new tokens exceed data.seq_len ({c.data.seq_len}); "
        "lower it or train.eval_spec_prompt_len, or set train.eval_spec_prompts=0",
      )
  for key in ("loss_chunk_len", "attention_chunk_len"):
    chunk = getattr(c.train, key)
    if chunk and c.data.seq_len % chunk:
      yield f"train.{key}", f"{chunk} does not divide data.seq_len ({c.data.seq_len})"
  for key, section in [("mesh", c.mesh), ("mesh.dcn", c.mesh.dcn)]:
    sizes = {ax: getattr(section, ax) for ax in MESH_AXES}
    if any(s == 0 or s < -1 for s in sizes.values()):
      yield key, f"axis sizes must be positive or -1, got {sizes}"
    if list(sizes.values()).count(-1) > 1:
      yield key, "at most one axis may be -1"
  if moe.num_experts and moe.dispatch == "all_to_all" and moe.mode != "capacity":
    yield "model.moe.dispatch", "all_to_all sends capacity buffers: it needs model.moe.mode=capacity"
  if moe.num_experts and moe.dispatch == "ragged_all_to_all" and moe.mode != "dropless":
    yield "model.moe.dispatch", "ragged_all_to_all is dropless: it needs model.moe.mode=dropless"
  d = c.distributed
  if d.num_processes is not None and d.process_id is not None and d.process_id >= d.num_processes:
    yield "distributed.process_id", f"{d.process_id} is not below distributed.num_processes ({d.num_processes})"
  for name, axes in c.mesh.rules.items():
    bad = [ax for ax in axes if ax not in MESH_AXES]
    if bad:
      yield f"mesh.rules.{name}", f"unknown mesh axis {bad[0]!r} (axes: {', '.join(MESH_AXES)})"
    elif len(set(axes)) != len(axes):
      yield f"mesh.rules.{name}", "names a mesh axis twice"


# ----------------------------------------------------------------------------- loading


def _format_error(err: pydantic.ValidationError) -> str:
  e = err.errors()[0]
  key = ".".join(str(p) for p in e["loc"])
  if e["type"] == "extra_forbidden":
    return f"config error: {key}: unknown key"
  if isinstance(e.get("ctx", {}).get("error"), ConfigError):
    return str(e["ctx"]["error"])
  return f"config error: {key}: {e['msg']} (got {e.get('input')!r})"


def _set_dotted(tree: dict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = tree
  for i, p in enumerate(parents):
    child = node.setdefault(p, {})
    if not isinstance(child, dict):
      raise ConfigError(f"config error: {'.'.join(parents[: i + 1])}: is a value, not a section")
    node = child
  node[leaf] = value


def parse_overrides(args: list[str]) -> dict:
  """`a.b=1 c=x` -> nested dict; values are parsed as YAML scalars or lists."""
  tree: dict = {}
  for arg in args:
    key, sep, raw = arg.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
      raise ConfigError(f"config error: {arg!r}: overrides take the form section.key=value")
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
    raise ConfigError(_format_error(err)) from None


def load(path: str | pathlib.Path | None, overrides: list[str] = ()) -> Config:
  """Reads a YAML file (or the defaults when path is None) and applies dotted overrides."""
  tree: dict = {}
  if path is not None:
    p = pathlib.Path(path)
    if not p.is_file():
      raise ConfigError(f"config error: {path}: no such file")
    try:
      tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
      mark = getattr(err, "problem_mark", None)
      where = f" line {mark.line + 1}" if mark else ""
      raise ConfigError(f"config error: {path}{where}: not valid YAML") from None
    if not isinstance(tree, dict):
      raise ConfigError(f"config error: {path}: top level must be a mapping of sections")
  return from_dict(_merge(tree, parse_overrides(list(overrides))))


def to_yaml(cfg: Config) -> str:
  return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
