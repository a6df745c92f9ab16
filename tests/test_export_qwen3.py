"""`mtp-export --format qwen3_moe`: transformers' Qwen3MoeForCausalLM loads it and computes our logits.

As in test_export.py: our side runs in float32, logits are O(5), so a max abs difference around
1e-5 is float32 rounding while a layout or maths mistake moves logits by O(0.1). The transformers
tests need the export-test extra (torch CPU + transformers) and skip without it.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax import nnx
from safetensors.numpy import load_file
from test_export import (
  SHARD,
  TOL,
  _assert_yarn_matters,
  _err_line,
  _exported,
  _hf,
  _our_logits,
  _randomized,
  _rms,
  _save_run,
  _tokens,
  check_table,
)

from mtp_jax import config
from mtp_jax.cli.export import main
from mtp_jax.config import ConfigError
from mtp_jax.export import ExportError, qwen3_moe, source, writer
from mtp_jax.export.exporter import export
from mtp_jax.model import Transformer
from mtp_jax.model.flops import cost
from mtp_jax.train import optimizer, step
from mtp_jax.train.checkpoint import named_leaves

# What Qwen3-MoE routing is: softmax over all experts, top-k, no shared experts, scaling or bias.
QWEN = [
  "model.attention.kind=gqa",
  "model.attention.qk_norm=true",
  "model.moe.num_shared_experts=0",
  "model.moe.score_func=softmax",
  "model.moe.bias_update_rate=0",
]
# Gates renormalised, one dense layer first, untied head, one MTP module; head_dim 16 is not
# d_model / num_heads (8), so config.json's head_dim is what transformers reads.
MTP = [*QWEN, "model.attention.head_dim=16", "model.moe.norm_topk_prob=true", "model.mtp.depth=1"]
# Gates not renormalised, tied embeddings, every layer MoE, 4 query heads over 1 key/value head,
# top-3, another RoPE base with YaRN past position 8 (its cos/sin factor 0.1 ln 4 + 1), no MTP.
TIED = [
  *QWEN,
  "model.moe.norm_topk_prob=false",
  "model.tie_embeddings=true",
  "model.first_k_dense=0",
  "model.attention.num_kv_heads=1",
  "model.moe.top_k=3",
  "model.attention.rope_theta=500",
  "model.attention.rope_scaling.factor=4",
  "model.attention.rope_scaling.original_max_position_embeddings=8",
  "model.mtp.depth=0",
]
CASES = {"mtp": MTP, "tied": TIED}


def _qwen_state(cfg, seed: int):
  """Random weights (init_std 0.2, norm scales off 1) and no router bias, which Qwen3-MoE lacks."""
  init = step.make_init(cfg, optimizer.make(cfg.optimizer, cfg.train.steps))  # eager: no compile to wait for
  state = _randomized(init(jax.random.key(seed)), seed=seed)
  return state.replace(router_bias=jax.tree.map(jnp.zeros_like, state.router_bias))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  """name -> (cfg, state, workdir, fp32 export dir, our logits per depth, tokens)."""
  cache = {}

  def get(name):
    if name not in cache:
      cfg = config.load(None, [*TINY, *CASES[name], "model.init_std=0.2"])
      state = _qwen_state(cfg, seed=10 + len(cache))
      root = tmp_path_factory.mktemp(name)
      _save_run(root / "run", cfg, state)
      export(str(root / "run"), str(root / "hf"), format="qwen3_moe", dtype="fp32", max_shard_bytes=SHARD)
      tokens = _tokens(cfg)
      cache[name] = (cfg, state, root / "run", root / "hf", _our_logits(cfg, state, tokens), tokens)
    return cache[name]

  return get


def _load_hf(directory):
  torch, transformers = _hf()
  model, info = transformers.Qwen3MoeForCausalLM.from_pretrained(
    directory, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
  )
  return model.eval(), info


def _mtp_file(directory) -> dict[str, np.ndarray]:
  return load_file(directory / qwen3_moe.MTP_FILE)


# ----------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("name", ["mtp", "tied"])
def test_transformers_computes_our_logits(case, name):
  torch, _ = _hf()
  cfg, state, _, hf_dir, ours, tokens = case(name)
  model, info = _load_hf(hf_dir)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
  assert model.config.head_dim == cfg.model.attention.head_dim
  b, length = tokens.shape
  with torch.no_grad():
    logits = model(torch.tensor(tokens, dtype=torch.long), position_ids=torch.arange(length).expand(b, -1)).logits
  diff = np.abs(logits.numpy() - ours[0]).max()
  assert diff < TOL, f"{name}: max abs logit difference {diff:.2e} (logits up to {np.abs(ours[0]).max():.1f})"
  if cfg.model.attention.rope_scaling:
    _assert_yarn_matters(cfg, state, tokens, ours[0])


def test_the_mtp_file_computes_our_depth_1_logits_by_eqs_21_to_23(case):
  """The module docstring's recipe, from mtp.safetensors and transformers' own decoder layer."""
  torch, _ = _hf()
  from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

  cfg, _, _, hf_dir, ours, tokens = case("mtp")
  model, _ = _load_hf(hf_dir)
  c, n = model.config, cfg.model.num_layers
  assert json.loads((hf_dir / "config.json").read_text())["num_nextn_predict_layers"] == 1
  t = {k: torch.from_numpy(v) for k, v in _mtp_file(hf_dir).items()}
  p = f"model.layers.{n}."
  b, length = tokens.shape
  ids = torch.tensor(tokens, dtype=torch.long)
  positions = torch.arange(length).expand(b, -1)
  causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
  block = {k[len(p) :]: v for k, v in t.items() if ".experts." not in k}
  extras = {f"{x}.weight" for x in ("enorm", "hnorm", "eh_proj", "shared_head.norm")}
  block = {k: v for k, v in block.items() if k not in extras}
  # transformers keeps experts fused ([E, 2F, D] gate then up, [E, D, F]); from_pretrained fuses them too.
  w = [{q: t[f"{p}mlp.experts.{e}.{q}_proj.weight"] for q in ("gate", "up", "down")} for e in range(c.num_experts)]
  block["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["gate"], x["up"]]) for x in w])
  block["mlp.experts.down_proj"] = torch.stack([x["down"] for x in w])
  layer = Qwen3MoeDecoderLayer(c, layer_idx=n).eval()
  layer.load_state_dict(block, strict=True)
  with torch.no_grad():
    h = model.model(ids, position_ids=positions).last_hidden_state  # h^0: final-normed
    nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)  # t_{i+1}; past the end: 0, as ours
    emb = model.model.embed_tokens(nxt)
    eps = c.rms_norm_eps
    x = torch.cat([_rms(emb, t[p + "enorm.weight"], eps), _rms(h, t[p + "hnorm.weight"], eps)], -1)
    x = x @ t[p + "eh_proj.weight"].T  # eq. 21
    rope = model.model.rotary_emb(x, positions)
    h = layer(x, attention_mask=causal, position_ids=positions, position_embeddings=rope)
    logits = model.lm_head(_rms(h, t[p + "shared_head.norm.weight"], eps)).numpy()  # eqs. 22, 23
  diff = np.abs(logits[:, : length - 1] - ours[1][:, : length - 1]).max()
  assert diff < TOL, f"MTP depth 1: max abs logit difference {diff:.2e}"


# ----------------------------------------------------------------------------- the layout itself


def test_published_names_and_the_mtp_file_beside_the_shards(case):
  _, state, _, hf_dir, _, _ = case("mtp")
  index = json.loads((hf_dir / writer.INDEX).read_text())
  files = sorted({*index["weight_map"].values()})
  assert len(files) > 1 and sorted(p.name for p in hf_dir.glob("*.safetensors")) == [*files, "mtp.safetensors"]
  t, mtp = _exported(hf_dir), _mtp_file(hf_dir)
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in t.values())
  attn = {f"self_attn.{a}.weight" for a in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")}
  block = attn | {"input_layernorm.weight", "post_attention_layernorm.weight"}
  moe = {"mlp.gate.weight"} | {f"mlp.experts.{e}.{p}_proj.weight" for e in range(8) for p in ("gate", "up", "down")}
  dense = {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}

  def layer(tensors, i):
    return {n.removeprefix(f"model.layers.{i}.") for n in tensors if n.startswith(f"model.layers.{i}.")}

  assert layer(t, 0) == block | dense and layer(t, 1) == block | moe and not layer(t, 2)
  assert {n for n in t if not n.startswith("model.layers.")} == {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
  }
  extras = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight"}
  assert set(mtp) == {f"model.layers.2.{n}" for n in block | moe | extras}  # nothing but module 1
  assert t["model.layers.0.self_attn.q_norm.weight"].shape == (16,)  # one scale per head dim, shared by heads
  assert t["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 16, 32)
  ours = {n: np.asarray(x) for n, x in named_leaves({"params": state.params}).items()}
  np.testing.assert_array_equal(mtp["model.layers.2.eh_proj.weight"], ours["params.mtp.0.eh_proj"].T)
  np.testing.assert_array_equal(
    mtp["model.layers.2.mlp.experts.3.down_proj.weight"], ours["params.mtp.0.block.ffn.experts.w_down"][3].T
  )
  tied = _exported(case("tied")[3])
  assert "lm_head.weight" not in tied and not (case("tied")[3] / qwen3_moe.MTP_FILE).exists()
  assert tied["model.layers.0.self_attn.k_proj.weight"].shape == (8, 32)  # one key/value head


def test_config_json_has_every_key_qwen3_moe_reads(case):
  cfg, _, _, hf_dir, _, _ = case("mtp")
  written = json.loads((hf_dir / "config.json").read_text())
  m = cfg.model
  assert written["architectures"] == ["Qwen3MoeForCausalLM"] and written["model_type"] == "qwen3_moe"
  assert written["mlp_only_layers"] == [0] and written["decoder_sparse_step"] == 1
  assert written["num_experts"] == 8 and written["num_experts_per_tok"] == 2 and written["norm_topk_prob"] is True
  assert written["head_dim"] == 16 and written["num_key_value_heads"] == 2 and written["num_nextn_predict_layers"] == 1
  assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == m.attention.rope_theta
  assert written["tie_word_embeddings"] is False and written["eos_token_id"] == m.eos_id
  assert written["dtype"] == written["torch_dtype"] == "float32"
  tied = json.loads(case("tied")[3].joinpath("config.json").read_text())
  assert tied["tie_word_embeddings"] is True and tied["mlp_only_layers"] == [] and tied["norm_topk_prob"] is False
  _, transformers = _hf()
  declared = set(transformers.Qwen3MoeConfig.__annotations__)
  # Training-time switches (Qwen's own balance loss), not model settings.
  assert declared - set(written) == {"output_router_logits", "router_aux_loss_coef"}
  loaded = transformers.AutoConfig.from_pretrained(hf_dir)
  assert loaded.rope_parameters == {"rope_type": "default", "rope_theta": m.attention.rope_theta}
  assert loaded.sliding_window is None and loaded.num_experts == 8 and loaded.head_dim == 16


def test_model_config_defaults_are_those_of_qwen3_moe_config():
  _, transformers = _hf()
  theirs = transformers.Qwen3MoeConfig()
  declared = set(transformers.Qwen3MoeConfig.__annotations__)
  for key, value in qwen3_moe.DEFAULTS.items():
    if key in declared and key not in ("mlp_only_layers", "rope_parameters"):
      assert getattr(theirs, key) == value, key
  assert theirs.mlp_only_layers == [] and qwen3_moe.DEFAULTS["mlp_only_layers"] is None
  assert theirs.rope_parameters == {"rope_type": "default", "rope_theta": qwen3_moe.DEFAULTS["rope_theta"]}


TABLE = [
  MTP,
  TIED,
  [*QWEN, "model.moe.num_experts=0"],  # dense everywhere, MTP included
  [*QWEN, "model.mtp.depth=2", "model.mtp.use_moe=false", "model.first_k_dense=2"],  # no MoE layer at all
  [*QWEN, "model.mtp.depth=3", "model.num_layers=3", "model.first_k_dense=2"],
]


@pytest.mark.parametrize("overrides", TABLE)
def test_the_table_exports_every_parameter_once_and_inverts(overrides):
  cfg = config.load(None, [*TINY, *overrides])
  qwen3_moe.check(cfg.model)
  table = qwen3_moe.tensors(cfg.model)
  check_table(table, source.abstract_leaves(cfg))
  for t in table:  # the MTP layers go to their own file, as vLLM and SGLang load them
    mtp = int(t.hf.split(".")[2]) >= cfg.model.num_layers if t.hf.startswith("model.layers.") else False
    assert t.file == (qwen3_moe.MTP_FILE if mtp and not t.zero else None), t.hf


@pytest.mark.parametrize("overrides", TABLE)
def test_model_config_reads_back_what_config_json_wrote(overrides):
  cfg = config.load(None, [*TINY, *overrides])
  written = qwen3_moe.config_json(cfg, "float32", None)
  ours = qwen3_moe.model_config(json.loads(json.dumps(written)))
  again = config.from_dict({**cfg.model_dump(mode="json"), "model": {**cfg.model.model_dump(mode="json"), **ours}})
  assert qwen3_moe.config_json(again, "float32", None) == written
  expected = cfg.model.model_dump()
  if not cfg.model.moe.num_experts:  # every layer dense: first_k_dense reads as all of them
    expected["first_k_dense"] = cfg.model.num_layers
  for section, value in ours.items():
    if isinstance(value, dict):
      assert value == {k: expected[section][k] for k in value}, section
    else:
      assert value == expected[section], section


# Qwen/Qwen3-30B-A3B's config.json as published (transformers 4.51 keys).
PUBLISHED = {
  "architectures": ["Qwen3MoeForCausalLM"],
  "attention_bias": False,
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "decoder_sparse_step": 1,
  "eos_token_id": 151645,
  "head_dim": 128,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 6144,
  "max_position_embeddings": 40960,
  "max_window_layers": 48,
  "mlp_only_layers": [],
  "model_type": "qwen3_moe",
  "moe_intermediate_size": 768,
  "norm_topk_prob": True,
  "num_attention_heads": 32,
  "num_experts": 128,
  "num_experts_per_tok": 8,
  "num_hidden_layers": 48,
  "num_key_value_heads": 4,
  "output_router_logits": False,
  "rms_norm_eps": 1e-06,
  "rope_scaling": None,
  "rope_theta": 1000000.0,
  "router_aux_loss_coef": 0.001,
  "sliding_window": None,
  "tie_word_embeddings": False,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.51.0",
  "use_cache": True,
  "use_sliding_window": False,
  "vocab_size": 151936,
}


def test_a_published_config_reads_as_a_model_the_layout_exports():
  ours = qwen3_moe.model_config(PUBLISHED)
  cfg = config.from_dict({"model": ours, "data": {"sources": [{"path": "prepared"}], "seq_len": 4096}})
  assert list(qwen3_moe.problems(cfg.model)) == []
  assert (cfg.model.attention.head_dim, cfg.model.attention.rope_theta, cfg.model.first_k_dense) == (128, 1e6, 0)
  written = qwen3_moe.config_json(cfg, "bfloat16", None)
  settings = PUBLISHED.keys() - {"bos_token_id", "max_position_embeddings", "transformers_version"}
  assert {k: written.get(k) for k in settings} == {k: PUBLISHED[k] for k in settings} | {
    "output_router_logits": None,  # training-time switches, not written
    "router_aux_loss_coef": None,
  }


@pytest.mark.parametrize(
  ("change", "key"),
  [
    ({"attention_bias": True}, "attention_bias=True"),
    ({"use_sliding_window": True}, "use_sliding_window=True"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "rope_scaling: dynamic"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e6, "factor": 4.0}}, "rope_parameters: longrope"),
    ({"eos_token_id": [151645, 151643]}, "eos_token_id=[151645, 151643]"),
    ({"mlp_only_layers": [3]}, "mlp_only_layers=[3]"),  # a dense layer after MoE layers
    ({"decoder_sparse_step": 2}, "decoder_sparse_step=2"),  # every other layer dense
  ],
)
def test_model_config_refuses_what_we_cannot_express_by_key(change, key):
  with pytest.raises(ExportError, match=f"^config.json {re.escape(key)}"):
    qwen3_moe.model_config({**PUBLISHED, **change})


def test_model_config_takes_dense_leading_layers_and_a_one_element_eos_list():
  ours = qwen3_moe.model_config({**PUBLISHED, "mlp_only_layers": [0, 1], "eos_token_id": [7]})
  assert ours["first_k_dense"] == 2 and ours["eos_id"] == 7
  stepped = qwen3_moe.model_config({**PUBLISHED, "num_hidden_layers": 2, "decoder_sparse_step": 2})
  assert stepped["first_k_dense"] == 1  # layer 0 dense, layer 1 MoE: (i + 1) % 2 == 0


@pytest.mark.parametrize(
  ("overrides", "setting"),
  [
    (["model.attention.kind=mla", "model.attention.qk_norm=false"], "model.attention.kind=mla"),
    (["model.attention.qk_norm=false"], "model.attention.qk_norm=false"),
    (["model.attention.qkv_bias=true"], "model.attention.qkv_bias=true"),
    (["model.attention.partial_rotary_factor=0.5"], "model.attention.partial_rotary_factor=0.5"),
    (["model.mtp.kind=parallel"], "model.mtp.kind=parallel"),
    (["model.moe.score_func=sigmoid"], "model.moe.score_func=sigmoid"),
    (["model.moe.num_shared_experts=1"], "model.moe.num_shared_experts=1"),
    (["model.moe.routed_scaling_factor=2.5"], "model.moe.routed_scaling_factor=2.5"),
    (["model.moe.n_group=2"], "model.moe.n_group=2"),
    (["model.moe.bias_update_rate=1e-3"], "model.moe.bias_update_rate=0.001"),
  ],
)
def test_settings_the_layout_cannot_express_are_refused_by_name(overrides, setting):
  cfg = config.load(None, [*TINY, *QWEN, *overrides])
  with pytest.raises(ExportError, match=f"^--format qwen3_moe cannot express {re.escape(setting)}: "):
    qwen3_moe.check(cfg.model)
  qwen3_moe.check(config.load(None, [*TINY, *QWEN]).model)


def test_a_nonzero_selection_bias_is_refused_and_nothing_is_written(case, tmp_path):
  cfg, state, _, _, _, _ = case("tied")
  biased = _randomized(state, seed=3)  # router biases drawn from N(0, 0.5)
  _save_run(tmp_path / "run", cfg, biased)
  nonzero = r"cannot express block 0 of router_bias\.layers\.0\.ffn\.router\.bias: it is nonzero"
  with pytest.raises(ExportError, match=nonzero):
    export(str(tmp_path / "run"), str(tmp_path / "hf"), format="qwen3_moe")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_the_command_line_names_where_the_mtp_modules_went(case, tmp_path, capsys):
  _, _, run, _, _, _ = case("mtp")
  assert main(["--checkpoint", str(run), "--output", str(tmp_path / "hf"), "--format", "qwen3_moe"]) == 0
  out = capsys.readouterr().out
  assert "(qwen3_moe, bf16)" in out and out.rstrip().endswith("MTP at mtp.safetensors:model.layers.2"), out
  assert main(["--checkpoint", str(run), "--output", str(tmp_path / "ds"), "--format", "deepseek_v3"]) == 2
  assert "--format deepseek_v3 cannot express model.attention.kind=gqa" in _err_line(capsys)


@pytest.mark.parametrize("name", ["mtp", "tied"])
def test_import_gives_back_the_run_and_exports_again_bit_for_bit(case, name, tmp_path):
  """mtp-import reads the Qwen3-MoE layout, mtp.safetensors included, through the same table."""
  from test_import import _assert_same_export, _saved

  from mtp_jax.export.importer import import_

  cfg, state, run, hf_dir, _, _ = case(name)
  import_(str(hf_dir), str(tmp_path / "run"), base_config=str(run / "config.yaml"))
  assert config.load(tmp_path / "run" / "config.yaml").model == cfg.model
  want = named_leaves(jax.device_get({"params": state.params, "router_bias": state.router_bias}))
  saved = _saved(tmp_path / "run")
  assert saved.keys() == want.keys()
  for leaf, x in want.items():
    assert np.array_equal(saved[leaf], x), leaf
  export(str(tmp_path / "run"), str(tmp_path / "again"), format="qwen3_moe", dtype="fp32", max_shard_bytes=SHARD)
  _assert_same_export(hf_dir, tmp_path / "again")
  if cfg.model.mtp.depth:
    first, again = _mtp_file(hf_dir), _mtp_file(tmp_path / "again")
    assert first.keys() == again.keys() and all(first[n].tobytes() == again[n].tobytes() for n in first)


# ----------------------------------------------------------------------------- QK-norm in our GQA


def test_qk_norm_adds_one_scale_per_head_dim_and_changes_the_output():
  cfg = config.load(None, [*TINY, "model.attention.qk_norm=true"])
  plain = config.load(None, TINY)
  model, base = Transformer(cfg.model, rngs=nnx.Rngs(0)), Transformer(plain.model, rngs=nnx.Rngs(0))
  attn = model.layers[0].attn  # stack 0: the first_k_dense = 1 dense block
  assert attn.q_norm.scale.shape == attn.k_norm.scale.shape == (1, cfg.model.attention.head_dim)
  assert model.block(0).attn.q_norm.scale.shape == (cfg.model.attention.head_dim,)
  assert not hasattr(base.block(0).attn, "q_norm")
  real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert cost(cfg.model, cfg.data.seq_len).total_params == real

  tokens = jnp.asarray(_tokens(cfg, rows=2))
  ones = jnp.ones_like(tokens)

  def logits(m):
    return np.asarray(m.logits(m(tokens, ones, jnp.cumsum(ones, 1) - 1).hidden[0]))

  before = logits(model)
  assert np.abs(before - logits(base)).max() > 1e-3  # same weights (norms draw no randomness), normed q and k
  attn.k_norm.scale[...] = 2.0 * attn.k_norm.scale[...]  # the scale is used
  assert np.abs(before - logits(model)).max() > 1e-3


def test_qk_norm_is_for_gqa_only():
  with pytest.raises(ConfigError, match=r"^config error: model\.attention\.qk_norm: gqa only"):
    config.load(None, [*TINY, "model.attention.kind=mla", "model.attention.qk_norm=true"])
