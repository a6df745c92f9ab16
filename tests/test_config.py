import pathlib
import subprocess
import sys

import pytest

from mtp_jax import config
from mtp_jax.model.flops import cost

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def test_overrides_reach_their_keys():
  cfg = config.load(
    CONFIGS / "tiny.yaml",
    ["train.steps=50", "model.mtp.depth=2", "model.moe.top_k=1", "optimizer.learning_rate=1e-3", "mesh.rules.embed=[]"],
  )
  assert cfg.train.steps == 50 and cfg.model.mtp.depth == 2 and cfg.model.moe.top_k == 1
  assert cfg.optimizer.learning_rate == pytest.approx(1e-3)
  assert cfg.mesh.rules["embed"] == [] and cfg.mesh.rules["experts"] == ["expert"]  # others kept


@pytest.mark.parametrize(
  "overrides, message",
  [
    (["train.stpes=3"], "config error: train.stpes: unknown key"),
    (["model.moe.kind=x"], "config error: model.moe.kind: unknown key"),
    (["train.steps=abc"], "config error: train.steps: Input should be a valid integer"),
    (["model.attention.kind=mha"], "config error: model.attention.kind: Input should be 'gqa' or 'mla'"),
    (["model.moe.top_k=9"], "config error: model.moe.top_k: 9 exceeds model.moe.num_experts (8)"),
    (["mesh.expert=3"], "config error: model.moe.num_experts: 8 is not divisible by mesh.expert (3)"),
    (["model.mtp.depth=127"], "config error: model.mtp.depth: 127 leaves no target"),
    (["train.trainable=mtp", "model.mtp.depth=0"], "config error: train.trainable: mtp trains the MTP modules, and"),
    (["model.mtp.kind=parallel", "model.mtp.share_weights=true"], "config error: model.mtp.share_weights: shares one"),
    (["model.attention.partial_rotary_factor=0.1"], "config error: model.attention.partial_rotary_factor: rotates 1"),
    (["model.moe.n_group=3"], "config error: model.moe.n_group: 3 does not divide num_experts (8)"),
    (["model.attention.num_kv_heads=3"], "config error: model.attention.num_kv_heads: 3 does not divide"),
    (["train.grad_accum_steps=5"], "config error: train.grad_accum_steps: 5 does not divide"),
    (["train.remat_save=[moe_in]"], "config error: train.remat_save: keeps values of rematerialised blocks, and"),
    (["train.remat=full", "train.remat_save=[moe_inn]"], "config error: train.remat_save.0: Input should be 'attn"),
    (["train.remat_offload=[layer_in]"], "config error: train.remat_offload: moves values of rematerialised blocks"),
    (
      ["train.remat=full", "train.scan_layers=false", "train.remat_offload=[layer_in]"],
      "config error: train.remat_offload: layer_in is what a scanned stack saves of each layer, and train.scan_layers",
    ),
    (
      ["train.remat=full", "train.remat_save=[moe_in,moe_out]", "train.remat_offload=[moe_out,layer_in]"],
      "config error: train.remat_offload: moe_out also in train.remat_save: a value is kept in HBM or in host memory",
    ),
    (["train.grad_accum_steps=0"], "config error: train.grad_accum_steps: must be at least 1, or -1"),
    (["train.grad_accum_steps=-2"], "config error: train.grad_accum_steps: Input should be greater than or equal"),
    (["mesh.data=-1", "mesh.fsdp=-1"], "config error: mesh: at most one axis may be -1"),
    (["mesh.rules.embed=[foo]"], "config error: mesh.rules.embed: unknown mesh axis 'foo'"),
    (
      ["model.mtp.loss_weight_schedule=[[10, 0.1], [5, 0.2]]"],
      "config error: model.mtp.loss_weight_schedule: steps must",
    ),
    (
      ["train.workdir=s3://bucket/run"],
      "config error: train.workdir: s3://bucket/run: runs write local paths or gs://",
    ),
    (["train.workdir="], "config error: train.workdir: empty; give the run's folder"),
    (["data.path="], "config error: data.sources[0].path: empty; give a folder mtp-prepare wrote, or stdlib"),
    (["data.path=gs://bucket/data"], "config error: data.sources[0].path: gs://bucket/data is a URL; training reads"),
    (["checkpoint.restore_from=s3://b/run"], "config error: checkpoint.restore_from: s3://b/run: runs write local"),
    (["steps=3"], "config error: steps: unknown key"),
    (["train"], "config error: 'train': overrides take the form section.key=value"),
  ],
)
def test_bad_input_is_one_line_naming_the_key(overrides, message):
  with pytest.raises(config.ConfigError) as err:
    config.load(None, overrides)
  assert str(err.value).startswith(message)
  assert "\n" not in str(err.value)


def test_mesh_must_tile_the_devices():
  mesh = config.load(None, ["mesh.data=2", "mesh.expert=2"]).mesh
  assert mesh.shape(4) == {"data": 2, "fsdp": 1, "sequence": 1, "expert": 2, "tensor": 1}
  with pytest.raises(config.ConfigError, match="multiply to 4, not the 8 devices"):
    mesh.shape(8)
  assert config.load(None, ["mesh.expert=2"]).mesh.shape(8)["data"] == 4  # -1 fills
  # mesh.dcn tiles the slices: a TPU's, or the processes of a GPU or CPU job, one a process.
  dcn = config.load(None, ["mesh.dcn.data=2"]).mesh
  assert dcn.shape(8, num_slices=2)["data"] == 8
  with pytest.raises(config.ConfigError, match=r"not the 1 slice present \(TPU slices; elsewhere one a process\)"):
    dcn.shape(8, num_slices=1)
  with pytest.raises(config.ConfigError, match="multiply to 2, not the 4 slices present"):
    dcn.shape(8, num_slices=4)


def test_config_files_load_and_match_their_documented_shapes():
  for path in CONFIGS.glob("*.yaml"):
    config.load(path)
  v3 = config.load(CONFIGS / "deepseek-v3-671b.yaml")
  m = v3.model
  assert (m.num_layers, m.d_model, m.first_k_dense, m.moe.num_experts, m.moe.top_k) == (61, 7168, 3, 256, 8)
  assert (m.attention.q_lora_rank, m.attention.kv_lora_rank, m.attention.qk_rope_head_dim) == (1536, 512, 64)
  assert (m.moe.n_group, m.moe.topk_group, m.moe.score_func, m.moe.routed_scaling_factor) == (8, 4, "sigmoid", 2.5)
  assert m.mtp.depth == 1 and m.moe.expert_d_ff == 2048 and m.moe.num_shared_experts == 1
  c = cost(m, v3.data.seq_len)
  # The report: 671B main-model parameters, 37B activated, plus a 14B MTP module (§2.2, §4.2)
  # whose released checkpoint carries its own copies of the embedding and head.
  main = cost(m.model_copy(update={"mtp": m.mtp.model_copy(update={"depth": 0})}), v3.data.seq_len)
  assert c.total_params - main.total_params + 2 * m.vocab_size * m.d_model == pytest.approx(14e9, rel=0.05)
  assert main.total_params == pytest.approx(671e9, rel=0.01)
  assert main.active_params == pytest.approx(37e9, rel=0.05)
  small = config.load(CONFIGS / "small.yaml")
  assert 1e9 < cost(small.model, small.data.seq_len).total_params < 10e9


def _cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "mtp_jax.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
  )


def test_cli_bad_key_is_one_line_and_non_zero():
  out = _cli("--config", str(CONFIGS / "tiny.yaml"), "model.moe.topk=2")
  assert out.returncode == 2
  assert out.stderr.strip() == "mtp-train: config error: model.moe.topk: unknown key"
  out = _cli("--config", "missing.yaml")
  assert out.returncode == 2 and out.stderr.strip() == "mtp-train: config error: missing.yaml: no such file"
  out = _cli("--bogus")
  assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_bad_files_are_one_line(tmp_path):
  with pytest.raises(config.ConfigError, match=r"^config error: .+: is a folder, not a YAML file$"):
    config.load(tmp_path)
  bad = tmp_path / "bad.yaml"
  bad.write_text("model:\n  d_model: [1,\n")
  with pytest.raises(config.ConfigError, match=r"bad\.yaml line \d+: not valid YAML$"):
    config.load(bad)
  bad.write_text("- just\n- a list\n")
  with pytest.raises(config.ConfigError, match="top level must be a mapping of sections"):
    config.load(bad)
  bad.write_text("model:\n  moe: 3\n")
  with pytest.raises(config.ConfigError, match=r"^config error: model\.moe: "):
    config.load(bad)
