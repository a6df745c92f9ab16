"""The Hugging Face DeepSeek-V3 layout (`DeepseekV3ForCausalLM`), MTP modules included.

Tensor names are those of the published checkpoint (deepseek-ai/DeepSeek-V3): trunk layer i at
`model.layers.{i}`, MTP module k at `model.layers.{num_hidden_layers + k - 1}` with `enorm`,
`hnorm`, `eh_proj`, its block, `shared_head.{norm,head}` and an `embed_tokens` copy (vLLM and
SGLang read the embedding and head from those copies). `tensors()` is the one table of what
comes from where; import inverts it.

Where our maths and the reference differ, the export absorbs it: our RoPE pairs dims (i, i + n/2)
and the reference (i, i+1), so the RoPE output columns of q_b_proj / q_proj and
kv_a_proj_with_mqa are reordered (`layout.Linear.rope`) and `rope_interleave` is true. Tied
embeddings set `tie_word_embeddings` and still write `lm_head.weight` (the same values) for readers
that load the head regardless of the tie. transformers fixes the eps of
the q/kv latent norms at 1e-6, so other `model.norm_eps` values are refused. Everything else (RMSNorm,
softmax scale 1/sqrt(nope + rope), sigmoid scores, the bias steering only the choice, top-2 group
scores, normalise then scale the gates, shared experts added, the MTP module fed the final-normed
hidden state with the embedding half first) is the reference's maths already.

`model_config` inverts `config_json` for import: the settings a config.json fixes, or the one line
saying which of its keys our model cannot express.
"""

from __future__ import annotations

import json

from mtp_jax.config import Config, ModelConfig
from mtp_jax.data.manifest import TokenizerInfo
from mtp_jax.export import ExportError, common_config, common_model, rope_from_json
from mtp_jax.export.layout import SAME, Layout, Linear, Tensor
from mtp_jax.model.transformer import stack_of

ARCHITECTURE = "DeepseekV3ForCausalLM"


def problems(m: ModelConfig):
  """Yields (setting, why) for each model setting the DeepSeek-V3 layout cannot express."""
  if m.attention.kind != "mla":
    yield f"model.attention.kind={m.attention.kind}", "DeepSeek-V3 attention is MLA only (qwen3_moe takes GQA)"
  if m.norm_eps != 1e-6:
    yield (
      f"model.norm_eps={m.norm_eps:g}",
      "transformers' DeepSeek-V3 normalises the q/kv latents with eps 1e-6 whatever rms_norm_eps says",
    )
  yield from moe_problems(m, "DeepSeek-V3")


def moe_problems(m: ModelConfig, name: str):
  """(setting, why) for the MoE settings DeepSeek-V3's MoE layers (and GLM-4.5's, the same) cannot
  express, and a parallel MTP kind; `name` is the layout's."""
  if m.mtp.depth and m.mtp.kind != "sequential":
    yield f"model.mtp.kind={m.mtp.kind}", f"{name} MTP modules are sequential (eq. 21-23), not parallel heads"
  moe = m.moe
  if moe.num_experts:
    if moe.score_func != "sigmoid":
      yield f"model.moe.score_func={moe.score_func}", f"the {name} router (topk_method noaux_tc) scores by sigmoid"
    if moe.num_shared_experts == 0:
      yield "model.moe.num_shared_experts=0", f"every {name} MoE layer has shared experts"
    if moe.num_experts // moe.n_group < 2:
      yield f"model.moe.num_experts={moe.num_experts}", f"{name} groups need 2 experts or more (top-2 group scores)"
    if m.mtp.depth and not m.mtp.use_moe:
      yield "model.mtp.use_moe=false", f"a {name} MTP layer has an MoE FFN whenever the trunk has experts"


def check(m: ModelConfig) -> None:
  for setting, why in problems(m):
    raise ExportError(f"--format deepseek_v3 cannot express {setting}: {why}")


VLLM_MLA_LATENTS = (320, 512, 576)  # kv_lora_rank + qk_rope_head_dim vLLM's MLA kernels take (0.32)


def serving_notes(m: ModelConfig) -> list[str]:
  """What a serving runtime will refuse in this export, one line each."""
  a = m.attention
  latent = a.kv_lora_rank + a.qk_rope_head_dim
  if latent in VLLM_MLA_LATENTS:
    return []
  return [
    f"warning: vLLM will not serve this export: its MLA kernels take kv_lora_rank + qk_rope_head_dim of "
    f"{', '.join(map(str, VLLM_MLA_LATENTS))} (its CPU kernel only 576), and this model's is "
    f"{a.kv_lora_rank} + {a.qk_rope_head_dim} = {latent}"
  ]


def moe_json(m: ModelConfig) -> dict:
  """The MoE keys of DeepSeek-V3's config.json (and GLM-4.5's, the same)."""
  moe = m.moe
  return {
    "n_shared_experts": moe.num_shared_experts,
    "n_routed_experts": moe.num_experts,
    "num_experts_per_tok": moe.top_k,
    "routed_scaling_factor": moe.routed_scaling_factor,
    "n_group": moe.n_group,
    "topk_group": moe.topk_group,
    "norm_topk_prob": moe.norm_topk_prob,
    # no MoE layer anywhere: every layer dense, the MTP layers too
    "first_k_dense_replace": m.first_k_dense if moe.num_experts else m.num_layers + m.mtp.modules,
  }


def config_json(cfg: Config, dtype: str, tok: TokenizerInfo | None) -> dict:
  """config.json: every key DeepseekV3Config reads, plus those vLLM / SGLang and the published
  file carry (rope_theta beside rope_parameters for readers older than transformers 5)."""
  m, a, moe = cfg.model, cfg.model.attention, cfg.model.moe
  return {
    "architectures": [ARCHITECTURE],
    "model_type": "deepseek_v3",
    "num_key_value_heads": a.num_heads,
    **moe_json(m),
    "topk_method": "noaux_tc",
    "scoring_func": moe.score_func,
    "moe_layer_freq": 1,
    "kv_lora_rank": a.kv_lora_rank,
    "q_lora_rank": a.q_lora_rank or None,
    "qk_nope_head_dim": a.qk_nope_head_dim,
    "qk_rope_head_dim": a.qk_rope_head_dim,
    "v_head_dim": a.v_head_dim,
    "rope_interleave": True,
    **common_config(cfg, dtype, tok),
  }


# What a config.json may leave out means transformers' DeepseekV3Config default (5.23); topk_method,
# scoring_func and moe_layer_freq, which transformers does not read, DeepSeek's own configuration_deepseek.py.
DEFAULTS = {
  "vocab_size": 129280,
  "hidden_size": 7168,
  "intermediate_size": 18432,
  "moe_intermediate_size": 2048,
  "num_hidden_layers": 61,
  "num_nextn_predict_layers": 1,
  "num_attention_heads": 128,
  "n_shared_experts": 1,
  "n_routed_experts": 256,
  "num_experts_per_tok": 8,
  "routed_scaling_factor": 2.5,
  "n_group": 8,
  "topk_group": 4,
  "topk_method": "noaux_tc",
  "scoring_func": "sigmoid",
  "norm_topk_prob": True,
  "first_k_dense_replace": 3,
  "moe_layer_freq": 1,
  "kv_lora_rank": 512,
  "q_lora_rank": 1536,
  "qk_nope_head_dim": 128,
  "qk_rope_head_dim": 64,
  "v_head_dim": 128,
  "hidden_act": "silu",
  "rms_norm_eps": 1e-6,
  "rope_theta": 10000.0,
  "rope_interleave": True,
  "attention_bias": False,
  "initializer_range": 0.02,
  "tie_word_embeddings": False,
  "eos_token_id": 1,
}


def model_config(hf: dict) -> dict:
  """Our model settings (a nested dict of ModelConfig fields) from a config.json: the inverse of
  `config_json`. Raises ExportError naming the first key our model cannot express."""

  def get(key):
    return hf.get(key, DEFAULTS[key])

  for key, why in _inexpressible(hf, get):
    raise ExportError(f"config.json {key}: {why}")
  layers, depth, dense = get("num_hidden_layers"), get("num_nextn_predict_layers"), get("first_k_dense_replace")
  theta, scaling = rope_from_json(hf, DEFAULTS["rope_theta"])
  eos = get("eos_token_id")
  model = {
    **common_model(get),
    "first_k_dense": min(dense, layers),
    "attention": {
      "kind": "mla",
      "num_heads": get("num_attention_heads"),
      "q_lora_rank": get("q_lora_rank") or 0,  # null: a full-rank q_proj
      "kv_lora_rank": get("kv_lora_rank"),
      "qk_nope_head_dim": get("qk_nope_head_dim"),
      "qk_rope_head_dim": get("qk_rope_head_dim"),
      "v_head_dim": get("v_head_dim"),
      "rope_theta": theta,
      "rope_scaling": scaling,
    },
    "moe": moe_from_json(get),
    "mtp": {"kind": "sequential", "depth": depth, "use_moe": True},
  }
  if eos is not None:
    model["eos_id"] = eos[0] if isinstance(eos, list) else eos  # we end documents with one token
  return model


def moe_from_json(get) -> dict:
  """Our MoE settings from DeepSeek-V3's config.json keys (GLM-4.5's too): the inverse of `moe_json`."""
  layers, depth, dense = get("num_hidden_layers"), get("num_nextn_predict_layers"), get("first_k_dense_replace")
  return {
    # moe_json's "no MoE layer anywhere", MTP layers included (then no expert tensor may be there)
    "num_experts": get("n_routed_experts") if dense < layers + depth else 0,
    "top_k": get("num_experts_per_tok"),
    "expert_d_ff": get("moe_intermediate_size"),
    "num_shared_experts": get("n_shared_experts"),
    "score_func": "sigmoid",
    "norm_topk_prob": get("norm_topk_prob"),
    "routed_scaling_factor": get("routed_scaling_factor"),
    "n_group": get("n_group") or 1,  # null: no group-limited routing
    "topk_group": get("topk_group") or 1,
  }


def _inexpressible(hf: dict, get):
  """Yields (config.json key, why) for each setting our model cannot express."""
  if hf.get("quantization_config"):
    method = hf["quantization_config"].get("quant_method", "quantized")
    how = "convert them to bf16 first (the published fp8 checkpoint: DeepSeek's inference/fp8_cast_bf16.py)"
    yield "quantization_config", f"{method} weights are not supported; {how} and import that"
  fixed = [
    ("hidden_act", "silu", "our FFNs are SwiGLU (silu)"),
    ("attention_bias", False, "our attention projections have no bias"),
    ("topk_method", "noaux_tc", "our router is DeepSeek-V3's noaux_tc (bias-steered top-k)"),
    ("scoring_func", "sigmoid", "the DeepSeek-V3 router scores by sigmoid"),
    ("moe_layer_freq", 1, "our MoE layers are every layer after the first dense ones"),
    ("rms_norm_eps", 1e-6, "transformers normalises the q/kv latents with eps 1e-6, so ours uses it everywhere"),
    ("rope_interleave", True, "DeepSeek-V3 stores RoPE dims interleaved, which import undoes"),
  ]
  for key, want, why in fixed:
    if get(key) != want:
      yield f"{key}={json.dumps(get(key))}", f"{why}; only {json.dumps(want)} can be imported"
  heads, kv_heads = get("num_attention_heads"), hf.get("num_key_value_heads")
  if kv_heads is not None and kv_heads != heads:
    yield f"num_key_value_heads={kv_heads}", f"MLA has one key/value per query head ({heads}, num_attention_heads)"
  layers, depth, dense = get("num_hidden_layers"), get("num_nextn_predict_layers"), get("first_k_dense_replace")
  if layers < dense < layers + depth:
    why = f"makes the first MTP layers dense, later ones MoE ({layers} trunk layers); ours are all dense or all MoE"
    yield f"first_k_dense_replace={dense}", why
  if dense < layers + depth and get("n_routed_experts") and not get("n_shared_experts"):
    yield "n_shared_experts=0", "the DeepSeek-V3 layout has shared experts in every MoE layer"


def _linear(rope: int = 0, in_axes: int = 1) -> Layout:
  return Linear(in_axes=in_axes, rope=rope)


def mla_rows(m: ModelConfig) -> list[tuple[str, str, Layout]]:
  """DeepSeek-V3's attention tensors: (HF name under the layer, ours under the block, layout)."""
  a, rope = m.attention, m.attention.qk_rope_head_dim
  rows: list[tuple[str, str, Layout]] = []
  if a.q_lora_rank:
    rows += [
      ("self_attn.q_a_proj.weight", "attn.wq_a", _linear()),
      ("self_attn.q_a_layernorm.weight", "attn.q_norm.scale", SAME),
      ("self_attn.q_b_proj.weight", "attn.wq_b", _linear(rope)),  # [R, H, nope+rope] -> [H*(nope+rope), R]
    ]
  else:
    rows += [("self_attn.q_proj.weight", "attn.wq", _linear(rope))]  # [D, H, nope+rope] -> [H*(nope+rope), D]
  return [
    *rows,
    ("self_attn.kv_a_proj_with_mqa.weight", "attn.wkv_a", _linear(rope)),  # [D, R+rope] -> [R+rope, D]
    ("self_attn.kv_a_layernorm.weight", "attn.kv_norm.scale", SAME),
    ("self_attn.kv_b_proj.weight", "attn.wkv_b", _linear()),  # [R, H, nope+v] -> [H*(nope+v), R]
    ("self_attn.o_proj.weight", "attn.wo", _linear(in_axes=2)),  # [H, v, D] -> [D, H*v]
  ]


def _block(
  m: ModelConfig, hf: str, ours: str, moe: bool, router_bias: str, layer: int | None, attention
) -> list[Tensor]:
  """One transformer block: HF layer prefix `hf`, our Block prefix `ours` (under params.), block
  `layer` of it when it is a stack of trunk blocks, its attention tensors `attention(m)`."""
  rows: list[tuple[str, str, Layout]] = [("input_layernorm.weight", "attn_norm.scale", SAME), *attention(m)]
  rows += [("post_attention_layernorm.weight", "ffn_norm.scale", SAME)]
  if moe:
    rows += [
      ("mlp.gate.weight", "ffn.router.kernel", _linear()),  # [D, E] -> [E, D]
      ("mlp.shared_experts.gate_proj.weight", "ffn.shared.w_gate", _linear()),
      ("mlp.shared_experts.up_proj.weight", "ffn.shared.w_up", _linear()),
      ("mlp.shared_experts.down_proj.weight", "ffn.shared.w_down", _linear()),
    ]
  else:
    rows += [
      ("mlp.gate_proj.weight", "ffn.w_gate", _linear()),
      ("mlp.up_proj.weight", "ffn.w_up", _linear()),
      ("mlp.down_proj.weight", "ffn.w_down", _linear()),
    ]
  out = [Tensor(f"{hf}.{h}", f"params.{ours}.{o}", layout, layer=layer) for h, o, layout in rows]
  if moe:
    bias = f"{hf}.mlp.gate.e_score_correction_bias"
    out.append(Tensor(bias, f"{router_bias}.ffn.router.bias", layer=layer, keep_fp32=True))
    for proj, w in [("gate_proj", "w_gate"), ("up_proj", "w_up"), ("down_proj", "w_down")]:
      ours_w = f"params.{ours}.ffn.experts.{w}"
      out += [  # stacked [E, in, out] -> one [out, in] Linear per expert
        Tensor(f"{hf}.mlp.experts.{e}.{proj}.weight", ours_w, _linear(), layer=layer, expert=e)
        for e in range(m.moe.num_experts)
      ]
  return out


def mtp_layers(m: ModelConfig) -> list[str]:
  """Where the MTP modules are: module k at layer num_hidden_layers + k - 1."""
  return [f"model.layers.{m.num_layers + k}" for k in range(m.mtp.modules)]


def tensors(m: ModelConfig, attention=mla_rows) -> list[Tensor]:
  """Every tensor of the exported checkpoint and where it comes from, in our leaves' order
  (`attention`: the layout's attention tensors; GLM-4.5's layout is this one with its own)."""
  head = Tensor("lm_head.weight", "params.head", _linear())  # [D, V] -> [V, D]
  if m.tie_embeddings:
    head = Tensor("lm_head.weight", "params.embed.table")
  out = [
    Tensor("model.embed_tokens.weight", "params.embed.table"),
    Tensor("model.norm.weight", "params.final_norm.scale"),
  ]
  out.append(head)
  has_moe = m.moe.num_experts > 0
  for i in range(m.num_layers):
    moe = has_moe and i >= m.first_k_dense
    r, j = stack_of(m, i)
    out += _block(m, f"model.layers.{i}", f"layers.{r}", moe, f"router_bias.layers.{r}", j, attention)
  for k in range(m.mtp.modules):  # module k + 1 (DeepSeek-V3 eqs. 21-23)
    hf, ours = f"model.layers.{m.num_layers + k}", f"mtp.{k}"
    out += [
      Tensor(f"{hf}.enorm.weight", f"params.{ours}.enorm.scale"),
      Tensor(f"{hf}.hnorm.weight", f"params.{ours}.hnorm.scale"),
      Tensor(f"{hf}.eh_proj.weight", f"params.{ours}.eh_proj", _linear()),  # [2D, D] -> [D, 2D], embedding half first
      Tensor(f"{hf}.shared_head.norm.weight", f"params.{ours}.norm.scale"),
      Tensor(f"{hf}.embed_tokens.weight", "params.embed.table"),
      Tensor(f"{hf}.shared_head.head.weight", head.ours, head.layout),
    ]
    out += _block(m, hf, f"{ours}.block", has_moe and m.mtp.use_moe, f"router_bias.{ours}.block", None, attention)
  return out
