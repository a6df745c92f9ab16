"""`mtp-compile`: topology names, the fit verdict and its exit status, one-line errors."""

import functools
import json
import os
import re
import subprocess
import sys
import types

import jax
import pytest
from conftest import TINY, needs_libtpu

from mtp_jax import compile as mtp_compile
from mtp_jax import config, sharding, topology
from mtp_jax.cli import compile as compile_cli
from mtp_jax.model.flops import compiled_matmul_flops, traced_matmul_flops
from mtp_jax.train.program import build, compiler_options


@pytest.fixture
def run(capsys):
  """mtp-compile in this process -> (exit status, stdout lines, stderr); the environment it sets is undone."""
  saved = dict(os.environ)

  def go(*argv):
    rc = compile_cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out.strip().splitlines(), err

  yield go
  os.environ.clear()
  os.environ.update(saved)


def test_traced_flops_count_every_loop_iteration(tiny):
  """Microbatches, loss chunks and scanned layers are loops whose bodies XLA counts once; the
  traced count must equal the loop-free program's, and remat must add a forward. (Query blocks
  are loops too, but each block is rematerialised, so they add FLOPs of their own.)"""

  # Capacity buffers: each device's microbatch of 32 tokens fills 10 rows per expert, a quarter
  # of the 40 of its whole batch (dropless on CPU pads each expert's rows into blocks instead).
  base = ("model.num_layers=4", "data.seq_len=32", "model.moe.mode=capacity")

  @functools.cache
  def trace(*overrides):
    program = build(tiny(*base, *overrides), jax.devices()[:2])
    return program.step.trace(program.abstract_state, program.abstract_batch())

  def flops(*overrides):
    return traced_matmul_flops(trace(*overrides).jaxpr, 2)

  plain = flops("train.scan_layers=false")
  loops = ("train.grad_accum_steps=4", "train.loss_chunk_len=8")
  assert flops(*loops) == pytest.approx(plain, rel=1e-12)
  # The compiled, partitioned program: microbatches and scanned layers count as often as they
  # run. (It runs fewer matmuls than traced: XLA merges the head's rematerialised forward with
  # the forward when no loop separates them, and turns the gate-weighted sum into a reduction.)
  compiled = [
    compiled_matmul_flops(trace(*overrides).lower().compile().as_text())
    for overrides in [("train.scan_layers=false",), ("train.grad_accum_steps=4",)]
  ]
  assert compiled[0].unknown_loops == compiled[1].unknown_loops == 0
  assert compiled[1].flops == pytest.approx(compiled[0].flops, rel=1e-3)
  assert 0.85 < compiled[0].flops / plain < 1
  forward = flops("train.remat=full", *loops) - plain  # the blocks' forward again, not the head's
  assert 0.1 < forward / plain < 1 / 3, forward / plain
  assert flops("train.attention_chunk_len=8", *loops) > plain

  def matmul(x, w):
    return (x @ w).sum()

  x, w = jax.numpy.ones((64, 8)), jax.numpy.ones((8, 16))
  grad = jax.make_jaxpr(jax.grad(matmul, argnums=(0, 1)))(x, w)
  assert traced_matmul_flops(grad, 4) == 3 * 2 * 64 * 8 * 16 / 4  # forward, and the two gradients


def test_named_remat_policies_recompute_less_than_full_remat(tiny):
  """save_attn_moe keeps the attention kernel's q, k, v and output and the experts' input and
  output rows, so its backward recomputes fewer matmuls than full remat's, but still some (the
  scores, the experts' first projections); save_attn and save_moe each keep part of that."""

  def flops(remat):
    program = build(tiny("model.moe.mode=capacity", f"train.remat={remat}"), jax.devices()[:2])
    return traced_matmul_flops(program.step.trace(program.abstract_state, program.abstract_batch()).jaxpr, 2)

  none, full = flops("none"), flops("full")
  both, attn, moe = flops("save_attn_moe"), flops("save_attn"), flops("save_moe")
  assert none < both < attn < full and both < moe < full, (none, both, attn, moe, full)


@pytest.mark.parametrize(
  "name, chip, shape, slices",
  [
    ("v5p-8", "v5p", (2, 2, 1), 1),
    ("v5p-1024", "v5p", (8, 8, 8), 1),
    ("v4-32", "v4", (2, 2, 4), 1),
    ("v6e-256", "v6e", (16, 16), 1),
    ("v5litepod-16", "v5e", (4, 4), 1),
    ("v5p:4x4x8", "v5p", (4, 4, 8), 1),
    ("2xv6e-256", "v6e", (16, 16), 2),
  ],
)
def test_cloud_tpu_names_map_to_slice_shapes(name, chip, shape, slices):
  topo = topology.parse_topology(name)
  assert (topo.chip.name, topo.shape, topo.slices) == (chip, shape, slices)
  assert topo.chips == slices * (shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1))


@pytest.mark.parametrize(
  "name, message",
  [
    ("tpu-8", "not a TPU slice or GPU this command knows; use v5p-N or v4-N"),
    ("v5p-7", "no standard v5p slice has 7 TensorCores (known: 8, 16,"),
    ("v6e-2", "no standard v6e slice has 2 chips"),
    ("v6e:4x4x4", "a v6e slice has 2 dimensions, e.g. v6e:4x4"),
  ],
)
def test_a_bad_topology_is_one_line_and_status_2(run, name, message):
  rc, out, err = run("--topology", name)
  assert rc == 2 and not out
  assert err.startswith(f"mtp-compile: --topology {name}: ") and message in err, err
  assert len(err.strip().splitlines()) == 1, err


def test_a_dump_folder_or_json_file_that_cannot_be_made_is_one_line_and_status_2(run, tmp_path):
  """Checked before the compile, which takes minutes for a large model."""
  (tmp_path / "a-file").write_text("")
  rc, out, err = run("--topology", "cpu:8", "--dump", str(tmp_path / "a-file" / "xla"), *TINY)
  assert rc == 2 and not out
  assert err.startswith(f"mtp-compile: --dump {tmp_path / 'a-file' / 'xla'}: cannot make this folder ("), err
  assert len(err.strip().splitlines()) == 1, err
  for path, problem in [
    (tmp_path / "a-file" / "r.json", f"its folder {tmp_path / 'a-file'} is not a folder"),
    (tmp_path / "no" / "r.json", f"its folder {tmp_path / 'no'} does not exist"),
    (tmp_path, "is a folder"),
  ]:
    assert run("--topology", "cpu:8", "--json", str(path), *TINY) == (2, [], f"mtp-compile: --json {path}: {problem}\n")


@pytest.mark.parametrize(
  "option, message",
  [
    ("{foo: 1}", "train.compiler_options.foo: is not an XLA option (their names begin xla_)"),
    ("{xla_no_such_option: 1}", "train.compiler_options: XLA on cpu: INVALID_ARGUMENT: No such compile option: "),
  ],
)
def test_an_unknown_xla_option_is_one_line_and_status_2(run, option, message):
  rc, out, err = run("--topology", "cpu:8", *TINY, f"train.compiler_options={option}")
  assert rc == 2 and out == [] and err.count("\n") == 1 and message in err, err


def test_xla_options_apply_on_their_platform_and_null_undoes_one():
  mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
  over = ["train.compiler_options.xla_dump_hlo_as_text=null", "train.compiler_options.xla_cpu_enable_fast_math=false"]
  cfg = config.load("configs/deepseek-v3-671b.yaml", over)
  assert cfg.train.compiler_options == {
    "xla_tpu_relayout_group_size_threshold_for_reduce_scatter": 1,
    "xla_dump_hlo_as_text": None,
    "xla_cpu_enable_fast_math": False,
  }
  assert compiler_options(cfg, mesh) == {"xla_cpu_enable_fast_math": False}  # on the CPU
  off = ["train.compiler_options.xla_tpu_relayout_group_size_threshold_for_reduce_scatter=null"]
  assert config.load("configs/deepseek-v3-671b.yaml", off).train.compiler_options == {
    "xla_tpu_relayout_group_size_threshold_for_reduce_scatter": None
  }


def test_an_impossible_mesh_is_one_line_and_status_2(run):
  rc, out, err = run("--topology", "cpu:8", *TINY, "mesh.data=3")
  assert rc == 2 and not out
  assert err.startswith("mtp-compile: config error: mesh: ") and "not the 8 devices" in err, err
  assert len(err.strip().splitlines()) == 1, err


def _command(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
  """mtp-compile in its own process: the TPU plugin it loads stays out of this one."""
  cmd = [sys.executable, "-m", "mtp_jax.cli.compile", *argv]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def _last_line(code: str) -> str:
  """The last line Python `code` prints, run in its own process from the project's root (a TPU
  topology's environment is set before JAX starts there)."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root)
  assert out.returncode == 0, out.stderr
  return out.stdout.strip().splitlines()[-1]


def test_cpu_topology_sets_the_device_count_before_jax_starts(tmp_path):
  # The parent's XLA_FLAGS ask for 8 devices (conftest); the command must replace that with 4.
  # CPUs have no HBM size: a made-up 1 KiB chip gives the verdict, before any compile, since
  # the train state alone is over it.
  report = tmp_path / "report.json"
  out = _command("--topology", "cpu:4", "--hbm-gib", str(2**-20), "--json", str(report), *TINY)
  assert out.returncode == 1, out.stderr
  figures = json.loads(report.read_text())
  assert figures["chips"] == 4 and figures["mesh"]["data"] == 4 and figures["fits"] is False
  assert figures["compiled"] is False and figures["memory"] is None
  assert figures["needs_bytes"] == figures["state_bytes"] > 0
  state = mtp_compile._size(figures["state_bytes"])
  assert out.stdout.strip().splitlines()[-1] == (
    f"does not fit: the train state alone needs {state} per chip, the chip has 1.0 KiB; not compiled "
    "(more chips, more fsdp, or fewer parameters)"
  )


def test_a_step_over_hbm_whose_state_fits_is_compiled_and_judged(run, tmp_path):
  # The tiny state on 8 CPU devices, read from a first (uncompiled) report, plus 64 KiB: the
  # state fits, the step's activations do not.
  first, second, dump = tmp_path / "state.json", tmp_path / "step.json", tmp_path / "xla"
  accum = ["train.batch_size=16", "train.grad_accum_steps=-1"]  # 8-way data: 2 microbatches of 8
  run("--topology", "cpu:8", "--hbm-gib", str(2**-20), "--json", str(first), *TINY, *accum)
  state = json.loads(first.read_text())["state_bytes"]
  over = ["--topology", "cpu:8", "--hbm-gib", str((state + 2**16) / 2**30), *TINY, *accum]
  least = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # the step goes into the tests' cache
  try:
    rc, out, _ = run(*over, "--json", str(second))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", least)
  r = json.loads(second.read_text())
  assert rc == 1 and r["compiled"] is True and r["fits"] is False and r["grad_accum_steps"] == 2
  assert r["state_bytes"] == state and r["needs_bytes"] == r["memory"]["total"] > state + 2**16  # CPU: no peak
  assert out[-1].startswith("does not fit: needs ") and "microbatches" not in out[-1]
  assert any(line.startswith("model ") and "in 2 microbatches" in line for line in out), out
  # --dump compiles the step again, though the cache holds it, and says what is live at its peak:
  # XLA's breakdown of it, all of it, the largest first, as printed. The config's XLA options
  # reach the step's compile beside --dump's (XLA writes .dot files too), those for another
  # platform left out (XLA:CPU refuses an option it does not know).
  options = "train.compiler_options={xla_dump_hlo_as_dot: true, xla_dump_hlo_as_text: true, "
  options += "xla_tpu_relayout_group_size_threshold_for_reduce_scatter: 1}"
  rc, out, _ = run(*over, options, "--json", str(second), "--dump", str(dump))
  r = json.loads(second.read_text())
  assert "note       XLA options for the steps: xla_dump_hlo_as_dot=True, xla_dump_hlo_as_text=True" in out, out
  assert list(dump.glob("*jit_train_step*after_optimizations.dot")), sorted(p.name for p in dump.iterdir())
  (ranges,) = dump.glob("*jit_train_step*live-range.txt")
  peak = int(re.search(r"breakdown for peak usage: ([\d ]+) bytes", ranges.read_text()).group(1).replace(" ", ""))
  held = [b for _, b in r["peak_holders"]]
  assert sum(held) == peak and held == sorted(held, reverse=True) and len(held) > 6, held
  header = f"peak       {mtp_compile._size(peak)} live at the peak of XLA's live ranges (in {dump}), the largest first:"
  at = out.index(header)
  name, size = r["peak_holders"][0]
  assert out[at + 1] == f"           {mtp_compile._size(size)}: {name}", out[at : at + 3]
  assert out[at + 7].endswith(f": {len(held) - 6} more"), out[at : at + 8]


def test_an_evaluating_config_has_what_evaluation_runs_judged_too(run, tmp_path):
  """With train.eval_every the eval step and the speculative decoding of the held-out prompts are
  compiled too: what a chip holds while each runs is its own need plus the train state it does
  not take (the optimizer's), and the verdict covers them. The eval step, in the train step's
  microbatches, needs less than the train step."""
  path = tmp_path / "report.json"
  evaluating = ["train.batch_size=16", "train.grad_accum_steps=2", "train.eval_every=10", "train.eval_spec_tokens=8"]
  rc, out, _ = run("--topology", "cpu:8", "--hbm-gib", "1", "--json", str(path), *TINY, *evaluating)
  r = json.loads(path.read_text())
  step, spec = r["evaluation"]
  assert rc == 0 and r["fits"] is True
  assert (
    step["program"] == "eval step" and spec["program"] == "speculative decoding of 4 prompts (train.eval_spec_prompts)"
  )
  for e in (step, spec):
    assert e["error"] is None and e["own_bytes"] == e["memory"]["total"] > 0  # CPU: no peak
  rest = step["needs_bytes"] - step["own_bytes"]
  assert rest == spec["needs_bytes"] - spec["own_bytes"]
  assert 0.6 < rest / r["state_bytes"] < 0.7  # Adam's two moments of every parameter: 2/3 of the state
  assert step["needs_bytes"] < r["needs_bytes"]
  eval_lines = [o for o in out if o.startswith("eval ")]
  assert eval_lines == [
    f"eval       the eval step in 2 microbatches, compiled in {step['compile_s']:,.0f} s: needs "
    f"{mtp_compile._size(step['own_bytes'])} per chip, {mtp_compile._size(step['needs_bytes'])} with the "
    "optimizer's state beside it",
    f"eval       {spec['program']}, compiled in {spec['compile_s']:,.0f} s: needs "
    f"{mtp_compile._size(spec['own_bytes'])} per chip, {mtp_compile._size(spec['needs_bytes'])} with the "
    "optimizer's state beside it",
  ], out
  most = max(step["needs_bytes"], spec["needs_bytes"])
  assert out[-1].startswith(f"fits: needs {mtp_compile._size(r['needs_bytes'])} per chip (evaluating, ")
  assert f"(evaluating, {mtp_compile._size(most)})" in out[-1]
  # The verdict where evaluating alone is over: the train step fits, the speculative decoding does not.
  over = {k: v for k, v in r.items() if k not in ("config", "overrides")}
  room = r["needs_bytes"] + 1024
  over_spec = mtp_compile.Evaluation(**{**spec, "needs_bytes": room + 1024})
  over |= {"collectives": None, "hbm_bytes": room, "evaluation": [mtp_compile.Evaluation(**step), over_spec]}
  over["fits"] = mtp_compile._fits(r["needs_bytes"], over["evaluation"], room, None)
  last = mtp_compile.describe(mtp_compile.Report(**over))[-1]
  assert over["fits"] is False and last.startswith(
    f"does not fit: the train step does; evaluating (train.eval_every), {spec['program']} needs "
  ), last
  # Without evaluation, nothing more is compiled.
  rc, out, _ = run("--topology", "cpu:8", "--hbm-gib", str(2**-20), "--json", str(path), *TINY)
  assert json.loads(path.read_text())["evaluation"] == [] and not any(o.startswith("eval ") for o in out)


def test_code_outside_a_mesh_is_told_the_compile_only_gpu_is_attached():
  """Tracing for a GPU not attached, code that asks JAX's default backend (decoding's
  `sharding.platform`, whether to cast its weights first) hears the GPU's, as on a GPU."""
  gpu = types.SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H200")
  with mtp_compile._attached([gpu]):
    assert sharding.platform() == "gpu" and jax.devices() == [gpu]
  assert sharding.platform() == "cpu" and jax.devices()[0].platform == "cpu"


def test_peak_holders_read_xla_s_live_range_breakdown():
  text = """HloLiveRange (max 4):
  Live ranges at 3 (peak):
    wrapped_sine{}: 262144 bytes (cumulative: 262144 bytes)
  Stack trace breakdown for peak usage: 1 524 292 bytes
    main.2 (100.0%, total: 1 524 292 bytes, current: 0 bytes, remaining: 1 524 292 bytes)
      ├── x (17.2%, total: 262 144 bytes, current: 262 144 bytes, remaining: 1 262 148 bytes)
      ├── state (65.6%, total: 1 000 000 bytes, current: 0 bytes, remaining: 262 148 bytes)
      │   └── w (65.6%, total: 1 000 000 bytes, current: 1 000 000 bytes, remaining: 262 148 bytes)
      ├── jit(f)/sin (17.2%, total: 262 144 bytes, current: 262 144 bytes, remaining: 4 bytes)
      └── jit(f)/reduce_sum (0.0%, total: 4 bytes, current: 4 bytes, remaining: 0 bytes)
"""
  assert mtp_compile.peak_holders(text) == [
    ("w", 1e6),
    ("x", 262144.0),
    ("jit(f)/sin", 262144.0),
    ("jit(f)/reduce_sum", 4.0),
  ]
  assert mtp_compile.peak_holders(text.split("  Stack trace")[0]) is None


@needs_libtpu
def test_tiny_config_fits_a_v5p_slice(tmp_path):
  path = tmp_path / "report.json"
  # Capacity mode: XLA:TPU computes a ragged dot's weight gradient as a dense product over all
  # experts (benchmarks/RESULTS.md), which the report would rightly flag.
  out = _command(
    "--topology", "v5p-8", "--json", str(path), *TINY, "train.grad_accum_steps=2", "model.moe.mode=capacity"
  )
  assert out.returncode == 0, out.stderr
  r = json.loads(path.read_text())
  assert r["chips"] == 4 and r["device_kind"] == "TPU v5" and r["mesh"]["data"] == 4
  assert 0 < r["memory"]["peak"] <= r["memory"]["total"] < r["hbm_bytes"] == pytest.approx(95.74 * 2**30)
  assert r["needs_bytes"] == r["memory"]["peak"] and r["fits"] is True
  assert r["memory"]["arguments"] > 0 and r["memory"]["temporaries"] > 0 and r["memory"]["host"] == 0
  # The traced matmuls: the model's, plus the router's and masked attention's full square; what
  # a chip runs of them, read from the partitioned program, is its share, and the roofline's.
  assert 1.0 < r["traced_flops"] * r["chips"] / r["model_flops_per_step"] < 1.25
  assert 0.85 < r["partitioned_flops"] / r["traced_flops"] <= 1.15 and r["repeated"] is None
  assert r["step_s"] >= r["partitioned_flops"] / r["peak_flops"] > 0
  assert 0 < r["mfu"] < 1 and r["peak_flops"] == 459e12
  last = out.stdout.strip().splitlines()[-1]
  assert last.startswith("fits: needs ") and last.endswith(" per chip, the chip has 95.7 GiB (0% used)"), out.stdout


@needs_libtpu
def test_a_stacks_weights_are_cast_to_the_compute_dtype_a_layer_at_a_time():
  """XLA:TPU would move the cast of a scanned layer's weights up through the loop's slice of
  the stack and out of every loop, holding a bfloat16 copy of the whole stack through the step
  (0.95 GiB a chip on the small step); `transformer._scan` keeps each layer's cast in the loop.
  Read from the compiled v5p-8 program: no cast makes a [3, ...] stack (tiny's MoE layers).
  The same program runs splash attention (auto on TPU), whose Mosaic kernels carry no cost
  estimate: the partitioned count still finds their matmuls, as the traced count does."""
  code = """if True:
    import re
    from mtp_jax import topology as C, config
    topo = C.parse_topology("v5p-8")
    C.prepare_environment(topo)
    from mtp_jax.train.program import build, compiler_options
    over = ["model.dtype=bfloat16", "train.grad_accum_steps=2", "train.remat=full", "mesh.data=1", "mesh.fsdp=-1"]
    cfg = config.load("configs/tiny.yaml", over)
    assert cfg.model.num_layers - cfg.model.first_k_dense == 3
    program = build(cfg, C.devices(topo))
    compiled, work, _ = program.compile_and_count()
    text = compiled.as_text()
    assert program.attention == "splash (auto on TPU)" and "splash_mha_dkv" in text, program.attention
    assert 0.99 < work.ratio < 1.01, work.ratio
    assert "bf16[3," in text  # the stack's weights are bfloat16 somewhere (a gradient), so the pattern can match
    print(re.findall(r"%(\\w*convert[\\w.\\-]*) = bf16\\[3,", text))
  """
  last = _last_line(code)
  assert last == "[]", last


@needs_libtpu
def test_the_stacked_expert_weights_keep_their_layout():
  """XLA:TPU laid out the float32 stacks of w_gate and w_up anew (d_model minor) for a
  matmul of the backward loop's recompute, two parameter-sized copies held to the optimizer's
  update (671B on v5p-1024: 3.2 GiB of its peak); `dispatch.routed_experts` keeps each device's
  rows as stored (`sharding.keep_layout`). Read from the compiled v5p-16 program of a small MoE
  stack with capacity buffers over expert 4 x fsdp 2, microbatched and rematerialised, as 671B's
  (without the pin: copies to f32[3,4,128,256]{2,3,1,0})."""
  code = """if True:
    import re
    from mtp_jax import topology as C, config
    topo = C.parse_topology("v5p-16")
    C.prepare_environment(topo)
    from mtp_jax.train.program import build
    over = ["model.dtype=bfloat16", "train.remat=full", "train.grad_accum_steps=2", "model.moe.mode=capacity",
            "mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "model.d_model=256", "model.moe.expert_d_ff=256",
            "model.moe.num_experts=16", "model.moe.top_k=8", "data.seq_len=512", "train.batch_size=16"]
    cfg = config.load("configs/tiny.yaml", over)
    stack = f"f32\\[{cfg.model.num_layers - cfg.model.first_k_dense},4,128,256\\]"  # a device's w_gate, w_up
    text = build(cfg, C.devices(topo)).compile_and_count()[0].as_text()
    assert re.search(stack + "{3,2,1,0", text)  # the pattern matches the stacks as stored
    print(re.findall(f"= ({stack}{{[0-9,]+)[:}}][^\\n]*? copy\\(", text))
  """
  last = _last_line(code)
  assert last == "[]", last


@needs_libtpu
def test_offloaded_layer_inputs_are_in_host_memory_and_judged_on_what_hbm_holds(tmp_path):
  """train.remat_offload=[layer_in]: the inputs a scanned stack saves for its backward pass
  (two MoE layers, 2 rows of 16 tokens a chip, d_model 128, float32) go to the chip's host.
  XLA:TPU counts host buffers in its peak, so the verdict takes what its memory-usage report
  says it put in HBM: dumped to a temporary folder, gone after (or where --dump says, the one
  difference; reading a --dump folder is tested on the CPU above)."""
  path, temp = tmp_path / "report.json", tmp_path / "temp"
  temp.mkdir()
  over = ["model.num_layers=3", "model.d_model=128", "train.remat=full", "train.remat_offload=[layer_in]"]
  out = _command("--topology", "v5p-8", "--json", str(path), *TINY, *over, env={**os.environ, "TMPDIR": str(temp)})
  assert out.returncode == 0, out.stderr
  r = json.loads(path.read_text())
  host = [line for line in out.stdout.splitlines() if line.startswith("host       per chip: ")]
  assert len(host) == 1 and host[0].endswith("(its memory-usage report)"), host
  assert not list(temp.iterdir()), list(temp.iterdir())
  m, saved = r["memory"], 2 * 2 * 16 * 128 * 4
  assert saved <= m["host"] < 2 * saved, m
  assert m["arguments"] < r["hbm_allocated"] == r["needs_bytes"] and r["fits"] is True, r
  # Each saved input goes to the host once and comes back once, for the backward pass.
  assert r["host_transfers"] == [saved, saved], r["host_transfers"]
  link = (
    f"host link  per chip per step: {mtp_compile._size(saved)} to the host's memory and {mtp_compile._size(saved)} back"
  )
  assert any(line.startswith(link + "; at most ") for line in out.stdout.splitlines()), out.stdout


@needs_libtpu
def test_a_program_the_compiler_refuses_does_not_fit():
  # A small state but 1M-way logits for 256 x 128 tokens per chip (128 GiB in float32): the state
  # check passes, XLA:TPU refuses to compile, and the verdict comes from its message.
  out = _command("--topology", "v5p-8", *TINY, "model.vocab_size=1000000", "train.batch_size=1024", "data.seq_len=128")
  assert out.returncode == 1, out.stderr
  lines = out.stdout.strip().splitlines()
  assert any(line.startswith("compiler   RESOURCE_EXHAUSTED") for line in lines), out.stdout
  assert lines[-1].startswith("does not fit: needs ") and lines[-1].endswith(" per chip, the chip has 95.7 GiB")


@needs_libtpu
@pytest.mark.parametrize("vocab, mib, compiled", [(320, 64, True), (2000, 1, False)])
def test_the_verdict_is_against_xla_s_own_hbm_limit_where_the_config_sets_one(tmp_path, vocab, mib, compiled):
  # The tiny step needs a few MiB a chip: under a 64 MiB limit it fits, its share taken of that.
  # With a 2,000-word vocabulary its state alone is over 1 MiB, which is said without compiling.
  path = tmp_path / "report.json"
  limit = f"train.compiler_options={{xla_tpu_max_hbm_size_mib: {mib}}}"
  out = _command("--topology", "v5p-8", "--json", str(path), *TINY, f"model.vocab_size={vocab}", limit)
  assert out.returncode == (0 if compiled else 1), out.stderr
  r = json.loads(path.read_text())
  assert r["hbm_limit"] == mib * 2**20 and r["hbm_bytes"] == pytest.approx(95.74 * 2**30) and r["fits"] is compiled
  last = out.stdout.strip().splitlines()[-1]
  has = f"XLA may use {mib}.0 MiB of the chip's 95.7 GiB (train.compiler_options.xla_tpu_max_hbm_size_mib)"
  if compiled:
    needs, share = r["needs_bytes"], r["needs_bytes"] / (mib * 2**20)
    assert r["memory"] and 0 < share <= 1, r
    assert last == f"fits: needs {mtp_compile._size(needs)} per chip, {has} ({share:.0%} used)", last
  else:
    assert r["memory"] is None and r["state_bytes"] > mib * 2**20, r
    assert last.startswith("does not fit: the train state alone needs ") and f", {has}; not compiled" in last, last


@needs_libtpu
def test_a_state_over_hbm_is_refused_without_compiling():
  # ~16B parameters with Adam, replicated over a 4-way data axis: 12 bytes each is far over a
  # v5p chip before any activation, which the command says at once.
  out = _command("--topology", "v5p-8", *TINY, "model.vocab_size=1000000", "model.d_model=8192")
  assert out.returncode == 1, out.stderr
  lines = out.stdout.strip().splitlines()
  assert not any(line.startswith(("compile ", "compiler ")) for line in lines), out.stdout
  assert lines[-1].startswith("does not fit: the train state alone needs ") and "95.7 GiB; not compiled" in lines[-1]


@needs_libtpu
@pytest.mark.parametrize("factor, line", [(0, "4x the rows it sends, the worst case"), (1.25, "1.25x the rows")])
def test_the_ragged_receive_buffer_is_reported(tmp_path, factor, line):
  # 8 experts top-2 over a 4-way expert axis: 2 experts a chip, so the worst case is every
  # chip's rows for them, 4x what one chip sends. A 1 KiB chip gives the verdict without compiling.
  path = tmp_path / "report.json"
  ep = ["mesh.data=1", "mesh.expert=4", "model.moe.mode=dropless", f"model.moe.ragged_buffer_factor={factor}"]
  out = _command("--topology", "v5p-8", "--hbm-gib", str(2**-20), "--json", str(path), *TINY, *ep)
  assert out.returncode == 1, out.stderr
  r = json.loads(path.read_text())
  assert r["expert_dispatch"] == "ragged_all_to_all" and r["receive_buffer"] == [factor or 4.0, 4.0]
  experts = [text for text in out.stdout.splitlines() if text.startswith("experts    ragged_all_to_all: ")]
  assert len(experts) == 1 and line in experts[0], out.stdout


def test_the_expert_dispatch_is_reported_where_experts_are_split(run, tmp_path):
  path = tmp_path / "report.json"
  tiny_chip = ("--topology", "cpu:8", "--hbm-gib", str(2**-20))  # the verdict without compiling
  ep = ["mesh.data=2", "mesh.expert=4", "model.moe.mode=capacity"]
  rc, out, _ = run(*tiny_chip, "--json", str(path), *TINY, *ep)
  r = json.loads(path.read_text())
  assert rc == 1 and r["expert_dispatch"] == "all_to_all" and r["receive_buffer"] is None
  assert "experts    all_to_all of capacity buffers" in out
  rc, out, _ = run(*tiny_chip, "--json", str(path), *TINY)  # 8-way data: every device holds every expert
  assert json.loads(path.read_text())["expert_dispatch"] is None
  assert not any(line.startswith("experts") for line in out), out


def test_the_report_counts_what_each_chip_runs(run, tmp_path):
  """The partitioned program's matmuls per chip, beside the traced share: dispatch=gspmd on an
  8-way data mesh has every chip compute every token's experts, which the report flags in one
  line; the default computes each chip's own."""
  path = tmp_path / "report.json"
  mesh = ["mesh.data=8", "model.moe.mode=capacity", "train.batch_size=16"]
  figures = {}
  for dispatch in ("gspmd", "auto"):
    rc, out, _ = run("--topology", "cpu:8", "--json", str(path), *TINY, *mesh, f"model.moe.dispatch={dispatch}")
    r = figures[dispatch] = json.loads(path.read_text())
    assert rc == 0 and r["partitioned_flops"] > 0 and r["traced_flops"] > 0
    flops = [line for line in out if line.startswith("flops ")]
    assert len(flops) == 1 and "in the matmuls the chip runs" in flops[0] and "as traced" in flops[0], out
    warnings = [line for line in out if line.startswith("warning ")]
    if dispatch == "gspmd":
      assert r["partitioned_flops"] / r["traced_flops"] > 1.15
      assert len(warnings) == 1 and r["repeated"] in warnings[0] and "its share of the step's matmuls" in warnings[0]
      assert any(line.startswith("note ") and "whole microbatch" in line for line in out), out
    else:
      assert r["partitioned_flops"] / r["traced_flops"] <= 1.15 and r["repeated"] is None and not warnings
    comms = [line for line in out if line.startswith("comms ")]
    assert len(comms) == 1 and "all-reduce" in comms[0], out
  assert figures["gspmd"]["traced_flops"] == pytest.approx(figures["auto"]["traced_flops"], rel=0.02)
  # What each chip sends: with its own tokens' experts, only the sums of gradients and metrics
  # (all-reduces); gspmd moves every token's activations besides.
  sent = {k: sum(c["sent"] for c in r["collectives"]["each"]) for k, r in figures.items()}
  assert {c["kind"] for c in figures["auto"]["collectives"]["each"]} == {"all-reduce"}
  assert sent["gspmd"] > 1.5 * sent["auto"] > 0, sent
