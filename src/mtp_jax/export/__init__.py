"""Checkpoints other runtimes load: `mtp-export` writes a run's weights in a Hugging Face layout,
`mtp-import` turns such a directory back into a run.

source.py       which checkpoint step, the run's config and tokenizer; reads one array at a time
layout.py       how one of our arrays becomes one target tensor, and back (`Tensor`, `Layout`)
deepseek_v3.py  the DeepSeek-V3 layout: what it cannot express, config.json, the tensor table
qwen3_moe.py    the Qwen3-MoE layout, the same parts; MTP modules in an extra mtp.safetensors
writer.py       the output directory: sharded safetensors + index, extra files, JSON files, tokenizer
exporter.py     `export()`: the above in order, with progress
importer.py     `import_()`: a directory's config.json and tensors -> config.yaml and checkpoints/0, by the same tables

The commands `mtp-export` and `mtp-import` are in cli/export.py.
"""

from mtp_jax.errors import InputError


class ExportError(InputError):
  """A checkpoint or model directory that cannot be exported or imported, as one line."""


def common_config(cfg, dtype: str, tok) -> dict:
  """The config.json keys every Hugging Face layout here writes alike: sizes, the MTP depth, norms,
  RoPE (`rope_json`), no attention bias, token ids, dtype. `cfg` is our Config, `tok` the run's
  TokenizerInfo or None."""
  m = cfg.model
  return {
    "vocab_size": m.vocab_size,
    "hidden_size": m.d_model,
    "intermediate_size": m.d_ff,
    "moe_intermediate_size": m.moe.expert_d_ff,
    "num_hidden_layers": m.num_layers,
    "num_nextn_predict_layers": m.mtp.modules,  # one for modules sharing weights, as vLLM reuses it
    "num_attention_heads": m.attention.num_heads,
    "hidden_act": "silu",
    "rms_norm_eps": m.norm_eps,
    **rope_json(m.attention.rope_theta, m.attention.rope_scaling, cfg.data.seq_len),
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": m.init_std,
    "tie_word_embeddings": m.tie_embeddings,
    "bos_token_id": tok.bos_id if tok else None,
    "eos_token_id": m.eos_id,
    "pad_token_id": tok.pad_id if tok else None,
    "use_cache": True,
    "dtype": dtype,
    "torch_dtype": dtype,
  }


def common_model(get) -> dict:
  """The inverse of `common_config` for our trunk: the model settings every layout here reads
  alike from config.json (`get(key)` gives a key's value, the layout's default applied)."""
  return {
    "vocab_size": get("vocab_size"),
    "d_model": get("hidden_size"),
    "num_layers": get("num_hidden_layers"),
    "d_ff": get("intermediate_size"),
    "norm_eps": get("rms_norm_eps"),
    "init_std": get("initializer_range"),
    "tie_embeddings": get("tie_word_embeddings"),
  }


YARN_KEYS = (
  "factor",
  "original_max_position_embeddings",
  "beta_fast",
  "beta_slow",
  "mscale",
  "mscale_all_dim",
  "truncate",
)


def rope_json(theta: float, scaling, seq_len: int) -> dict:
  """RoPE's config.json keys: rope_parameters (transformers 5) with rope_theta and rope_scaling
  beside it (older readers, vLLM); with YaRN max_position_embeddings is the context it reaches."""
  if scaling is None:
    return {
      "rope_theta": theta,
      "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": theta},
      "max_position_embeddings": seq_len,
    }
  yarn = {k: getattr(scaling, k) for k in YARN_KEYS}
  return {
    "rope_theta": theta,
    "rope_scaling": {"type": "yarn", "rope_type": "yarn", **yarn},
    "rope_parameters": {"rope_type": "yarn", "rope_theta": theta, **yarn},
    "max_position_embeddings": int(scaling.original_max_position_embeddings * scaling.factor),
  }


def rope_from_json(hf: dict, default_theta: float) -> tuple[float, dict | None]:
  """(rope_theta, our model.attention.rope_scaling or None) from a config.json's rope_parameters
  and rope_scaling, which must agree where both are given; raises ExportError naming the key for
  a scaling our model does not compute."""
  read = {key: _rope(key, hf, default_theta) for key in ("rope_parameters", "rope_scaling") if hf.get(key)}
  if len(read) == 2 and read["rope_parameters"][1] != read["rope_scaling"][1]:
    raise ExportError("config.json rope_scaling: differs from rope_parameters; which one a reader takes varies")
  return next(iter(read.values()), (hf.get("rope_theta", default_theta), None))


def _rope(key: str, hf: dict, default_theta: float) -> tuple[float, dict | None]:
  rope = dict(hf[key])
  kind = rope.pop("rope_type", rope.pop("type", "default"))
  theta = rope.pop("rope_theta", hf.get("rope_theta", default_theta))
  if kind == "default":
    return theta, None
  if kind != "yarn":
    raise ExportError(f"config.json {key}: {kind} RoPE scaling is not supported, only yarn (and plain RoPE)")
  if rope.pop("attention_factor", None) is not None:
    raise ExportError(f"config.json {key}: attention_factor is not supported (YaRN's is derived from mscale)")
  if unknown := sorted(set(rope) - set(YARN_KEYS)):
    raise ExportError(f"config.json {key}: {unknown[0]} is not a YaRN setting we compute")
  original = rope.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
  factor = rope.get("factor") or hf.get("max_position_embeddings", 0) / original
  keep = {k: rope[k] for k in YARN_KEYS[2:] if rope.get(k) is not None}
  return theta, {"type": "yarn", "factor": factor, "original_max_position_embeddings": original, **keep}
