"""The Hugging Face GLM-4.5 layout (`Glm4MoeForCausalLM`), MTP modules included.

GLM-4.5 is DeepSeek-V3's layout with grouped-query attention: the same names for the MoE layers
(a sigmoid router with `e_score_correction_bias`, expert groups, shared experts, scaled gates),
the dense first layers and the MTP module k at `model.layers.{num_hidden_layers + k - 1}`
(`enorm`, `hnorm`, `eh_proj`, `shared_head.{norm,head}`, an `embed_tokens` copy; vLLM's
`glm4_moe_mtp` reads it, transformers skips it); its attention is `q_proj`/`k_proj`/`v_proj` with
biases (`attention_bias`), optional per-head `q_norm`/`k_norm` (`use_qk_norm`), `o_proj`, and RoPE
rotating the first `partial_rotary_factor` of each head in rotate-half order (ours: no reordering).
`rms_norm_eps` is every norm's. The tables are `deepseek_v3.tensors` with these attention rows.
"""

from __future__ import annotations

from mtp_jax.config import Config, ModelConfig
from mtp_jax.data.manifest import TokenizerInfo
from mtp_jax.export import ExportError, common_config, common_model, deepseek_v3, rope_from_json
from mtp_jax.export.layout import FLAT, SAME, Layout, Linear, Tensor

ARCHITECTURE = "Glm4MoeForCausalLM"


def problems(m: ModelConfig):
  """Yields (setting, why) for each model setting the GLM-4.5 layout cannot express."""
  if m.attention.kind != "gqa":
    yield f"model.attention.kind={m.attention.kind}", "GLM-4.5 attention is grouped-query (deepseek_v3 takes MLA)"
  yield from deepseek_v3.moe_problems(m, "GLM-4.5")


def check(m: ModelConfig) -> None:
  for setting, why in problems(m):
    raise ExportError(f"--format glm4_moe cannot express {setting}: {why}")


def serving_notes(m: ModelConfig) -> list[str]:
  """What a serving runtime will refuse in this export: nothing known for this layout."""
  return []


def config_json(cfg: Config, dtype: str, tok: TokenizerInfo | None) -> dict:
  """config.json: every key Glm4MoeConfig reads except the training-only output_router_logits."""
  a = cfg.model.attention
  out = {
    "architectures": [ARCHITECTURE],
    "model_type": "glm4_moe",
    "num_key_value_heads": a.num_kv_heads,
    "head_dim": a.head_dim,
    "partial_rotary_factor": a.partial_rotary_factor,
    "use_qk_norm": a.qk_norm,
    **deepseek_v3.moe_json(cfg.model),
    **common_config(cfg, dtype, tok),
    "attention_bias": a.qkv_bias,
  }
  out["rope_parameters"]["partial_rotary_factor"] = a.partial_rotary_factor
  return out


DEFAULTS = {  # what a config.json may leave out: transformers' Glm4MoeConfig (5.23)
  "vocab_size": 151552,
  "hidden_size": 4096,
  "intermediate_size": 10944,
  "num_hidden_layers": 46,
  "num_attention_heads": 96,
  "num_key_value_heads": 8,
  "hidden_act": "silu",
  "initializer_range": 0.02,
  "rms_norm_eps": 1e-5,
  "tie_word_embeddings": False,
  "attention_bias": False,
  "moe_intermediate_size": 1408,
  "num_experts_per_tok": 8,
  "n_shared_experts": 1,
  "n_routed_experts": 128,
  "routed_scaling_factor": 1.0,
  "n_group": 1,
  "topk_group": 1,
  "first_k_dense_replace": 1,
  "norm_topk_prob": True,
  "use_qk_norm": False,
  "partial_rotary_factor": 0.5,
  "num_nextn_predict_layers": 1,
  "rope_theta": 10000.0,
  "eos_token_id": None,
}


def model_config(hf: dict) -> dict:
  """Our model settings from a GLM-4.5 config.json: the inverse of `config_json`. Raises
  ExportError naming the first key our model cannot express."""
  c = {**DEFAULTS, **hf}
  if c["hidden_act"] != "silu":
    raise ExportError(f"config.json hidden_act={c['hidden_act']!r}: our FFNs are SwiGLU (silu)")
  theta, scaling = rope_from_json(c, DEFAULTS["rope_theta"])
  params = c.get("rope_parameters") or {}
  eos = c["eos_token_id"]
  if isinstance(eos, list):
    eos = eos[0]  # we end documents with one token
  layers, depth, dense = c["num_hidden_layers"], c["num_nextn_predict_layers"], c["first_k_dense_replace"]
  heads = c["num_attention_heads"]
  model = {
    **common_model(c.__getitem__),
    "first_k_dense": min(dense, layers),
    "attention": {
      "kind": "gqa",
      "num_heads": heads,
      "num_kv_heads": c["num_key_value_heads"],
      "head_dim": c.get("head_dim") or c["hidden_size"] // heads,
      "qk_norm": c["use_qk_norm"],
      "qkv_bias": c["attention_bias"],
      "partial_rotary_factor": params.get("partial_rotary_factor", c["partial_rotary_factor"]),
      "rope_theta": theta,
      "rope_scaling": scaling,
    },
    "moe": deepseek_v3.moe_from_json(c.__getitem__),
    "mtp": {"kind": "sequential", "depth": depth, "use_moe": True},
  }
  if eos is not None:
    model["eos_id"] = eos
  return model


def gqa_rows(m: ModelConfig) -> list[tuple[str, str, Layout]]:
  """GLM-4.5's attention tensors: (HF name under the layer, ours under the block, layout)."""
  a = m.attention
  rows: list[tuple[str, str, Layout]] = [
    ("self_attn.q_proj.weight", "attn.wq", Linear()),  # [D, H, K] -> [H*K, D]
    ("self_attn.k_proj.weight", "attn.wk", Linear()),  # [D, G, K] -> [G*K, D]
    ("self_attn.v_proj.weight", "attn.wv", Linear()),
  ]
  if a.qkv_bias:
    rows += [(f"self_attn.{p}_proj.bias", f"attn.bias.{p}", FLAT) for p in ("q", "k", "v")]  # [H, K] -> [H*K]
  if a.qk_norm:
    rows += [
      ("self_attn.q_norm.weight", "attn.q_norm.scale", SAME),
      ("self_attn.k_norm.weight", "attn.k_norm.scale", SAME),
    ]
  return [*rows, ("self_attn.o_proj.weight", "attn.wo", Linear(in_axes=2))]  # [H, K, D] -> [D, H*K]


def mtp_layers(m: ModelConfig) -> list[str]:
  return deepseek_v3.mtp_layers(m)


def tensors(m: ModelConfig) -> list[Tensor]:
  """Every tensor of the exported checkpoint and where it comes from, in our leaves' order."""
  return deepseek_v3.tensors(m, attention=gqa_rows)
