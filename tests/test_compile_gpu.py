"""`mtp-compile --topology h100:8` and the like: the train step compiled for NVIDIA GPUs on a
machine without one, through the compile-only devices of JAX's CUDA plugin.

The compiles need the plugin and cuDNN (`pip install 'mtp-jax[gpu-aot]'`) and skip without them;
CI installs them in its Python 3.12 stage, on the GPU image's jax 0.11.2, and sets
MTP_TEST_GPU_AOT=1 there, which turns the skip into a failure. Each compile runs in its own
process, with none of the test session's XLA:CPU flags or compilation cache."""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest
from conftest import TINY

from mtp_jax import topology

HAS_PLUGIN = importlib.util.find_spec("jax_plugins") is not None and any(
  importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") for v in (12, 13)
)
needs_plugin = pytest.mark.skipif(
  os.environ.get("MTP_TEST_GPU_AOT") != "1" and not HAS_PLUGIN,
  reason="JAX's CUDA plugin is not installed (pip install 'mtp-jax[gpu-aot]'): no GPU to compile for",
)
BF16 = ("model.dtype=bfloat16",)  # cuDNN attention and the Mosaic GPU experts take 16-bit floats only


def _compile(*argv: str, **env: str) -> subprocess.CompletedProcess:
  """mtp-compile in a process of its own, in a clean environment (plus `env`)."""
  keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "TMPDIR")}
  cmd = [sys.executable, "-m", "mtp_jax.cli.compile", *argv]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**keep, **env})


def _line(out: str, head: str) -> str:
  return next((line for line in out.splitlines() if line.startswith(head)), "")


@pytest.mark.parametrize(
  "name, gpu, hosts, per_host",
  [("h100", "h100", 1, 1), ("h200:8", "h200", 1, 8), ("4xh100:8", "h100", 4, 8), ("2xh200", "h200", 2, 1)],
)
def test_gpu_names_map_to_hosts_of_gpus(name, gpu, hosts, per_host):
  topo = topology.parse_topology(name)
  assert (topo.gpu.name, topo.hosts, topo.gpus_per_host, topo.chips) == (gpu, hosts, per_host, hosts * per_host)
  assert topo.chip is None and not topo.cpu_devices


@pytest.mark.parametrize(
  "argv, env, message",
  [
    (["--topology", "h100:9"], {}, "--topology h100:9: a host has 1 to 8 GPUs"),
    (["--topology", "0xh200:8"], {}, "--topology 0xh200:8: a host has 1 to 8 GPUs, and a job at least one host"),
    (["--topology", "h200"], {"XLA_PYTHON_CLIENT_MEM_FRACTION": "abc"}, "XLA_PYTHON_CLIENT_MEM_FRACTION=abc: not a"),
    (["--topology", "h200"], {"XLA_CLIENT_MEM_FRACTION": "1.5"}, "XLA_CLIENT_MEM_FRACTION=1.5: not a share"),
    (
      ["--topology", "h200"],
      {"XLA_CLIENT_MEM_FRACTION": "0.5", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"},
      "XLA_PYTHON_CLIENT_MEM_FRACTION: beside XLA_CLIENT_MEM_FRACTION, its new name; JAX takes one",
    ),
  ],
)
def test_a_bad_gpu_topology_is_one_line_and_status_2(argv, env, message):
  out = _compile(*argv, *TINY, **env)
  assert out.returncode == 2 and not out.stdout, out.stderr
  assert out.stderr.startswith(f"mtp-compile: {message}"), out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize(
  "env, share, why",
  [
    ({}, 0.75, "XLA_CLIENT_MEM_FRACTION unset: 0.75"),
    ({"XLA_CLIENT_MEM_FRACTION": "0.9"}, 0.9, "XLA_CLIENT_MEM_FRACTION=0.9"),
    ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.6"}, 0.6, "XLA_PYTHON_CLIENT_MEM_FRACTION=0.6"),  # the deprecated name
    ({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform", "XLA_CLIENT_MEM_FRACTION": "0.5"}, 1.0, "ALLOCATOR=platform: no pool"),
    ({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}, 0.75, "XLA_CLIENT_MEM_FRACTION unset"),  # no pool up front, same cap
  ],
)
def test_the_share_of_a_gpu_jax_s_allocator_takes_is_read_as_jax_reads_it(monkeypatch, env, share, why):
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  got, said = topology.gpu_memory_share()
  assert got == share and why in said, said


@pytest.mark.skipif(HAS_PLUGIN, reason="JAX's CUDA plugin is installed here")
def test_without_the_cuda_plugin_a_gpu_topology_says_what_to_install():
  out = _compile("--topology", "h200:8", *TINY)
  assert out.returncode == 2 and not out.stdout, out.stderr
  assert out.stderr.strip() == "mtp-compile: --topology h200:8: needs JAX's CUDA plugin: pip install 'mtp-jax[gpu-aot]'"


@needs_plugin
def test_two_h200s_compile_with_cudnn_attention_and_blocked_experts_judged_against_jax_s_share(tmp_path):
  """On GPUs `auto` picks cuDNN attention and the blocked dropless experts; the verdict is against
  the share of the GPU's memory JAX's allocator takes (0.75 unless XLA_CLIENT_MEM_FRACTION
  says otherwise), and the roofline weighs the bytes the step's kernels move (XLA:GPU counts none
  for a GPU not attached; hlo.kernel_traffic). Two hosts of one GPU each, so mesh.dcn splits over
  them (one process a host). What an evaluation runs is compiled for them too."""
  report = tmp_path / "report.json"
  evaluating = ("train.eval_every=10", "train.eval_spec_tokens=8")
  argv = ("--topology", "2xh200", "--json", str(report), *TINY, *BF16, "mesh.dcn.data=2", *evaluating)
  out = _compile(*argv, XLA_CLIENT_MEM_FRACTION="0.5")
  assert out.returncode == 0, out.stderr[-3000:]
  assert _line(out.stdout, "topology") == "topology   2xh200: 2 chips (NVIDIA H200)"
  assert _line(out.stdout, "mesh").startswith("mesh       data 2, fsdp 1")
  assert _line(out.stdout, "attention") == "attention  cudnn (auto on GPU); dropless experts blocked (auto on GPU)"
  assert "not counted" not in _line(out.stdout, "flops")
  step = _line(out.stdout, "step time")
  assert step.startswith("step time  ~ ") and "max(FLOPs / 989 TFLOP/s, HBM bytes / 4,800 GB/s)" in step, step
  assert "HBM traffic ~ " in _line(out.stdout, "flops")
  assert _line(out.stdout, "traffic").startswith("traffic    the busiest kernels per chip per step: ")
  figures = json.loads(report.read_text())
  assert figures["xla_bytes"] is None and figures["kernel_bytes"] > figures["state_bytes"]
  memory = topology.GPUS["h200"].memory
  assert figures["hbm_bytes"] == memory and figures["hbm_limit"] == 0.5 * memory
  assert figures["collectives"]["each"], "two GPUs splitting the batch exchange gradients"
  assert [e["program"] for e in figures["evaluation"]] == [
    "eval step",
    "speculative decoding of 4 prompts (train.eval_spec_prompts)",
  ]
  assert all(e["memory"]["arguments"] > 0 and e["needs_bytes"] > e["own_bytes"] for e in figures["evaluation"])
  verdict = out.stdout.strip().splitlines()[-1]
  assert verdict.startswith("fits: needs ") and verdict.endswith(
    "JAX's allocator may use 69.9 GiB of the chip's 139.9 GiB (XLA_CLIENT_MEM_FRACTION=0.5) (0% used)"
  ), verdict


@needs_plugin
def test_xla_gpu_runs_ragged_dot_as_every_row_times_every_expert():
  """Why `auto` takes the blocked experts on GPUs: XLA:GPU rewrites lax.ragged_dot into a product
  of every row with every expert (8 here), and the report says so; the blocked loop runs about
  the traced matmuls. Should XLA:GPU lower ragged_dot as a grouped matmul, this fails, and the
  choice in experts.NATIVE is worth measuring again."""
  ragged = _compile("--topology", "h100", *TINY, *BF16, "model.moe.kernel=ragged_dot")
  blocked = _compile("--topology", "h100", *TINY, *BF16, "model.moe.kernel=blocked")
  assert ragged.returncode == 0 and blocked.returncode == 0, (ragged.stderr[-2000:], blocked.stderr[-2000:])
  warning = _line(ragged.stdout, "warning")
  assert "most of the excess in einsum 'ragged_dot' (8.00x its share)" in warning, ragged.stdout
  assert "XLA runs lax.ragged_dot on these devices as every row times every expert" in warning
  assert not _line(blocked.stdout, "warning"), blocked.stdout


@needs_plugin
def test_hopper_only_kernels_lower_for_a_gpu_that_is_not_attached(tmp_path):
  """MLA's 192-wide query heads through cuDNN (JAX refuses heads over 128 unless the attached GPU
  is a Hopper) and the Mosaic GPU grouped matmuls (which ask jax.devices() for the GPU's SMs): both
  lowered and compiled for sm_90a here, told of the target GPU while tracing."""
  mla = (
    "model.attention.kind=mla",
    "model.attention.qk_nope_head_dim=128",
    "model.attention.qk_rope_head_dim=64",
    "model.attention.v_head_dim=128",
  )
  # 5 x 14 tokens, top-2: 140 rows, which the Mosaic GPU kernels take only padded to a multiple of 8.
  mosaic = ("model.d_model=64", "model.moe.expert_d_ff=64", "train.batch_size=5", "data.seq_len=14")
  mosaic += ("model.moe.kernel=mosaic_gpu",)
  report = tmp_path / "report.json"
  out = _compile("--topology", "h200", "--json", str(report), *TINY, *BF16, *mla, *mosaic)
  assert out.returncode == 0, out.stderr[-3000:]
  assert _line(out.stdout, "attention") == (
    "attention  cudnn (auto on GPU); dropless experts mosaic_gpu (asked for)"
  ), out.stdout
  # cuDNN's and the Mosaic GPU kernels' calls count in the compiled program as in the traced one
  # (flops.cudnn_attention_flops, flops.grouped_matmul_flops); and the kernels run the products
  # lax.ragged_dot's traced count has, exactly, plus the rows they are padded with.
  figures = json.loads(report.read_text())
  assert figures["partitioned_flops"] == pytest.approx(figures["traced_flops"], rel=0.02), figures
  assert _line(out.stdout, "MFU").startswith("MFU        ~ "), out.stdout
  as_ragged_dot = (*mosaic[:-1], "model.moe.kernel=ragged_dot")
  ragged = _compile("--topology", "h200", "--json", str(report), *TINY, *BF16, *mla, *as_ragged_dot)
  assert ragged.returncode == 0, ragged.stderr[-3000:]
  # Theirs plus the 4 padding rows (144 of 140): 2 x 3 x 64 x 64 FLOPs a row through the three
  # projections, forward and twice backward, in the trunk's MoE layer and the MTP module's.
  padding = 4 * 2 * 3 * 64 * 64 * 3 * 2
  assert json.loads(report.read_text())["traced_flops"] + padding == figures["traced_flops"]


@needs_plugin
def test_decoding_on_a_gpu_reads_the_experts_once_where_blocks_copy_them(tmp_path):
  """A speculative round at batch 8 (3 tokens a row, top-2: 48 rows) compiled for an H200:
  `auto` takes the masked product (experts.MASKED_ROWS), whose kernels read each expert's weights
  in place; the blocked loop's kernels copy each block's weights out first
  (benchmarks/decode_traffic.py, hlo.kernel_traffic)."""
  rows = tmp_path / "rows.json"
  shapes = ("model.dtype=bfloat16", "model.param_dtype=bfloat16", "model.d_model=512", "model.moe.expert_d_ff=512")
  argv = ["--kernels", "auto,blocked", "--batches", "8", "--tokens", "3", "--json", str(rows), *shapes]
  keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "TMPDIR")}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = os.path.join(root, "benchmarks", "decode_traffic.py")
  out = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=300, env=keep, cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  auto, blocked = json.loads(rows.read_text())
  assert auto["runs"] == "ragged_dot" and blocked["runs"] == "blocked"
  assert blocked["bytes"] > 2 * auto["bytes"], (auto, blocked)


@needs_plugin
def test_decoding_a_run_as_mtp_generate_loads_it_on_a_gpu_copies_no_weights(tmp_path):
  """The whole decoding program compiled for an H200 (benchmarks/decode_traffic.py --loop), a
  dense layer then a stack of two MoE layers, bfloat16 parameters: handed the stacks, it slices
  the trunk a block at a time into a copy it holds while decoding (the experts' weights at
  least); handed the model as `mtp-generate` loads it (`load.held`: already a block at a time)
  it holds less than those weights beside its arguments, and its loop moves the same bytes."""
  from flax import nnx

  from mtp_jax import config
  from mtp_jax.model import Transformer

  rows = tmp_path / "rows.json"
  shapes = ["model.num_layers=3", "model.dtype=bfloat16", "model.param_dtype=bfloat16"]
  keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "PYTHONPATH", "TMPDIR")}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  script = os.path.join(root, "benchmarks", "decode_traffic.py")
  argv = [script, "--loop", "--batches", "1", "--json", str(rows), *shapes]
  out = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=keep, cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  stored, loaded = json.loads(rows.read_text())
  cfg = config.load(os.path.join(root, "configs", "tiny.yaml"), shapes)
  model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  assert model.runs == ((0, 1), (1, 3))
  experts = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model.layers[1].ffn.experts)))
  assert stored["arguments"] == loaded["arguments"] and stored["bytes"] == loaded["bytes"], (stored, loaded)
  assert stored["temporaries"] - loaded["temporaries"] >= experts > loaded["temporaries"], (stored, loaded, experts)
