"""`mtp-import`: a Hugging Face directory becomes a run that trains, and exports back bit for bit.

The models and exports are test_export.py's (`case`, `trained`); the independent source is a
model transformers itself initialises and saves. Logit tolerances are test_export.py's (float32).
"""

# ruff: noqa: F401, F811 (fixtures imported from test_export: used as test arguments, which ruff cannot see)
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import TINY
from safetensors.numpy import save_file
from test_export import (
  LORA,
  MLA,
  SHARD,
  TOL,
  _err_line,
  _exported,
  _hf,
  _load_hf,
  _our_logits,
  _script_env,
  _tokens,
  case,
  trained,
)

from mtp_jax import config
from mtp_jax.cli.export import import_main
from mtp_jax.export import ExportError, deepseek_v3, importer, source, writer
from mtp_jax.export.exporter import export
from mtp_jax.export.importer import import_
from mtp_jax.train import loop
from mtp_jax.train.checkpoint import Checkpointer, named_leaves
from mtp_jax.train.program import build


@pytest.fixture(scope="module")
def imported(case, tmp_path_factory):
  """name -> the run imported from case(name)'s fp32 export, with the original run's config as --config."""
  cache = {}

  def get(name):
    if name not in cache:
      _, _, run, hf_dir, _, _ = case(name)
      out = tmp_path_factory.mktemp(f"imported-{name}") / "run"
      import_(str(hf_dir), str(out), base_config=str(run / "config.yaml"))
      cache[name] = out
    return cache[name]

  return get


def _saved(run_dir) -> dict[str, np.ndarray]:
  """Every parameter and router bias of a run's latest checkpoint, by name."""
  src = source.locate(str(run_dir))
  leaves = source.abstract_leaves(src.config)
  reader = source.Reader(src, leaves)
  try:
    return {name: x for (name, _), x in reader.read([(name, None) for name in leaves]).items()}
  finally:
    reader.close()


def _assert_same_export(a, b) -> None:
  """The same tensors bit for bit (names, dtypes, shapes, bits) and the same config.json."""
  x, y = _exported(a), _exported(b)
  assert x.keys() == y.keys()
  for name in x:
    assert x[name].dtype == y[name].dtype and x[name].tobytes() == y[name].tobytes(), name
  assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["lora", "full_q"])
def test_import_gives_back_the_run_and_exports_again_bit_for_bit(case, imported, name, tmp_path):
  cfg, state, _, hf_dir, _, _ = case(name)
  out = imported(name)
  assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "config.yaml", "tokenizer"]
  got = config.load(out / "config.yaml")  # the model (tie_embeddings included) and everything else
  assert got.model == cfg.model and got.train.workdir == str(out) and got.optimizer == cfg.optimizer
  want = named_leaves(jax.device_get({"params": state.params, "router_bias": state.router_bias}))
  saved = _saved(out)
  assert saved.keys() == want.keys()
  for leaf, x in want.items():  # the fp32 export loses nothing: the params are the originals exactly
    assert saved[leaf].dtype == x.dtype and np.array_equal(saved[leaf], x), leaf
  export(str(out), str(tmp_path / "again"), dtype="fp32", max_shard_bytes=SHARD)
  _assert_same_export(hf_dir, tmp_path / "again")


def test_a_bf16_export_imports_and_exports_again_bit_for_bit(case, tmp_path):
  _, _, run, _, _, _ = case("lora")
  export(str(run), str(tmp_path / "bf16"), max_shard_bytes=SHARD)
  import_(str(tmp_path / "bf16"), str(tmp_path / "run"), base_config=str(run / "config.yaml"))
  assert _saved(tmp_path / "run")["params.embed.table"].dtype == np.float32  # model.param_dtype
  export(str(tmp_path / "run"), str(tmp_path / "again"), max_shard_bytes=SHARD)
  _assert_same_export(tmp_path / "bf16", tmp_path / "again")


@pytest.mark.parametrize(
  "overrides",
  [
    LORA,
    [*MLA, "model.tie_embeddings=true", "model.attention.q_lora_rank=0", "model.moe.norm_topk_prob=false"],
    [*MLA, "model.moe.num_experts=0"],  # dense everywhere: first_k_dense_replace past the MTP layers
    [*MLA, "model.first_k_dense=2", "model.mtp.depth=1"],  # a dense trunk, an MoE MTP module
    [*MLA, "model.mtp.depth=0", "model.moe.n_group=1", "model.moe.topk_group=1"],
  ],
)
def test_model_config_inverts_config_json(overrides):
  cfg = config.load(None, [*TINY, *overrides])
  model = deepseek_v3.model_config(deepseek_v3.config_json(cfg, "float32", None))
  back = config.from_dict({**cfg.model_dump(mode="json"), "model": config._merge(cfg.model_dump()["model"], model)})
  if cfg.model.moe.num_experts:
    assert back.model == cfg.model
  else:  # no layer reads first_k_dense then; config_json writes every layer dense
    assert back.model == cfg.model.model_copy(update={"first_k_dense": cfg.model.num_layers})
    assert deepseek_v3.tensors(back.model) == deepseek_v3.tensors(cfg.model)


# The published deepseek-ai/DeepSeek-V3 config.json, abridged to the keys that matter here.
PUBLISHED = {
  "model_type": "deepseek_v3",
  "vocab_size": 129280,
  "hidden_size": 7168,
  "intermediate_size": 18432,
  "moe_intermediate_size": 2048,
  "num_hidden_layers": 61,
  "num_nextn_predict_layers": 1,
  "num_attention_heads": 128,
  "num_key_value_heads": 128,
  "n_shared_experts": 1,
  "n_routed_experts": 256,
  "routed_scaling_factor": 2.5,
  "kv_lora_rank": 512,
  "q_lora_rank": 1536,
  "qk_rope_head_dim": 64,
  "v_head_dim": 128,
  "qk_nope_head_dim": 128,
  "topk_method": "noaux_tc",
  "n_group": 8,
  "topk_group": 4,
  "num_experts_per_tok": 8,
  "moe_layer_freq": 1,
  "first_k_dense_replace": 3,
  "norm_topk_prob": True,
  "scoring_func": "sigmoid",
  "hidden_act": "silu",
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000,
  "max_position_embeddings": 163840,
  "rope_scaling": {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
  },
  "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8"},
  "tie_word_embeddings": False,
  "eos_token_id": 1,
}


def test_the_published_deepseek_v3_config_imports_once_its_weights_are_bf16():
  with pytest.raises(ExportError, match=r"^config.json quantization_config: fp8 weights are not supported; convert"):
    deepseek_v3.model_config(PUBLISHED)
  plain = {k: v for k, v in PUBLISHED.items() if k != "quantization_config"}
  model = deepseek_v3.model_config(plain)
  cfg = config.from_dict({"model": model, "data": {"path": "x"}, "mesh": {"expert": 1}})  # a valid config
  m = cfg.model
  assert (m.num_layers, m.first_k_dense, m.moe.num_experts, m.moe.n_group, m.mtp.depth) == (61, 3, 256, 8, 1)
  assert m.attention.q_lora_rank == 1536 and m.eos_id == 1 and not m.tie_embeddings
  yarn = m.attention.rope_scaling
  assert (yarn.factor, yarn.original_max_position_embeddings, yarn.mscale, yarn.mscale_all_dim) == (40, 4096, 1, 1)
  written = deepseek_v3.config_json(cfg, "bfloat16", None)  # and back: the published keys
  assert {k: written["rope_scaling"][k] for k in PUBLISHED["rope_scaling"]} == PUBLISHED["rope_scaling"]
  assert written["max_position_embeddings"] == PUBLISHED["max_position_embeddings"]
  for change, named in [
    ({"hidden_act": "gelu"}, 'hidden_act="gelu"'),
    ({"scoring_func": "softmax"}, 'scoring_func="softmax"'),
    ({"topk_method": "group_limited_greedy"}, 'topk_method="group_limited_greedy"'),
    ({"moe_layer_freq": 2}, "moe_layer_freq=2"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps=1e-05"),
    ({"attention_bias": True}, "attention_bias=true"),
    ({"num_key_value_heads": 16}, "num_key_value_heads=16"),
    ({"num_nextn_predict_layers": 2, "first_k_dense_replace": 62}, "first_k_dense_replace=62"),  # MTP 1 dense, 2 MoE
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4}}, "rope_parameters"),
    ({"rope_scaling": {**PUBLISHED["rope_scaling"], "attention_factor": 0.5}}, "rope_scaling"),
  ]:
    with pytest.raises(ExportError, match=rf"^config.json {named}: "):
      deepseek_v3.model_config({**plain, **change})
  dense = deepseek_v3.model_config({**plain, "first_k_dense_replace": 62})  # past the MTP layer too: no MoE at all
  assert dense["moe"]["num_experts"] == 0 and dense["first_k_dense"] == 61


def test_defaults_for_omitted_keys_are_transformers():
  _, transformers = _hf()
  ours = {k: v for k, v in deepseek_v3.DEFAULTS.items() if k not in ("topk_method", "scoring_func", "moe_layer_freq")}
  theirs = transformers.DeepseekV3Config()
  assert {k: getattr(theirs, k) for k in ours if k != "rope_theta"} == {
    k: v for k, v in ours.items() if k != "rope_theta"
  }
  assert theirs.rope_parameters["rope_theta"] == ours["rope_theta"]


# ----------------------------------------------------------------------------- training from an import


def test_an_imported_model_trains_restored_params_only_and_in_place(trained, tmp_path):
  workdir = trained  # a real 2-step run (MTP depth 1, q_lora_rank 8), exported in bf16
  export(str(workdir), str(tmp_path / "hf"))
  imp = tmp_path / "imp"
  import_(str(tmp_path / "hf"), str(imp), base_config=str(workdir / "config.yaml"))
  logs = []
  runs = [
    ([f"checkpoint.restore_from={imp}"], f"restored step 0 from {imp / 'checkpoints' / '0'}"),
    ([f"checkpoint.restore_from={imp}", "checkpoint.load_params_only=true"], f"loaded parameters from {imp}"),
  ]
  for i, (extra, said) in enumerate(runs):
    other = tmp_path / f"other{i}"
    records = loop.train(config.load(imp / "config.yaml", [f"train.workdir={other}", *extra]), log=logs.append)
    assert records and all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any(said in line for line in logs), logs
    assert (other / "checkpoints" / "2").is_dir()
  logs.clear()
  loop.train(config.load(imp / "config.yaml"), log=logs.append)  # `mtp-train --config DIR/config.yaml`
  assert any(f"resumed from step 0 in {imp / 'checkpoints'}" in line for line in logs), logs
  assert any("holds no data position (an imported model)" in line for line in logs), logs
  assert (imp / "checkpoints" / "2").is_dir()


# ----------------------------------------------------------------------------- an independent source


@pytest.fixture(scope="module")
def saved_by_transformers(tmp_path_factory):
  """(torch model, directory): transformers initialises and saves a DeepseekV3 model (per-expert
  tensor names, no MTP layer although num_nextn_predict_layers is 1, a tied head left out)."""
  torch, transformers = _hf()
  hf_cfg = transformers.DeepseekV3Config(
    vocab_size=320,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=2,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=4,
    topk_group=2,
    kv_lora_rank=16,
    q_lora_rank=12,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
    first_k_dense_replace=1,
    routed_scaling_factor=2.5,
    eos_token_id=256,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 500.0},
    attn_implementation="eager",
  )
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
  with torch.no_grad():  # norms off 1, matrices large enough that a layout mistake shows, a router bias that matters
    for p in model.parameters():
      if p.ndim == 1:
        p.normal_(1.0, 0.3)
      else:
        p.normal_(0.0, 0.2)
    for name, b in model.named_buffers():  # not the RoPE frequencies
      if name.endswith("e_score_correction_bias"):
        b.normal_(0.0, 0.5)
  directory = tmp_path_factory.mktemp("transformers") / "hf"
  model.save_pretrained(directory)
  assert not (directory / writer.INDEX).exists()  # one model.safetensors
  return model, directory


def test_a_model_transformers_saved_imports_and_computes_its_logits(saved_by_transformers, tmp_path):
  torch, _ = _hf()
  model, hf_dir = saved_by_transformers
  over = ["data.seq_len=16", "train.batch_size=8"]
  with pytest.raises(
    ExportError, match=r"no tensor model\.layers\.3\..*import the model without them with model.mtp.depth=0"
  ):
    import_(str(hf_dir), str(tmp_path / "run"), overrides=over)
  assert not (tmp_path / "run").exists()
  result = import_(str(hf_dir), str(tmp_path / "run"), overrides=[*over, "model.mtp.depth=0"])
  cfg = result.config
  assert cfg.model.tie_embeddings and cfg.model.attention.rope_theta == 500 and cfg.model.mtp.depth == 0
  assert cfg.model.moe.num_shared_experts == 2 and cfg.model.first_k_dense == 1 and cfg.model.eos_id == 256

  program = build(cfg)
  ckpt = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
  state, _ = ckpt.restore(0, program.abstract_state)
  ckpt.close()
  tokens = _tokens(cfg)
  ours = _our_logits(cfg, state, tokens)[0]
  b, length = tokens.shape
  with torch.no_grad():
    theirs = model(torch.tensor(tokens, dtype=torch.long), position_ids=torch.arange(length).expand(b, -1)).logits
  diff = np.abs(theirs.numpy() - ours).max()
  assert diff < TOL, f"max abs logit difference {diff:.2e} (logits up to {np.abs(ours).max():.1f})"

  export(str(tmp_path / "run"), str(tmp_path / "again"), dtype="fp32")  # what transformers saved, bit for bit
  saved, again = _exported_single(hf_dir), _exported(tmp_path / "again")
  assert set(again) == {*saved, "lm_head.weight"}
  assert all(again[n].tobytes() == x.tobytes() for n, x in saved.items())
  assert np.array_equal(again["lm_head.weight"], saved["model.embed_tokens.weight"])
  _, info = _load_hf(tmp_path / "again")
  assert not info["missing_keys"] and not info["unexpected_keys"]


def test_a_drafter_is_added_to_a_model_without_one(saved_by_transformers, tmp_path):
  """`mtp-import` with an explicit model.mtp.depth starts the MTP module the files lack afresh,
  with optimizer state for it alone (train.trainable=mtp; its training: test_trainable.py), and
  `mtp-export` writes the trunk back bit for bit with the new MTP layer beside it."""
  _, hf_dir = saved_by_transformers
  over = ["data.seq_len=16", "train.batch_size=8", "model.mtp.depth=1", "train.trainable=mtp", "train.steps=3"]
  result = import_(str(hf_dir), str(tmp_path / "run"), overrides=over)
  assert any("MTP module(s) 1 are not in" in n and "initialised afresh" in n for n in result.notes), result.notes
  cfg = result.config
  program = build(cfg)
  fresh = program.init_state()  # what a new run of this config starts from (train.seed)
  ckpt = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True)
  state, _ = ckpt.restore(0, program.abstract_state)
  ckpt.close()
  imported, fresh = named_leaves(state.params), named_leaves(fresh.params)
  assert [k for k in imported if k.startswith("mtp.")]
  for name, value in imported.items():
    assert np.array_equal(value, fresh[name]) == name.startswith("mtp."), name  # the rest is the files'
  moments = [k for k in named_leaves(state.opt_state) if ".mu." in k or ".nu." in k]
  assert moments and all(".mtp." in k for k in moments), moments  # the optimizer's state: the MTP module's

  export(str(tmp_path / "run"), str(tmp_path / "out"), dtype="fp32")
  saved, out = _exported_single(hf_dir), _exported(tmp_path / "out")
  assert all(out[n].tobytes() == x.tobytes() for n, x in saved.items())  # the trunk as transformers saved it
  new = sorted(n for n in out if n.startswith("model.layers.3."))
  assert (
    "model.layers.3.eh_proj.weight" in new
    and json.loads((tmp_path / "out" / "config.json").read_text())["num_nextn_predict_layers"] == 1
  )


def _exported_single(directory) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  with safe_open(directory / "model.safetensors", framework="numpy") as f:
    return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)


# ----------------------------------------------------------------------------- bad input


def _rewrite(path, change) -> None:
  """Rewrites one safetensors shard with `change(tensors)` applied."""
  from safetensors import safe_open

  with safe_open(path, framework="numpy") as f:
    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
  change(tensors)
  save_file(tensors, path, metadata={"format": "pt"})


def test_bad_input_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
  _, _, run, hf_dir, _, _ = case("lora")
  out = tmp_path / "out"
  base = ["--config", str(run / "config.yaml")]

  def fails(directory, *args, output=out):
    assert import_main([str(directory), "--output", str(output), *base, *args]) == 2
    return _err_line(capsys)

  def broken(name, edit):
    """A copy of the export with `edit(copy)` applied."""
    copy = tmp_path / name
    shutil.copytree(hf_dir, copy)
    edit(copy)
    return copy

  index = json.loads((hf_dir / writer.INDEX).read_text())["weight_map"]
  shard = hf_dir / index["model.layers.1.mlp.gate.weight"]

  def edit_config(**keys):
    return lambda d: (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), **keys}))

  def drop(d):
    _rewrite(d / shard.name, lambda t: t.pop("model.layers.1.mlp.gate.weight"))
    weight_map = {k: v for k, v in index.items() if k != "model.layers.1.mlp.gate.weight"}
    writer.write_json(d / writer.INDEX, {"metadata": {}, "weight_map": weight_map})

  def reshape(d):
    _rewrite(d / shard.name, lambda t: t.update({"model.layers.1.mlp.gate.weight": np.zeros((8, 30), np.float32)}))

  def extra(d):
    _rewrite(d / shard.name, lambda t: t.update({"model.layers.1.mlp.gate.bias": np.zeros(8, np.float32)}))

  def integer(d):
    _rewrite(d / shard.name, lambda t: t.update({"model.layers.1.mlp.gate.weight": np.zeros((8, 32), np.int32)}))

  def truncate(d):
    raw = (d / shard.name).read_bytes()
    (d / shard.name).write_bytes(raw[: len(raw) // 2])

  def garble(d):
    raw = bytearray((d / shard.name).read_bytes())
    raw[20:24] = b"\xff\xfe\xff\xfe"  # inside the JSON header
    (d / shard.name).write_bytes(bytes(raw))

  (tmp_path / "file").write_text("x")
  (tmp_path / "empty").mkdir()
  assert "nope: no such directory" in fails(tmp_path / "nope")
  assert "file: not a directory" in fails(tmp_path / "file")
  assert "empty: no config.json" in fails(tmp_path / "empty")
  cases = [
    ("llama", edit_config(model_type="llama"), "model_type 'llama' cannot be imported (formats: deepseek_v3"),
    ("longrope", edit_config(rope_scaling={"type": "longrope", "factor": 4}), "rope_scaling: longrope RoPE"),
    ("fp8", edit_config(quantization_config={"quant_method": "fp8"}), "config.json quantization_config: fp8"),
    ("missing", drop, "no tensor model.layers.1.mlp.gate.weight, which config.json implies"),
    ("shape", reshape, "model.layers.1.mlp.gate.weight has shape (8, 30), config.json implies (8, 32)"),
    ("extra", extra, "holds model.layers.1.mlp.gate.bias, which config.json does not imply"),
    ("int", integer, "model.layers.1.mlp.gate.weight is I32, not a float type"),
    ("truncated", truncate, f"{shard.name}: not a readable safetensors file (Error while deserializing header"),
    ("garbled", garble, f"{shard.name}: not a readable safetensors file (Error while deserializing header"),
    ("no-index", lambda d: (d / writer.INDEX).unlink(), "no model.safetensors.index.json or model.safetensors"),
  ]
  for name, edit, want in cases:
    assert want in fails(broken(name, edit)), name
  assert "model.d_model: fixed by config.json" in fails(hf_dir, "model.d_model=64")
  assert "model.mtp.depth=-1: not a number of MTP modules" in fails(hf_dir, "model.mtp.depth=-1")
  assert "train.workdir: set by the import" in fails(hf_dir, "train.workdir=elsewhere")
  assert "config error: model.moe.mode" in fails(hf_dir, "model.moe.mode=sometimes")
  assert not out.exists() and not list(tmp_path.glob(".out*"))

  out.mkdir()
  (out / "keep.txt").write_text("mine")
  assert "out: already exists and is not empty; pass --overwrite" in fails(hf_dir)
  assert "(Error while deserializing header" in fails(tmp_path / "truncated", "--overwrite")
  assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".out*"))


def test_an_import_cut_short_leaves_nothing_that_looks_complete(case, tmp_path, monkeypatch):
  _, _, run, hf_dir, _, _ = case("lora")
  reads, calls = importer._Files.read, []

  def fail_later(self, name):
    calls.append(name)
    if len(calls) == 40:
      raise ExportError("stop here")
    return reads(self, name)

  monkeypatch.setattr(importer._Files, "read", fail_later)
  out = tmp_path / "out"
  with pytest.raises(ExportError, match="stop here"):
    import_(str(hf_dir), str(out), base_config=str(run / "config.yaml"))
  assert list(tmp_path.iterdir()) == []
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  calls.clear()
  with pytest.raises(ExportError, match="stop here"):
    import_(str(hf_dir), str(out), base_config=str(run / "config.yaml"), overwrite=True)
  assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["keep.txt"]


def test_console_script_imports_and_names_a_corrupt_shard_in_one_line(case, tmp_path):
  _, _, run, hf_dir, _, _ = case("full_q")
  script = shutil.which("mtp-import", path=os.path.dirname(sys.executable))
  command = [script] if script else [sys.executable, "-c", "from mtp_jax.cli.export import import_main; import_main()"]
  ok = subprocess.run(
    [*command, str(hf_dir), "--output", str(tmp_path / "run"), "--config", str(run / "config.yaml")],
    capture_output=True,
    text=True,
    env=_script_env(),
  )
  assert ok.returncode == 0, ok.stderr
  assert ok.stdout.startswith(f"wrote {tmp_path / 'run'} from {hf_dir} (deepseek_v3): ")
  assert f"mtp-train --config {tmp_path / 'run' / 'config.yaml'}" in ok.stdout
  assert ok.stderr.count("\n") == 1 and "tokenizer files copied to" in ok.stderr, ok.stderr  # the byte-level one

  bad = tmp_path / "hf"
  shutil.copytree(hf_dir, bad)
  shard = sorted(bad.glob("*.safetensors"))[1]
  shard.write_bytes(shard.read_bytes()[:-7])
  (bad / "tokenizer.json").write_text("{}")
  out = subprocess.run(
    [*command, str(bad), "--output", str(tmp_path / "bad")], capture_output=True, text=True, env=_script_env()
  )
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert out.stderr.startswith(f"mtp-import: {shard}: not a readable safetensors file (")
  assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))


def test_tokenizer_files_are_copied_beside_the_run(case, tmp_path):
  _, _, run, hf_dir, _, _ = case("full_q")
  hf = tmp_path / "hf"
  shutil.copytree(hf_dir, hf)
  (hf / "tokenizer.json").write_text('{"version": "1.0"}')
  (hf / "tokenizer_config.json").write_text("{}")
  result = import_(str(hf), str(tmp_path / "run"), base_config=str(run / "config.yaml"))
  assert sorted(p.name for p in (tmp_path / "run" / "tokenizer").iterdir()) == [
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  assert result.notes == [
    f"tokenizer files copied to {tmp_path / 'run' / 'tokenizer'}: prepare data with mtp-prepare --tokenizer there"
  ]
