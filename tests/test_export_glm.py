"""`mtp-export --format glm4_moe`: transformers' Glm4MoeForCausalLM loads it and computes our
logits, and an import of it exports again bit for bit (tolerances as in test_export.py)."""

import jax
import numpy as np
from conftest import TINY
from test_export import SHARD, TOL, _exported, _hf, _mtp_from_tensors, _our_logits, _randomized, _save_run, _tokens

from mtp_jax import config
from mtp_jax.export import glm4_moe
from mtp_jax.export.exporter import export
from mtp_jax.export.importer import import_
from mtp_jax.train import optimizer, step

# GLM-4.5's attention (biases, half the head rotated, q/k norms, 4 query heads over 2 key/value
# heads), DeepSeek-V3's MoE (sigmoid scores with a selection bias, 2 groups, a shared expert,
# scaled gates), one dense layer first, one MTP module.
GLM = [
  "model.attention.kind=gqa",
  "model.attention.head_dim=16",
  "model.attention.qkv_bias=true",
  "model.attention.partial_rotary_factor=0.5",
  "model.attention.qk_norm=true",
  "model.attention.rope_theta=500",
  "model.moe.n_group=2",
  "model.moe.topk_group=1",
  "model.moe.routed_scaling_factor=2.5",
  "model.norm_eps=1e-5",
  "model.mtp.depth=1",
  "model.init_std=0.2",
]


def test_transformers_computes_our_logits_and_an_import_exports_again_bit_for_bit(tmp_path):
  torch, transformers = _hf()
  cfg = config.load(None, [*TINY, *GLM])
  glm4_moe.check(cfg.model)
  init = step.make_init(cfg, optimizer.make(cfg.optimizer, cfg.train.steps))
  state = _randomized(init(jax.random.key(0)), seed=0)
  rng = np.random.default_rng(1)

  def biased(path, x):  # the q/k/v biases start at zero: give them values a lost one would show
    name = jax.tree_util.keystr(path)
    return jax.device_put(rng.normal(0, 0.5, x.shape).astype(x.dtype), x.sharding) if "'bias'" in name else x

  state = state.replace(params=jax.tree_util.tree_map_with_path(biased, state.params))
  _save_run(tmp_path / "run", cfg, state)
  export(str(tmp_path / "run"), str(tmp_path / "hf"), format="glm4_moe", dtype="fp32", max_shard_bytes=SHARD)

  model, info = transformers.Glm4MoeForCausalLM.from_pretrained(
    tmp_path / "hf", dtype=torch.float32, attn_implementation="eager", output_loading_info=True
  )
  assert not info["missing_keys"] and not info["mismatched_keys"], info
  assert all(k.startswith(f"model.layers.{cfg.model.num_layers}.") for k in info["unexpected_keys"]), info
  tokens = _tokens(cfg)
  ours = _our_logits(cfg, state, tokens)
  b, length = tokens.shape
  with torch.no_grad():
    theirs = model.eval()(torch.tensor(tokens, dtype=torch.long), position_ids=torch.arange(length).expand(b, -1))
  diff = np.abs(theirs.logits.numpy() - ours[0]).max()
  assert diff < TOL, f"max abs logit difference {diff:.2e} (logits up to {np.abs(ours[0]).max():.1f})"
  # The MTP layer, by DeepSeek-V3 eqs. 21-23 from the exported tensors and GLM's own decoder layer.
  from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeDecoderLayer

  [depth_1] = _mtp_from_tensors(tmp_path / "hf", model, tokens, layer_class=Glm4MoeDecoderLayer)
  diff = np.abs(depth_1[:, : length - 1] - ours[1][:, : length - 1]).max()
  assert diff < TOL, f"MTP depth 1: max abs logit difference {diff:.2e}"
  no_bias = state.replace(
    params=jax.tree_util.tree_map_with_path(
      lambda p, x: x * 0 if "'bias'" in jax.tree_util.keystr(p) else x, state.params
    )
  )
  assert np.abs(_our_logits(cfg, no_bias, tokens)[0] - ours[0]).max() > 0.1  # the biases matter here

  result = import_(str(tmp_path / "hf"), str(tmp_path / "imported"))
  mla_only = {"attention": {"q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"}}
  assert result.format == "glm4_moe"
  assert result.config.model.model_dump(exclude=mla_only) == cfg.model.model_dump(exclude=mla_only)
  export(str(tmp_path / "imported"), str(tmp_path / "again"), format="glm4_moe", dtype="fp32", max_shard_bytes=SHARD)
  first, again = _exported(tmp_path / "hf"), _exported(tmp_path / "again")
  assert first.keys() == again.keys() and all(first[n].tobytes() == again[n].tobytes() for n in first)
