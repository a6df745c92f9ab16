"""`mtp-export`: the DeepSeek-V3 layout loads in transformers and computes our logits; MTP by eqs. 21-23.

The transformers tests need `pip install -e '.[export-test]'` (torch CPU + transformers) and skip
without them. Our side runs in float32; logits are O(5) here, so a max abs difference around 1e-5
is float32 rounding through a few layers, while any layout or maths mistake moves logits by O(0.1).
"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import TINY, forward_logits
from safetensors import safe_open

import mtp_jax
from mtp_jax import config
from mtp_jax.cli.export import main
from mtp_jax.data import prepare
from mtp_jax.export import ExportError, deepseek_v3, source, writer
from mtp_jax.export.exporter import export
from mtp_jax.export.layout import SAME, Linear
from mtp_jax.train import checkpoint as checkpoint_lib
from mtp_jax.train import loop, optimizer, step
from mtp_jax.train.checkpoint import Checkpointer

TOL = 3e-5  # float32 rounding, see the module docstring
SHARD = 48_000  # bytes: the tiny models span several shards
MLA = ["model.attention.kind=mla", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=4"]

# q_lora_rank > 0, 2 shared experts, group-limited routing (4 groups, 2 kept), top-3 of 8,
# normalised gates scaled by 2.5, one dense layer first, two MTP modules.
LORA = [
  *MLA,
  "model.attention.q_lora_rank=12",
  "model.num_layers=3",
  "model.first_k_dense=1",
  "model.moe.num_shared_experts=2",
  "model.moe.n_group=4",
  "model.moe.topk_group=2",
  "model.moe.top_k=3",
  "model.moe.routed_scaling_factor=2.5",
  "model.mtp.depth=2",
]
# q_proj (q_lora_rank 0), gates not normalised, scale 1.5, tied embeddings, another RoPE base,
# and YaRN over an original context of 8 (the test tokens run to 16), mscale_all_dim apart from
# mscale so both its softmax correction and its cos/sin factor act.
FULL_Q = [
  *MLA,
  "model.attention.q_lora_rank=0",
  "model.first_k_dense=1",
  "model.moe.norm_topk_prob=false",
  "model.moe.routed_scaling_factor=1.5",
  "model.tie_embeddings=true",
  "model.attention.rope_theta=500",
  "model.attention.rope_scaling.factor=4",
  "model.attention.rope_scaling.original_max_position_embeddings=8",
  "model.attention.rope_scaling.mscale_all_dim=0.5",
  "model.mtp.depth=1",
]


# One MTP module applied at both depths (Nemotron 3 Super's shared head): one NextN layer.
SHARED = [*MLA, "model.attention.q_lora_rank=8", "model.mtp.depth=2", "model.mtp.share_weights=true"]


def _save_run(workdir: pathlib.Path, cfg, state, step_number: int = 1) -> None:
  """A run's workdir as mtp-train leaves it: config.yaml and checkpoints/<step>."""
  ckpt = Checkpointer(workdir / "checkpoints")
  ckpt.save(step_number, state, None)
  ckpt.wait()
  ckpt.close()
  (workdir / "config.yaml").write_text(config.to_yaml(cfg))


def _randomized(state, seed: int):
  """Norm scales moved off 1 (so swapping two of them shows) and router biases large enough
  to change which experts are chosen; the matrices are already random (init_std 0.2)."""
  rng = np.random.default_rng(seed)

  def draw(x, mean, std):
    return jax.device_put((mean + std * rng.normal(size=x.shape)).astype(x.dtype), x.sharding)

  params = jax.tree.map(lambda x: x if x.ndim > 1 else draw(x, 1.0, 0.3), state.params)
  return state.replace(params=params, router_bias=jax.tree.map(lambda x: draw(x, 0.0, 0.5), state.router_bias))


def _tokens(cfg, rows=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, cfg.model.vocab_size, (rows, cfg.data.seq_len)).astype(np.int32)


def _our_logits(cfg, state, tokens, zero_bias=False) -> list[np.ndarray]:
  """Float32 logits per depth, one document per row at positions 0..L-1."""
  bias = jax.tree.map(jnp.zeros_like, state.router_bias) if zero_bias else state.router_bias
  states = (jax.device_get(state.params), jax.device_get(bias))
  return list(np.asarray(forward_logits(step.graphdef_of(cfg), states, jnp.asarray(tokens))))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
  """name -> (cfg, state, workdir, fp32 export dir, our logits per depth, tokens)."""
  cache = {}

  def get(name):
    if name not in cache:
      cfg = config.load(None, [*TINY, *{"lora": LORA, "full_q": FULL_Q, "shared": SHARED}[name], "model.init_std=0.2"])
      init = step.make_init(cfg, optimizer.make(cfg.optimizer, cfg.train.steps))  # eager: no compile to wait for
      state = _randomized(init(jax.random.key(len(cache))), seed=len(cache))
      root = tmp_path_factory.mktemp(name)
      _save_run(root / "run", cfg, state)
      export(str(root / "run"), str(root / "hf"), dtype="fp32", max_shard_bytes=SHARD)
      tokens = _tokens(cfg)
      cache[name] = (cfg, state, root / "run", root / "hf", _our_logits(cfg, state, tokens), tokens)
    return cache[name]

  return get


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A real 2-step mtp-train run of a tiny MLA model (checkpoints at steps 1 and 2)."""
  workdir = tmp_path_factory.mktemp("trained") / "run"
  over = ["train.steps=2", "checkpoint.every=1", "model.mtp.depth=1", f"train.workdir={workdir}"]
  cfg = config.load(None, [*TINY, *MLA, "model.attention.q_lora_rank=8", *over])
  loop.train(cfg, log=lambda *_: None)
  return workdir


def _hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


def _load_hf(directory, dtype="float32"):
  torch, transformers = _hf()
  model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
    directory, dtype=getattr(torch, dtype), attn_implementation="eager", output_loading_info=True
  )
  return model.eval(), info


def _exported(directory) -> dict[str, np.ndarray]:
  index = json.loads((directory / writer.INDEX).read_text())
  out = {}
  for name, file in index["weight_map"].items():
    with safe_open(directory / file, framework="numpy") as f:
      out[name] = f.get_tensor(name)
  return out


# ----------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("name", ["lora", "full_q"])
def test_transformers_computes_our_logits(case, name):
  torch, _ = _hf()
  cfg, state, _, hf_dir, ours, tokens = case(name)
  model, info = _load_hf(hf_dir)
  assert not info["missing_keys"] and not info["mismatched_keys"], info
  mtp = {f"model.layers.{cfg.model.num_layers + k}." for k in range(cfg.model.mtp.depth)}
  assert all(any(k.startswith(p) for p in mtp) for k in info["unexpected_keys"]), info["unexpected_keys"]
  b, length = tokens.shape
  with torch.no_grad():
    logits = model(torch.tensor(tokens, dtype=torch.long), position_ids=torch.arange(length).expand(b, -1)).logits
  diff = np.abs(logits.numpy() - ours[0]).max()
  assert diff < TOL, f"{name}: max abs logit difference {diff:.2e} (logits up to {np.abs(ours[0]).max():.1f})"
  if cfg.model.moe.num_experts:  # the router bias matters here, so it was carried over
    moved = np.abs(_our_logits(cfg, state, tokens, zero_bias=True)[0] - ours[0]).max()
    assert moved > 0.1, f"the router bias hardly changes the logits ({moved:.2e}): the test would not see it lost"
  if cfg.model.attention.rope_scaling:
    _assert_yarn_matters(cfg, state, tokens, ours[0])


def _assert_yarn_matters(cfg, state, tokens, logits) -> None:
  """The same weights without YaRN compute other logits: a comparison that would see it lost."""
  plain = cfg.model.attention.model_copy(update={"rope_scaling": None})
  plain = cfg.model_copy(update={"model": cfg.model.model_copy(update={"attention": plain})})
  moved = np.abs(_our_logits(plain, state, tokens)[0] - logits).max()
  assert moved > 0.1, f"YaRN hardly changes the logits ({moved:.2e})"


def _rms(x, w, eps):
  torch, _ = _hf()
  return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mtp_from_tensors(hf_dir, model, tokens, depth: int = 0, layer_class=None) -> list[np.ndarray]:
  """DeepSeek-V3 eqs. 21-23 from the exported tensors alone: module k reads layer N + k - 1's
  enorm, hnorm, eh_proj (embedding half first), embed_tokens and shared_head copies; its block is
  transformers' DeepseekV3DecoderLayer on that layer's tensors. h^0 is the main model's
  final-normed state (what vLLM / SGLang feed), h^k (k >= 1) a block's output before its norm."""
  torch, _ = _hf()
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer

  c = model.config
  t = {k: torch.from_numpy(v) for k, v in _exported(hf_dir).items()}
  b, length = tokens.shape
  ids = torch.tensor(tokens, dtype=torch.long)
  positions = torch.arange(length).expand(b, -1)
  causal = torch.full((length, length), float("-inf")).triu(1)[None, None]
  out = []
  with torch.no_grad():
    h = model.model(ids, position_ids=positions).last_hidden_state
    rope = model.model.rotary_emb(h, positions)
    for k in range(1, (depth or c.num_nextn_predict_layers) + 1):  # a shared layer: applied `depth` times
      p = f"model.layers.{c.num_hidden_layers + min(k, c.num_nextn_predict_layers) - 1}."
      nxt = torch.cat([ids[:, k:], torch.zeros_like(ids[:, :k])], 1)  # t_{i+k}; past the end: 0, as ours
      emb = torch.nn.functional.embedding(nxt, t[p + "embed_tokens.weight"])
      eps = c.rms_norm_eps
      both = torch.cat([_rms(emb, t[p + "enorm.weight"], eps), _rms(h, t[p + "hnorm.weight"], eps)], dim=-1)
      x = both @ t[p + "eh_proj.weight"].T  # eq. 21
      layer = (layer_class or DeepseekV3DecoderLayer)(c, layer_idx=c.num_hidden_layers + k - 1).eval()
      parts = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")  # the block, not the MTP extras
      block = {n[len(p) :]: v for n, v in t.items() if n.startswith(p) and ".experts." not in n}
      block = {n: v for n, v in block.items() if n.split(".")[0] in parts}
      # transformers keeps experts fused ([E, 2F, D] gate then up, [E, D, F]); from_pretrained fuses them too.
      w = [
        {q: t[f"{p}mlp.experts.{e}.{q}_proj.weight"] for q in ("gate", "up", "down")} for e in range(c.n_routed_experts)
      ]
      block["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([x["gate"], x["up"]]) for x in w])
      block["mlp.experts.down_proj"] = torch.stack([x["down"] for x in w])
      layer.load_state_dict(block, strict=True)
      h = layer(x, attention_mask=causal, position_ids=positions, position_embeddings=rope)  # eq. 22
      logits = _rms(h, t[p + "shared_head.norm.weight"], eps) @ t[p + "shared_head.head.weight"].T  # eq. 23
      out.append(logits.numpy())
  return out


@pytest.mark.parametrize("name", ["lora", "full_q", "shared"])
def test_mtp_layers_compute_our_depth_logits_by_eqs_21_to_23(case, name):
  cfg, _, _, hf_dir, ours, tokens = case(name)
  model, _ = _load_hf(hf_dir)
  assert model.config.num_nextn_predict_layers == cfg.model.mtp.modules  # a shared module: one NextN layer
  theirs = _mtp_from_tensors(hf_dir, model, tokens, cfg.model.mtp.depth)
  assert len(theirs) == cfg.model.mtp.depth
  length = tokens.shape[1]
  for k, logits in enumerate(theirs, start=1):
    valid = slice(0, length - k)  # position i reads token i + k
    diff = np.abs(logits[:, valid] - ours[k][:, valid]).max()
    assert diff < TOL, f"{name}: MTP depth {k}: max abs logit difference {diff:.2e}"


def test_transformers_own_mtp_module_loads_the_layer_and_matches_depth_1(case):
  """transformers' MtpModel (its speculative-decoding drafter) reads the MTP layer under the
  published names and computes our depth-1 logits. It looks for the layer only at index 61
  (DeepSeek-V3's own depth), so the test points it at layer N; it chains modules by their
  normed output, where ours (MTP.md) feeds the next module the block output, so depth 2 differs."""
  torch, _ = _hf()
  from transformers.modeling_layers import MtpModel

  cfg, _, _, hf_dir, ours, tokens = case("lora")
  model, _ = _load_hf(hf_dir)
  n = cfg.model.num_layers
  model._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n + k}\." for k in range(cfg.model.mtp.depth)]
  mtp = MtpModel.from_pretrained(model)  # raises if any MTP weight is missing
  b, length = tokens.shape
  ids = torch.tensor(tokens, dtype=torch.long)
  positions = torch.arange(length).expand(b, -1)
  with torch.no_grad():
    h = model.model(ids, position_ids=positions).last_hidden_state
    nxt = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)
    logits = mtp._project_to_logits(mtp.forward_layer(0, h, positions, None, input_ids=nxt)).numpy()
  diff = np.abs(logits[:, : length - 1] - ours[1][:, : length - 1]).max()
  assert diff < TOL, f"transformers MtpModel depth 1: max abs logit difference {diff:.2e}"


def test_bf16_export_is_the_fp32_export_rounded_and_loads(case, tmp_path):
  _, _, run, hf_dir, _, _ = case("lora")
  export(str(run), str(tmp_path / "bf16"), dtype="bf16", max_shard_bytes=SHARD)
  fp32, bf16 = _exported(hf_dir), _exported(tmp_path / "bf16")
  assert fp32.keys() == bf16.keys()
  for name, x in fp32.items():
    if name.endswith("e_score_correction_bias"):  # kept in float32, as transformers keeps it
      assert bf16[name].dtype == np.float32 and np.array_equal(bf16[name], x), name
    else:
      assert bf16[name].dtype == ml_dtypes.bfloat16 and np.array_equal(bf16[name], x.astype(ml_dtypes.bfloat16)), name
  conf = json.loads((tmp_path / "bf16" / "config.json").read_text())
  assert conf["dtype"] == conf["torch_dtype"] == "bfloat16"
  _, info = _load_hf(tmp_path / "bf16", "bfloat16")
  assert not info["missing_keys"] and not info["mismatched_keys"]


# ----------------------------------------------------------------------------- the layout itself


def test_published_names_shards_and_the_mtp_layers_copies(case):
  _, _, _, hf_dir, _, _ = case("lora")
  index = json.loads((hf_dir / writer.INDEX).read_text())
  files = sorted({*index["weight_map"].values()})
  assert len(files) > 3 and files == [
    f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)
  ]
  assert sorted(p.name for p in hf_dir.glob("*.safetensors")) == files
  for file in files:  # each name is in the file the index says, and nothing else is there
    with safe_open(hf_dir / file, framework="numpy") as f:
      assert set(f.keys()) == {n for n, v in index["weight_map"].items() if v == file}
  t = _exported(hf_dir)
  assert index["metadata"]["total_size"] == sum(x.nbytes for x in t.values())
  attn = ["q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"]
  block = {f"self_attn.{a}.weight" for a in attn} | {"input_layernorm.weight", "post_attention_layernorm.weight"}
  moe = {"mlp.gate.weight", "mlp.gate.e_score_correction_bias"}
  moe |= {
    f"mlp.{e}.{p}_proj.weight"
    for e in [*(f"experts.{i}" for i in range(8)), "shared_experts"]
    for p in ("gate", "up", "down")
  }
  dense = {f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
  mtp = {"enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight"}
  mtp |= {"shared_head.norm.weight", "shared_head.head.weight"}

  def layer(i):
    return {n.removeprefix(f"model.layers.{i}.") for n in t if n.startswith(f"model.layers.{i}.")}

  assert layer(0) == block | dense and layer(1) == layer(2) == block | moe
  assert layer(3) == layer(4) == block | moe | mtp  # MTP modules 1 and 2 at num_hidden_layers + k - 1
  assert not layer(5) and {n for n in t if not n.startswith("model.layers.")} == {
    "model.embed_tokens.weight",
    "model.norm.weight",
    "lm_head.weight",
  }
  assert t["model.layers.3.eh_proj.weight"].shape == (32, 64)  # [D, 2D]
  for k in (3, 4):  # vLLM and SGLang read these copies, not the main model's
    assert np.array_equal(t[f"model.layers.{k}.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert np.array_equal(t[f"model.layers.{k}.shared_head.head.weight"], t["lm_head.weight"])
  tied = _exported(case("full_q")[3])
  assert "model.layers.2.self_attn.q_proj.weight" in tied and "model.layers.2.self_attn.q_a_proj.weight" not in tied
  assert np.array_equal(tied["lm_head.weight"], tied["model.embed_tokens.weight"])  # written untied, same values


def test_config_json_has_every_key_deepseek_v3_reads(case):
  cfg, _, _, hf_dir, _, _ = case("lora")
  written = json.loads((hf_dir / "config.json").read_text())
  m = cfg.model
  assert written["architectures"] == ["DeepseekV3ForCausalLM"] and written["model_type"] == "deepseek_v3"
  assert written["num_nextn_predict_layers"] == 2 and written["num_hidden_layers"] == 3
  assert written["rope_interleave"] is True and written["topk_method"] == "noaux_tc"
  assert written["n_group"] == 4 and written["topk_group"] == 2 and written["num_experts_per_tok"] == 3
  assert written["routed_scaling_factor"] == 2.5 and written["n_shared_experts"] == 2
  assert written["q_lora_rank"] == 12 and written["first_k_dense_replace"] == m.first_k_dense
  assert written["rope_theta"] == written["rope_parameters"]["rope_theta"] == m.attention.rope_theta
  assert written["eos_token_id"] == m.eos_id and written["dtype"] == "float32"
  assert json.loads(case("full_q")[3].joinpath("config.json").read_text())["q_lora_rank"] is None
  generation = json.loads((hf_dir / "generation_config.json").read_text())
  assert generation == {"bos_token_id": None, "eos_token_id": m.eos_id}
  _, transformers = _hf()
  declared = set(transformers.DeepseekV3Config.__annotations__)
  # Runtime switches and an alias of num_nextn_predict_layers, not model settings.
  assert declared - set(written) <= {"output_router_logits", "pretraining_tp", "num_mtp_layers"}
  loaded = transformers.AutoConfig.from_pretrained(hf_dir)
  assert loaded.num_mtp_layers == 2 and loaded.q_lora_rank == 12 and loaded.rope_parameters["rope_theta"] == 10000


def check_table(table, leaves) -> None:
  """A format's tensor table names each Hugging Face tensor once, covers every parameter and
  router bias (nothing else), and its layouts invert: import gets back our leaf exactly. A
  `zero` entry (a router bias the format has no tensor for) is not written."""
  names = [t.hf for t in table]
  assert len(set(names)) == len(names)
  assert {t.ours for t in table} == set(leaves)
  rng = np.random.default_rng(0)
  for t in table:
    shape = leaves[t.ours].shape
    if t.zero:
      assert t.ours.startswith("router_bias.") and t.file is None
      continue
    x = rng.normal(size=t.part_shape(shape))
    y = t.layout.to_hf(x)
    assert y.shape == t.hf_shape(shape), t.hf
    np.testing.assert_array_equal(t.layout.from_hf(y, x.shape), x, err_msg=t.hf)


@pytest.mark.parametrize(
  "overrides",
  [
    LORA,
    FULL_Q,
    [*MLA, "model.moe.num_experts=0"],  # dense everywhere, MTP included
    [*MLA, "model.first_k_dense=2", "model.mtp.depth=0"],  # no MoE in the trunk, no MTP
    [*MLA, "model.mtp.depth=3", "model.attention.q_lora_rank=4"],
  ],
)
def test_the_table_exports_every_parameter_once_and_inverts(overrides):
  cfg = config.load(None, [*TINY, *overrides])
  check_table(deepseek_v3.tensors(cfg.model), source.abstract_leaves(cfg))
  dense = deepseek_v3.config_json(cfg, "float32", None)["first_k_dense_replace"]
  if not cfg.model.moe.num_experts:  # no layer, MTP layers included, may read as MoE
    assert dense == cfg.model.num_layers + cfg.model.mtp.depth


def test_rope_columns_are_stored_interleaved():
  """Our rotate-half pairs (i, i + r/2) become DeepSeek's adjacent pairs (2i, 2i + 1)."""
  x = np.arange(2 * 3 * 10).reshape(2, 3, 10)  # in 2, 3 heads of nope 4 + rope 6
  y = Linear(rope=6).to_hf(x)
  head0 = y[:10, 0]  # first head's output rows for input 0
  np.testing.assert_array_equal(head0, [0, 1, 2, 3, 4, 7, 5, 8, 6, 9])
  assert SAME.to_hf(x) is x


@pytest.mark.parametrize(
  ("override", "setting"),
  [
    ("model.attention.kind=gqa", "model.attention.kind=gqa"),
    ("model.mtp.kind=parallel", "model.mtp.kind=parallel"),
    ("model.moe.score_func=softmax", "model.moe.score_func=softmax"),
    ("model.moe.num_shared_experts=0", "model.moe.num_shared_experts=0"),
    ("model.mtp.use_moe=false", "model.mtp.use_moe=false"),
    ("model.norm_eps=1e-5", "model.norm_eps=1e-05"),
  ],
)
def test_settings_the_layout_cannot_express_are_refused_by_name(override, setting):
  cfg = config.load(None, [*TINY, *MLA, override])
  with pytest.raises(ExportError, match=f"cannot express {setting}: "):
    deepseek_v3.check(cfg.model)
  deepseek_v3.check(config.load(None, [*TINY, *MLA]).model)  # the defaults pass


# ----------------------------------------------------------------------------- the command line


def _err_line(capsys) -> str:
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "Traceback" not in err, err
  return err


def test_a_trained_run_exports_its_latest_step_or_the_one_named(trained, tmp_path, capsys):
  workdir = trained
  assert main(["--checkpoint", str(workdir), "--output", str(tmp_path / "latest"), "--dtype", "fp32"]) == 0
  out = capsys.readouterr()
  assert f"from {workdir / 'checkpoints' / '2'}:" in out.out and "MTP at model.layers.2" in out.out
  assert out.err.startswith("mtp-export: warning: vLLM will not serve this export: its MLA kernels take")
  assert (tmp_path / "latest" / "tokenizer.json").is_file()  # the byte-level tokens
  step1 = workdir / "checkpoints" / "1"
  assert main(["--checkpoint", str(step1), "--output", str(tmp_path / "one"), "--dtype", "fp32"]) == 0
  assert f"from {step1}:" in capsys.readouterr().out
  latest, first = _exported(tmp_path / "latest"), _exported(tmp_path / "one")
  assert latest.keys() == first.keys()
  assert not np.array_equal(latest["model.layers.1.mlp.gate.weight"], first["model.layers.1.mlp.gate.weight"])
  # The router bias after steps 1 and 2: each step of eq. 16 moves each expert's by -gamma, 0 (its
  # load exactly the mean) or +gamma, gamma 1e-3.
  b1, b2 = (run["model.layers.1.mlp.gate.e_score_correction_bias"] for run in (first, latest))
  moves = np.stack([b1, b2 - b1]) / 1e-3
  assert b2.dtype == np.float32 and np.any(b2 != 0)
  assert np.allclose(moves, np.round(moves), atol=1e-3) and np.abs(np.round(moves)).max() == 1
  assert main(["--checkpoint", str(workdir / "checkpoints"), "--output", str(tmp_path / "c")]) == 0
  assert f"from {workdir / 'checkpoints' / '2'}:" in capsys.readouterr().out
  _, info = _load_hf(tmp_path / "latest")
  assert not info["missing_keys"]


def test_bad_input_is_one_line_and_exit_2(trained, tmp_path, capsys):
  workdir = trained

  def run(*args):
    return main(["--checkpoint", *args[:1], "--output", str(tmp_path / "out"), *args[1:]])

  assert run(str(tmp_path / "nope")) == 2
  assert "nope: no such file or directory" in _err_line(capsys)
  (tmp_path / "empty").mkdir()
  assert run(str(tmp_path / "empty")) == 2
  assert "empty: not a checkpoint" in _err_line(capsys)
  assert run(str(workdir / "checkpoints" / "7")) == 2
  assert "checkpoints/7: no such step; steps there: 1, 2" in _err_line(capsys)
  assert run(str(workdir), "--format", "qwen3_moe") == 2
  assert "--format qwen3_moe cannot express model.attention.kind=mla" in _err_line(capsys)
  with pytest.raises(SystemExit) as exit_:
    run(str(workdir), "--format", "onnx")
  assert exit_.value.code == 2 and "invalid choice: 'onnx'" in _err_line(capsys)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  assert run(str(workdir)) == 2
  assert "out: already exists and is not empty; pass --overwrite" in _err_line(capsys)
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
  for parent, problem in [(tmp_path / "out" / "keep.txt", "is not a directory"), (tmp_path / "no", "does not exist")]:
    assert main(["--checkpoint", str(workdir), "--output", str(parent / "x")]) == 2
    assert f"--output {parent / 'x'}: its parent {parent} {problem}" in _err_line(capsys)

  other = tmp_path / "other"  # the same checkpoints, a config that does not describe them
  shutil.copytree(workdir / "checkpoints", other / "checkpoints")
  assert run(str(other), "--overwrite") == 2
  assert f"no {other / 'config.yaml'}" in _err_line(capsys)
  cfg = config.load(workdir / "config.yaml")
  for change, want in [
    ("model.attention.kind=gqa", "--format deepseek_v3 cannot express model.attention.kind=gqa"),
    ("model.d_model=48", "does not fit its run's"),
  ]:
    (other / "config.yaml").write_text(config.to_yaml(config.load(workdir / "config.yaml", [change])))
    assert run(str(other), "--overwrite") == 2
    assert want in _err_line(capsys), change
  assert cfg == config.load(workdir / "config.yaml")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "other", "out"]  # nothing half-written
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_an_export_cut_short_leaves_nothing_that_looks_complete(trained, tmp_path, monkeypatch):
  workdir = trained
  reads, calls = source.Reader.read, []

  def fail_third(self, names):
    calls.append(names)
    if len(calls) % 3 == 0:
      raise ExportError("stop here")
    return reads(self, names)

  monkeypatch.setattr(source.Reader, "read", fail_third)
  out = tmp_path / "out"
  with pytest.raises(ExportError, match="stop here"):
    export(str(workdir), str(out), max_shard_bytes=SHARD // 8, max_read_bytes=1)
  assert list(tmp_path.iterdir()) == []
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  with pytest.raises(ExportError, match="stop here"):
    export(str(workdir), str(out), overwrite=True, max_shard_bytes=SHARD // 8, max_read_bytes=1)
  assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]
  monkeypatch.setattr(source.Reader, "read", reads)
  export(str(workdir), str(out), overwrite=True)
  assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / writer.INDEX).is_file()
  assert not (out / "keep.txt").exists()


def _script_env():
  return {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(mtp_jax.__file__))}


def test_console_script_exports_and_names_a_damaged_checkpoint_in_one_line(trained, tmp_path):
  workdir = trained
  script = shutil.which("mtp-export", path=os.path.dirname(sys.executable))
  command = [script] if script else [sys.executable, "-m", "mtp_jax.cli.export"]
  ok = subprocess.run(
    [*command, "--checkpoint", str(workdir), "--output", str(tmp_path / "hf")],
    capture_output=True,
    text=True,
    env=_script_env(),
  )
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.startswith(f"wrote {tmp_path / 'hf'} (deepseek_v3, bf16)") and ok.stderr.count("\n") == 1
  damaged = tmp_path / "damaged"
  shutil.copytree(workdir, damaged)
  for data in (damaged / "checkpoints" / "2" / "state").rglob("d/*"):
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
  bad = subprocess.run(
    [*command, "--checkpoint", str(damaged), "--output", str(tmp_path / "bad")],
    capture_output=True,
    text=True,
    env=_script_env(),
  )
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
  assert f"checkpoint {damaged / 'checkpoints' / '2'} is damaged (" in bad.stderr
  assert "export an earlier step by naming its directory" in bad.stderr
  assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_a_stack_is_stored_and_read_a_block_at_a_time_and_checked_whole(case, tmp_path, monkeypatch):
  """A stack of trunk blocks is one array, saved in chunks of one block; export reads it block by
  block (never whole), and the blocks' checksum terms must add up to the one saved for the array:
  a stack that differs from its record is refused before anything is written."""
  import orbax.checkpoint as ocp

  run = case("lora")[2]
  src = source.locate(str(run))
  leaves = source.abstract_leaves(src.config)
  name = next(n for n in leaves if n.startswith("params.layers.1.") and leaves[n].ndim >= 3)
  n_blocks = leaves[name].shape[0]
  assert n_blocks > 1
  saved = checkpoint_lib.named_leaves(ocp.PyTreeCheckpointHandler().metadata(src.step_dir / "state").tree)
  assert saved[name].storage.chunk_shape[0] == 1

  blocks, wholes = [], []
  read_block, read_whole = source.Reader._read_block, source.Reader._read_whole
  monkeypatch.setattr(source.Reader, "_read_block", lambda r, n, j: blocks.append((n, j)) or read_block(r, n, j))
  monkeypatch.setattr(source.Reader, "_read_whole", lambda r, names: wholes.extend(names) or read_whole(r, names))
  export(str(run), str(tmp_path / "hf"))
  assert sorted(j for n, j in blocks if n == name) == list(range(n_blocks)) and name not in wholes

  record = Checkpointer.run_record

  def altered(self, step):
    run = record(self, step)
    run["checksums"][name] = (run["checksums"][name] + 1) % 2**32
    return run

  monkeypatch.setattr(Checkpointer, "run_record", altered)
  with pytest.raises(ExportError, match=rf"is damaged \({re.escape(name)} does not match its checksum\)"):
    export(str(run), str(tmp_path / "bad"))
  assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_the_runs_hugging_face_tokenizer_is_written_beside_the_weights(trained, tmp_path):
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  workdir = trained
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  texts = [f"the quick brown fox {i} jumps over the lazy dog" for i in range(50)]
  trainer = trainers.BpeTrainer(
    special_tokens=["<s>", "</s>"],
    vocab_size=300,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "docs.txt").write_text("\n".join(texts))
  prepare.prepare(
    [str(tmp_path / "docs.txt")], str(tmp_path / "data"), tokenizer=str(tmp_path / "tokenizer.json"), workers=0
  )
  run = tmp_path / "run"  # the trained weights, as if trained on that data
  shutil.copytree(workdir / "checkpoints", run / "checkpoints")
  eos = tok.token_to_id("</s>")
  cfg = config.load(workdir / "config.yaml", [f"data.sources=[{{path: {tmp_path / 'data'}}}]", f"model.eos_id={eos}"])
  (run / "config.yaml").write_text(config.to_yaml(cfg))

  result = export(str(run), str(tmp_path / "hf"))
  assert result.notes == deepseek_v3.serving_notes(cfg.model)  # this tiny latent: vLLM's warning alone
  hf = tmp_path / "hf"
  assert (hf / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
  special = json.loads((hf / "tokenizer_config.json").read_text())
  assert special["eos_token"] == "</s>" and special["bos_token"] == "<s>" and special["pad_token"] is None
  conf = json.loads((hf / "config.json").read_text())
  generation = json.loads((hf / "generation_config.json").read_text())
  assert conf["bos_token_id"] == generation["bos_token_id"] == tok.token_to_id("<s>")
  assert conf["eos_token_id"] == generation["eos_token_id"] == eos

  shutil.copyfile(tmp_path / "tokenizer.json", tmp_path / "original.json")
  (tmp_path / "tokenizer.json").write_text("{}")  # no longer the file the data was made with
  result = export(str(run), str(tmp_path / "changed"))
  assert result.notes[0] == (
    f"no tokenizer files written: {tmp_path / 'tokenizer.json'} changed since the data was prepared"
  )
  assert not (tmp_path / "changed" / "tokenizer.json").exists()

  _, transformers = _hf()
  loaded = transformers.AutoTokenizer.from_pretrained(hf)
  assert loaded.eos_token == "</s>" and loaded.bos_token == "<s>"
  assert loaded("the lazy fox", add_special_tokens=False).input_ids == tok.encode("the lazy fox").ids


def test_a_byte_level_run_exports_a_tokenizer_transformers_uses_as_it_is(case):
  """The stdlib corpus's byte-level ids as a tokenizer.json: AutoTokenizer encodes UTF-8 bytes to
  the ids we trained on, adds nothing, knows EOS, and transformers' generate runs on the directory
  with no extra setting and picks our model's greedy token."""
  _, transformers = _hf()
  cfg, state, _, hf_dir, _, _ = case("lora")
  tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
  text = "def é(x): €\n\t"
  ids = tok(text).input_ids
  assert ids == list(text.encode()) and tok.decode(ids) == text
  assert tok.eos_token_id == cfg.model.eos_id == 256 and tok.decode([*ids, 256], skip_special_tokens=True) == text
  model, _ = _load_hf(hf_dir)
  out = model.generate(**tok(text, return_tensors="pt"), max_new_tokens=1, do_sample=False)
  ours = _our_logits(cfg, state, np.asarray([ids], np.int32))[0][0, -1]
  assert out[0, -1].item() == int(np.argmax(ours))


def test_mla_dimensions_vllm_cannot_serve_are_named_in_one_line(tiny):
  """vLLM's MLA kernels take kv_lora_rank + qk_rope_head_dim of 320, 512 or 576 only."""
  servable = tiny(*MLA, "model.attention.kv_lora_rank=512", "model.attention.qk_rope_head_dim=64").model
  assert deepseek_v3.serving_notes(servable) == []
  [note] = deepseek_v3.serving_notes(tiny(*MLA).model)
  assert note.startswith("warning: vLLM will not serve this export: its MLA kernels take") and "16 + 4 = 20" in note
