"""Checkpoints other runtimes load: `mtp-export` writes a run's weights in a Hugging Face layout,
`mtp-import` turns such a directory back into a run.

source.py       which checkpoint step, the run's config and tokenizer; reads one array at a time
layout.py       how one of our arrays becomes one target tensor, and back (`Tensor`, `Layout`)
deepseek_v3.py  the DeepSeek-V3 layout: what it cannot express, config.json, the tensor table
qwen3_moe.py    the Qwen3-MoE layout, the same parts; MTP modules in an extra mtp.safetensors
writer.py       the output directory: sharded safetensors + index, extra files, JSON files, tokenizer
exporter.py     `export()`: the above in order, with progress
importer.py     `import_()`: a directory's config.json and tensors -> config.yaml and checkpoints/0, by the same tables
cli.py          `mtp-export`, `mtp-import`: parse the command line, one-line errors
"""


class ExportError(ValueError):
  """An export that cannot be done, reported to the user as one line."""


def common_config(cfg, dtype: str, tok) -> dict:
  """The config.json keys every Hugging Face layout here writes alike: sizes, the MTP depth, norms,
  plain RoPE (rope_theta beside rope_parameters for readers older than transformers 5), no
  attention bias, token ids, dtype. `cfg` is our Config, `tok` the run's TokenizerInfo or None."""
  m = cfg.model
  theta = m.attention.rope_theta
  return {
    "vocab_size": m.vocab_size,
    "hidden_size": m.d_model,
    "intermediate_size": m.d_ff,
    "moe_intermediate_size": m.moe.expert_d_ff,
    "num_hidden_layers": m.num_layers,
    "num_nextn_predict_layers": m.mtp.depth,
    "num_attention_heads": m.attention.num_heads,
    "hidden_act": "silu",
    "rms_norm_eps": m.norm_eps,
    "rope_theta": theta,
    "rope_scaling": None,
    "rope_parameters": {"rope_type": "default", "rope_theta": theta},
    "attention_bias": False,
    "attention_dropout": 0.0,
    "max_position_embeddings": cfg.data.seq_len,
    "initializer_range": m.init_std,
    "tie_word_embeddings": m.tie_embeddings,
    "bos_token_id": tok.bos_id if tok else None,
    "eos_token_id": m.eos_id,
    "pad_token_id": tok.pad_id if tok else None,
    "use_cache": True,
    "dtype": dtype,
    "torch_dtype": dtype,
  }
