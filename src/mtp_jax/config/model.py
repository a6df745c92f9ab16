"""The model's sections: attention, mixture of experts, multi-token prediction, the trunk."""

from __future__ import annotations

from typing import Literal

from mtp_jax.config.base import Section, field


class RopeScaling(Section):
  """Hugging Face's `rope_scaling` keys, for YaRN (DeepSeek-V3: factor 40 over 4096 positions)."""

  type: Literal["yarn"] = field("yarn", "The scaling method: yarn (Peng et al. 2023).")
  factor: float = field(..., "How many times the original context the frequencies are stretched to.", ge=1)
  original_max_position_embeddings: int = field(..., "The context the model was pretrained on.", ge=1)
  beta_fast: float = field(32.0, "Dimensions rotating more often than this over that context are kept.", gt=0)
  beta_slow: float = field(1.0, "Dimensions rotating less often than this are stretched by factor.", gt=0)
  mscale: float = field(1.0, "Scales log(factor) in the attention temperature.", ge=0)
  mscale_all_dim: float = field(
    0.0,
    "With mscale, the temperature's divisor; for MLA also the softmax scale's correction "
    "(DeepSeek-V3: mscale(factor, mscale_all_dim)^2). 0: not set.",
    ge=0,
  )
  truncate: bool = field(True, "Round the ramp's ends to whole dimensions (as DeepSeek-V3 and Hugging Face).")


class AttentionConfig(Section):
  kind: Literal["gqa", "mla"] = field("gqa", "gqa: grouped-query attention; mla: DeepSeek Multi-head Latent Attention.")
  num_heads: int = field(4, "Query heads.", ge=1)
  num_kv_heads: int = field(2, "gqa: key/value heads (divides num_heads).", ge=1)
  head_dim: int = field(16, "gqa: per-head dimension (even, for RoPE).", ge=2)
  qk_norm: bool = field(False, "gqa: RMS-normalise each query and key head before RoPE (Qwen3).")
  qkv_bias: bool = field(False, "gqa: biases on the query, key and value projections (GLM-4.5, Qwen2).")
  partial_rotary_factor: float = field(
    1.0, "gqa: the share of each head's dimensions RoPE rotates, its first ones (GLM-4.5: 0.5).", gt=0, le=1
  )
  q_lora_rank: int = field(0, "mla: rank of the compressed query (0: full-rank query projection).", ge=0)
  kv_lora_rank: int = field(32, "mla: rank of the compressed key/value latent.", ge=1)
  qk_nope_head_dim: int = field(16, "mla: per-head query/key dims without RoPE.", ge=1)
  qk_rope_head_dim: int = field(8, "mla: decoupled RoPE dims (key shared across heads; even).", ge=2)
  v_head_dim: int = field(16, "mla: per-head value dimension.", ge=1)
  absorb: bool = field(
    True,
    "mla: decoding steps attend over the cached latent, W_uk folded into the query and W_uv into the output "
    "(DeepSeek-V3 absorbed attention); false: up-project the whole cache every step (the reference). "
    "The prefill and training always up-project.",
  )
  rope_theta: float = field(10000.0, "RoPE base frequency.", gt=0)
  rope_scaling: RopeScaling | None = field(
    None, "YaRN context extension (Hugging Face's rope_scaling keys), e.g. rope_scaling.factor=4 (null: plain RoPE)."
  )
  impl: Literal["auto", "xla", "splash", "cudnn"] = field(
    "auto",
    "Training's attention kernel. auto: splash on TPU, cudnn on GPU, xla elsewhere or where those cannot serve "
    "the step; xla: einsums with a materialised mask (the reference); splash: Pallas splash attention (TPU; off "
    "TPU in Pallas interpret mode, slow, for tests; data.seq_len a multiple of 128); cudnn: cuDNN flash attention "
    "(GPU, bfloat16, heads up to 256 wide on Hopper). Decoding always runs xla.",
  )

  def problems(self):
    if self.kind == "gqa":
      if self.num_heads % self.num_kv_heads:
        yield "model.attention.num_kv_heads", f"{self.num_kv_heads} does not divide num_heads ({self.num_heads})"
      if self.head_dim % 2:
        yield "model.attention.head_dim", f"{self.head_dim} must be even for RoPE"
      elif (rotary := int(self.head_dim * self.partial_rotary_factor)) % 2 or not rotary:
        why = f"rotates {rotary} of head_dim {self.head_dim}; RoPE needs an even, nonzero count"
        yield "model.attention.partial_rotary_factor", why
    else:
      if self.qk_rope_head_dim % 2:
        yield "model.attention.qk_rope_head_dim", f"{self.qk_rope_head_dim} must be even for RoPE"
      if self.qk_norm:
        yield "model.attention.qk_norm", "gqa only: MLA already normalises its query and key/value latents"


class MoEConfig(Section):
  num_experts: int = field(8, "Routed experts per MoE layer (0: every layer is a dense FFN).", ge=0)
  top_k: int = field(2, "Experts chosen per token.", ge=1)
  expert_d_ff: int = field(64, "Hidden width of each routed and shared expert.", ge=1)
  num_shared_experts: int = field(1, "Always-active shared experts (DeepSeek-V3: 1).", ge=0)
  score_func: Literal["softmax", "sigmoid"] = field("sigmoid", "Router affinity function.")
  norm_topk_prob: bool = field(True, "Normalise the selected gate weights to sum to 1.")
  routed_scaling_factor: float = field(1.0, "Multiplier on routed gate weights (DeepSeek-V3: 2.5).", gt=0)
  n_group: int = field(1, "Expert groups for group-limited routing (1: off).", ge=1)
  topk_group: int = field(1, "Groups kept per token, ranked by the sum of their top-2 scores.", ge=1)
  mode: Literal["dropless", "capacity"] = field(
    "dropless",
    "dropless: sort + grouped matmuls (model.moe.kernel); capacity: fixed buffers, overflow dropped (not causal).",
  )
  kernel: Literal["auto", "ragged_dot", "blocked", "megablox", "mosaic_gpu"] = field(
    "auto",
    "dropless: what runs each expert over its rows. ragged_dot: jax.lax.ragged_dot, left to the compiler; "
    "blocked: rows padded into blocks of one expert, a loop; megablox: Pallas grouped matmuls (TPU); mosaic_gpu: "
    "JAX's Pallas Mosaic GPU grouped matmuls (Hopper, bfloat16); auto: megablox on TPU, blocked on CPU and GPU, "
    "but ragged_dot for a GPU's calls of up to 128 rows (decoding), else ragged_dot.",
  )
  capacity_factor: float = field(
    1.25,
    "capacity mode: buffer slots per expert = factor * tokens * top_k / experts, counted per device (its own "
    "tokens; the whole microbatch only with dispatch gspmd), so what overflows can change with the device count.",
    gt=0,
  )
  balance_loss_weight: float = field(1e-4, "Sequence-wise balance loss alpha (DeepSeek-V3 eq. 17; 0: off).", ge=0)
  z_loss_weight: float = field(0.0, "Router z-loss weight (0: off).", ge=0)
  bias_update_rate: float = field(1e-3, "Aux-loss-free bias step gamma (DeepSeek-V3 eq. 16; 0: off).", ge=0)
  dispatch: Literal["auto", "all_to_all", "ragged_all_to_all", "gspmd"] = field(
    "auto",
    "How tokens reach experts sharded over the expert mesh axis (with no such axis each device computes its own "
    "tokens, whatever is asked but gspmd). all_to_all: capacity buffers, every backend (mode: capacity); "
    "ragged_all_to_all: dropless, GPU and TPU only (mode: dropless); gspmd: the whole microbatch in one program, "
    "the compiler moves the tokens; auto: all_to_all in capacity mode, else ragged_all_to_all where the backend "
    "has it, else gspmd.",
  )
  ragged_buffer_factor: float = field(
    0.0,
    "ragged_all_to_all: the rows one device can receive, as a multiple of the rows it sends (what it receives "
    "when routing is balanced); on overflow every source device keeps the same share of the rows it sends there "
    "and the rest are dropped. 0: room for the worst case (every row to one device), so nothing drops.",
    ge=0,
  )

  def problems(self):
    if not self.num_experts:
      return
    if self.top_k > self.num_experts:
      yield "model.moe.top_k", f"{self.top_k} exceeds model.moe.num_experts ({self.num_experts})"
    if self.num_experts % self.n_group:
      yield "model.moe.n_group", f"{self.n_group} does not divide num_experts ({self.num_experts})"
    elif self.topk_group > self.n_group:
      yield "model.moe.topk_group", f"{self.topk_group} exceeds n_group ({self.n_group})"
    elif self.top_k > self.topk_group * (self.num_experts // self.n_group):
      yield "model.moe.top_k", f"{self.top_k} exceeds the experts in {self.topk_group} kept group(s)"
    elif self.n_group > 1 and self.num_experts // self.n_group < 2:
      yield "model.moe.n_group", "groups need at least 2 experts each (scored by their top-2)"
    if self.dispatch == "all_to_all" and self.mode != "capacity":
      yield "model.moe.dispatch", "all_to_all sends capacity buffers: it needs model.moe.mode=capacity"
    if self.dispatch == "ragged_all_to_all" and self.mode != "dropless":
      yield "model.moe.dispatch", "ragged_all_to_all is dropless: it needs model.moe.mode=dropless"


class MTPConfig(Section):
  kind: Literal["sequential", "parallel"] = field(
    "sequential", "sequential: DeepSeek-V3 modules; parallel: Gloeckle et al. heads."
  )
  depth: int = field(1, "Extra future tokens predicted (0 turns MTP off).", ge=0)
  loss_weight: float = field(0.3, "lambda: weight of the mean MTP loss (DeepSeek-V3 eq. 25).", ge=0)
  loss_weight_schedule: list[tuple[int, float]] = field(
    [], "Step schedule: [[from_step, weight], ...] overriding loss_weight from each step on."
  )
  use_moe: bool = field(True, "MTP blocks use an MoE FFN when the model has experts (as DeepSeek-V3).")
  share_weights: bool = field(
    False,
    "sequential: one module applied at every depth, trained on all depth losses (Nemotron 3 Super's shared MTP "
    "head, Megatron's repeated layer); exported as one NextN layer, decoding drafts depth tokens by reusing it.",
  )

  @property
  def modules(self) -> int:
    """MTP modules stored: one when they share weights, else one per depth."""
    return min(self.depth, 1) if self.share_weights else self.depth

  def problems(self):
    if self.share_weights and self.kind != "sequential":
      yield "model.mtp.share_weights", "shares one sequential module over the depths; parallel heads each branch alone"
    steps = [s for s, _ in self.loss_weight_schedule]
    if steps != sorted(set(steps)):
      yield "model.mtp.loss_weight_schedule", "steps must be strictly increasing"


class ModelConfig(Section):
  vocab_size: int = field(
    320,
    "Vocabulary size, at least the tokenizer's. auto (what a config file leaves out means): the first data "
    "source's tokenizer's, rounded up to a multiple of 64 (320 for the stdlib corpus's 257 byte-level tokens).",
    ge=2,
  )
  eos_id: int = field(
    256, "End-of-document token id; must match the data's tokenizer. auto (or left out): the first source's.", ge=0
  )
  d_model: int = field(64, "Model (residual) width.", ge=1)
  num_layers: int = field(2, "Transformer blocks in the trunk.", ge=1)
  first_k_dense: int = field(1, "Leading blocks with a dense FFN; the rest use MoE.", ge=0)
  d_ff: int = field(128, "Hidden width of the dense SwiGLU FFN.", ge=1)
  norm_eps: float = field(1e-6, "RMSNorm epsilon.", gt=0)
  init_std: float = field(0.02, "Std of the normal initialiser for weights.", gt=0)
  tie_embeddings: bool = field(False, "Use the embedding matrix as the output head.")
  dtype: Literal["float32", "bfloat16"] = field("float32", "Compute dtype.")
  param_dtype: Literal["float32", "bfloat16"] = field("float32", "Parameter storage dtype.")
  attention: AttentionConfig = AttentionConfig()
  moe: MoEConfig = MoEConfig()
  mtp: MTPConfig = MTPConfig()

  def problems(self):
    if self.first_k_dense > self.num_layers:
      yield "model.first_k_dense", f"{self.first_k_dense} exceeds model.num_layers ({self.num_layers})"
    if self.dtype == "float32" and self.param_dtype == "bfloat16":
      yield "model.param_dtype", "bfloat16 parameters with float32 compute is not supported"
    if self.eos_id >= self.vocab_size:
      yield "model.eos_id", f"{self.eos_id} is outside the vocabulary (model.vocab_size {self.vocab_size})"
