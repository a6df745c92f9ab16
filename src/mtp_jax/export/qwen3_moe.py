"""The Hugging Face Qwen3-MoE layout (`Qwen3MoeForCausalLM`); MTP modules beside it in mtp.safetensors.

Tensor names are those of the published checkpoints (Qwen/Qwen3-30B-A3B): experts one by one as
`mlp.experts.{e}.{gate,up,down}_proj` (transformers fuses them as it loads), dense layers named in
`mlp_only_layers`. The maths is ours already, so no tensor is reordered: RMSNorm everywhere with
one eps, each query and key head RMS-normed over head_dim before RoPE (`model.attention.qk_norm`),
RoPE in the same rotate-half order, softmax over all experts, top-k, renormalised when
norm_topk_prob, no scaling, groups, selection bias or shared experts. `problems()` refuses the
settings outside that; `model_config()` reads a config.json back into our settings (import).

Qwen3-MoE has no MTP. Sequential MTP modules (model.mtp.depth > 0) go to `mtp.safetensors` in the
same directory, outside model.safetensors.index.json so Hugging Face loaders never see them, and
config.json records their count as `num_nextn_predict_layers` (transformers ignores it). Module k
(1-based) is `model.layers.{num_hidden_layers + k - 1}`, named as DeepSeek-V3 names its MTP layers:

  enorm.weight, hnorm.weight   RMSNorm scales for Emb(t_{i+k}) and for h^{k-1}
  eh_proj.weight               [D, 2D]: x = eh_proj @ [enorm(Emb(t_{i+k})); hnorm(h^{k-1})] (DeepSeek-V3 eq. 21)
  input_layernorm.weight, self_attn.*, post_attention_layernorm.weight, mlp.*
                               one Qwen3-MoE decoder layer: h^k = layer(x) (eq. 22); its mlp is dense
                               when its index is in mlp_only_layers
  shared_head.norm.weight      logits of t_{i+k+1} = lm_head(RMSNorm(h^k)) (eq. 23)

h^0 is the main model's final-normed hidden state; h^k (k >= 1) a module's layer output before its
norm (model/MTP.md). Position i reads token i + k; the embedding and the head are the main model's
(`model.embed_tokens`, `lm_head` or the tied embedding), not copied into the file.
"""

from __future__ import annotations

from mtp_jax.config import Config, ModelConfig
from mtp_jax.data.manifest import TokenizerInfo
from mtp_jax.export import ExportError, common_config, common_model, rope_from_json
from mtp_jax.export.layout import SAME, Layout, Linear, Tensor
from mtp_jax.model.transformer import stack_of

ARCHITECTURE = "Qwen3MoeForCausalLM"
MTP_FILE = "mtp.safetensors"
# What Qwen3MoeConfig (transformers 5.23) takes for a key model_config() reads when config.json
# leaves it out, so both read a file alike.
DEFAULTS = {
  "vocab_size": 151936,
  "hidden_size": 2048,
  "intermediate_size": 6144,
  "moe_intermediate_size": 768,
  "num_hidden_layers": 24,
  "num_attention_heads": 32,
  "num_key_value_heads": 4,
  "head_dim": None,  # the modeling code then takes hidden_size // num_attention_heads
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "eos_token_id": None,
  "hidden_act": "silu",
  "rms_norm_eps": 1e-6,
  "initializer_range": 0.02,
  "tie_word_embeddings": False,
  "attention_bias": False,
  "use_sliding_window": False,
  "decoder_sparse_step": 1,
  "mlp_only_layers": None,
  "norm_topk_prob": False,
  "rope_theta": 10000.0,  # what rope_parameters defaults to
  "rope_scaling": None,
  "rope_parameters": None,
  "num_nextn_predict_layers": 0,  # ours: MTP modules in mtp.safetensors
}


def problems(m: ModelConfig):
  """Yields (setting, why) for each model setting the Qwen3-MoE layout cannot express."""
  if m.attention.kind != "gqa":
    yield f"model.attention.kind={m.attention.kind}", "Qwen3-MoE attention is grouped-query (deepseek_v3 takes MLA)"
  elif not m.attention.qk_norm:
    yield "model.attention.qk_norm=false", "Qwen3 always RMS-normalises each query and key head"
  elif m.attention.qkv_bias:
    yield "model.attention.qkv_bias=true", "Qwen3's attention projections have no bias"
  elif m.attention.partial_rotary_factor != 1:
    yield f"model.attention.partial_rotary_factor={m.attention.partial_rotary_factor:g}", "Qwen3 rotates every dim"
  if m.mtp.depth and m.mtp.kind != "sequential":
    yield f"model.mtp.kind={m.mtp.kind}", "parallel heads branch inside the trunk; sequential modules go beside it"
  moe = m.moe
  if moe.num_experts:
    if moe.score_func != "softmax":
      yield f"model.moe.score_func={moe.score_func}", "the Qwen3-MoE router scores by softmax over all experts"
    if moe.num_shared_experts:
      yield f"model.moe.num_shared_experts={moe.num_shared_experts}", "Qwen3-MoE has no shared experts"
    if moe.routed_scaling_factor != 1:
      yield f"model.moe.routed_scaling_factor={moe.routed_scaling_factor:g}", "Qwen3-MoE gates are not scaled"
    if moe.n_group > 1:
      yield f"model.moe.n_group={moe.n_group}", "Qwen3-MoE routing has no expert groups"
    if moe.bias_update_rate:
      yield (
        f"model.moe.bias_update_rate={moe.bias_update_rate:g}",
        "the Qwen3-MoE router has no selection bias (DeepSeek-V3 eq. 16)",
      )


def check(m: ModelConfig) -> None:
  for setting, why in problems(m):
    raise ExportError(f"--format qwen3_moe cannot express {setting}: {why}")


def serving_notes(m: ModelConfig) -> list[str]:
  """What a serving runtime will refuse in this export: nothing known for this layout."""
  return []


def _dense(m: ModelConfig, layer: int) -> bool:
  """Whether HF layer `layer` (trunk, then MTP modules) has a dense FFN."""
  if not m.moe.num_experts:
    return True
  return layer < m.first_k_dense if layer < m.num_layers else not m.mtp.use_moe


def config_json(cfg: Config, dtype: str, tok: TokenizerInfo | None) -> dict:
  """config.json: every key Qwen3MoeConfig reads except the training-only router_aux_loss_coef and
  output_router_logits, plus what the published files carry (rope_theta beside rope_parameters for
  readers older than transformers 5, max_window_layers) and num_nextn_predict_layers."""
  m, a, moe = cfg.model, cfg.model.attention, cfg.model.moe
  return {
    "architectures": [ARCHITECTURE],
    "model_type": "qwen3_moe",
    "num_key_value_heads": a.num_kv_heads,
    "head_dim": a.head_dim,
    "num_experts": moe.num_experts,
    "num_experts_per_tok": moe.top_k,
    "norm_topk_prob": moe.norm_topk_prob,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [i for i in range(m.num_layers + m.mtp.modules) if _dense(m, i)],
    "use_sliding_window": False,
    "sliding_window": None,
    "max_window_layers": m.num_layers,
    **common_config(cfg, dtype, tok),
  }


def model_config(hf: dict) -> dict:
  """Our model settings (a nested dict of ModelConfig fields) from a Qwen3-MoE config.json.
  Raises ExportError naming the first key whose value our models cannot express."""
  c = {**DEFAULTS, **hf}

  def refuse(key: str, why: str):
    return ExportError(f"config.json {key}={c[key]!r}: {why}")

  if c["attention_bias"]:
    raise refuse("attention_bias", "our attention projections have no bias")
  if c["use_sliding_window"]:
    raise refuse("use_sliding_window", "our attention sees the whole causal context")
  if c["hidden_act"] != "silu":
    raise refuse("hidden_act", "our FFNs are SwiGLU (silu)")
  theta, scaling = rope_from_json(c, DEFAULTS["rope_theta"])
  eos = c["eos_token_id"]
  if isinstance(eos, list) and len(eos) == 1:
    eos = eos[0]
  if not isinstance(eos, int):
    raise refuse("eos_token_id", "our models need one end-of-document token")
  layers, depth, experts = c["num_hidden_layers"], c["num_nextn_predict_layers"], c["num_experts"]
  only = set(c["mlp_only_layers"] or [])
  dense = [not experts or i in only or (i + 1) % c["decoder_sparse_step"] != 0 for i in range(layers + depth)]
  first_k_dense = dense.index(False) if False in dense[:layers] else layers
  if any(dense[first_k_dense:layers]):
    key = "mlp_only_layers" if c["decoder_sparse_step"] == 1 else "decoder_sparse_step"
    raise refuse(key, "our dense layers are the first ones, before every MoE layer")
  if len(set(dense[layers:])) > 1:
    raise refuse("mlp_only_layers", "our MTP modules are all dense or all MoE")
  return {
    **common_model(c.__getitem__),
    "eos_id": eos,
    "first_k_dense": first_k_dense,
    "attention": {
      "kind": "gqa",
      "num_heads": c["num_attention_heads"],
      "num_kv_heads": c["num_key_value_heads"],
      "head_dim": c["head_dim"] or c["hidden_size"] // c["num_attention_heads"],
      "qk_norm": True,
      "rope_theta": theta,
      "rope_scaling": scaling,
    },
    "moe": {
      "num_experts": experts,
      "top_k": c["num_experts_per_tok"],
      "expert_d_ff": c["moe_intermediate_size"],
      "num_shared_experts": 0,
      "score_func": "softmax",
      "norm_topk_prob": c["norm_topk_prob"],
      "routed_scaling_factor": 1.0,
      "n_group": 1,
      "topk_group": 1,
      "bias_update_rate": 0.0,
    },
    "mtp": {"kind": "sequential", "depth": depth, "use_moe": not experts or not any(dense[layers:])},
  }


def _block(
  m: ModelConfig, hf: str, ours: str, dense: bool, router_bias: str, file: str | None, layer: int | None = None
) -> list[Tensor]:
  """One decoder layer: HF layer prefix `hf`, our Block prefix `ours` (under params.), block
  `layer` of it when it is a stack of trunk blocks."""
  rows: list[tuple[str, str, Layout]] = [
    ("input_layernorm.weight", "attn_norm.scale", SAME),
    ("self_attn.q_proj.weight", "attn.wq", Linear()),  # [D, H, K] -> [H*K, D]
    ("self_attn.k_proj.weight", "attn.wk", Linear()),  # [D, G, K] -> [G*K, D]
    ("self_attn.v_proj.weight", "attn.wv", Linear()),
    ("self_attn.q_norm.weight", "attn.q_norm.scale", SAME),
    ("self_attn.k_norm.weight", "attn.k_norm.scale", SAME),
    ("self_attn.o_proj.weight", "attn.wo", Linear(in_axes=2)),  # [H, K, D] -> [D, H*K]
    ("post_attention_layernorm.weight", "ffn_norm.scale", SAME),
  ]
  if dense:
    rows += [(f"mlp.{p}_proj.weight", f"ffn.w_{p}", Linear()) for p in ("gate", "up", "down")]
  else:
    rows += [("mlp.gate.weight", "ffn.router.kernel", Linear())]  # [D, E] -> [E, D]
  out = [Tensor(f"{hf}.{h}", f"params.{ours}.{o}", layout, layer=layer, file=file) for h, o, layout in rows]
  if not dense:
    out.append(Tensor(f"selection bias in {hf}.mlp.gate", f"{router_bias}.ffn.router.bias", layer=layer, zero=True))
    out += [  # stacked [E, in, out] -> one [out, in] Linear per expert
      Tensor(
        f"{hf}.mlp.experts.{e}.{p}_proj.weight",
        f"params.{ours}.ffn.experts.w_{p}",
        Linear(),
        layer=layer,
        expert=e,
        file=file,
      )
      for p in ("gate", "up", "down")
      for e in range(m.moe.num_experts)
    ]
  return out


def mtp_layers(m: ModelConfig) -> list[str]:
  """Where the MTP modules are: module k at layer num_hidden_layers + k - 1 of mtp.safetensors."""
  return [f"{MTP_FILE}:model.layers.{m.num_layers + k}" for k in range(m.mtp.modules)]


def tensors(m: ModelConfig) -> list[Tensor]:
  """Every tensor of the exported checkpoint and where it comes from, in our leaves' order."""
  out = [
    Tensor("model.embed_tokens.weight", "params.embed.table"),
    Tensor("model.norm.weight", "params.final_norm.scale"),
  ]
  if not m.tie_embeddings:
    out.append(Tensor("lm_head.weight", "params.head", Linear()))  # [D, V] -> [V, D]
  for i in range(m.num_layers):
    r, j = stack_of(m, i)
    out += _block(m, f"model.layers.{i}", f"layers.{r}", _dense(m, i), f"router_bias.layers.{r}", None, j)
  for k in range(m.mtp.modules):  # module k + 1 (DeepSeek-V3 eqs. 21-23)
    i = m.num_layers + k
    hf, ours = f"model.layers.{i}", f"mtp.{k}"
    out += [
      Tensor(f"{hf}.enorm.weight", f"params.{ours}.enorm.scale", file=MTP_FILE),
      Tensor(f"{hf}.hnorm.weight", f"params.{ours}.hnorm.scale", file=MTP_FILE),
      Tensor(f"{hf}.eh_proj.weight", f"params.{ours}.eh_proj", Linear(), file=MTP_FILE),  # [2D, D] -> [D, 2D]
      Tensor(f"{hf}.shared_head.norm.weight", f"params.{ours}.norm.scale", file=MTP_FILE),
    ]
    out += _block(m, hf, f"{ours}.block", _dense(m, i), f"router_bias.{ours}.block", MTP_FILE)
  return out
