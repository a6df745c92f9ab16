"""Targets, the loss, the train step's guards and memory bounds, and the loop end to end (the step
against itself across meshes and settings is in test_step_equivalence.py)."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STEP_KEYS, TINY, fixed_batch, write_dataset

from mtp_jax import data
from mtp_jax.train import checkpoint, loop, losses
from mtp_jax.train.program import build

CONFIGS = pathlib.Path(__file__).parent.parent / "configs"


def test_depth_targets_never_cross_a_document_or_the_end():
  seg = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  tokens = np.arange(16).reshape(2, 8)
  for depth in range(4):
    targets, mask = losses.depth_targets(jnp.asarray(tokens), jnp.asarray(seg), depth)
    s = depth + 1
    for b in range(2):
      for t in range(8):
        real = t + s < 8 and seg[b, t] != 0 and seg[b, t + s] == seg[b, t]
        assert bool(mask[b, t]) == real, (depth, b, t)
        if real:
          assert int(targets[b, t]) == tokens[b, t + s]


def test_each_depth_is_scored_against_token_t_plus_depth_plus_one():
  """A hand-built batch: a hidden state that 'predicts' the token `shift` ahead gets a low
  loss at depth k only when shift == k + 1."""
  vocab, length = 16, 12
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, vocab, (2, length)), jnp.int32)
  seg = jnp.asarray([[1] * 5 + [2] * 7, [1] * length], jnp.int32)
  eye = 20.0 * jnp.eye(vocab)  # head: hidden one-hot -> a confident logit
  for depth in range(3):
    targets, mask = losses.depth_targets(tokens, seg, depth)
    for shift in range(1, 5):
      h = jax.nn.one_hot(np.roll(np.asarray(tokens), -shift, axis=1), vocab)
      nll, hits = losses.head_cross_entropy(h, eye, targets, mask, chunk_len=4)
      mean = float(nll / mask.sum())
      if shift == depth + 1:
        assert mean < 1e-3 and float(hits) == float(mask.sum())
      else:
        assert mean > 1.0


def test_chunked_loss_equals_whole_sequence_loss():
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 32)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 32, (2, 16)), jnp.int32)
  m = jnp.asarray(rng.random((2, 16)) > 0.3)
  whole = jax.value_and_grad(lambda h: losses.head_cross_entropy(h, w, t, m)[0])(h)
  chunked = jax.value_and_grad(lambda h: losses.head_cross_entropy(h, w, t, m, chunk_len=4)[0])(h)
  np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6)
  np.testing.assert_allclose(whole[1], chunked[1], rtol=1e-6, atol=1e-7)


def test_the_head_backward_runs_in_the_compute_dtype():
  """bfloat16 h and head: the loss is float32, but both gradient matmuls take bfloat16 operands
  (a float32 logits cotangent would make them float32 matmuls), and the gradients agree with
  float32 autodiff to bfloat16's precision."""
  keys = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(keys[0], (2, 8, 16)).astype(jnp.bfloat16)
  w = (0.3 * jax.random.normal(keys[1], (16, 40))).astype(jnp.bfloat16)
  t = jax.random.randint(keys[2], (2, 8), 0, 40)
  m = jnp.ones((2, 8), bool)

  def loss(h, w):
    return losses.head_cross_entropy(h, w, t, m)[0]

  grads = jax.grad(loss, (0, 1))
  dots = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        dots.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for v in eqn.params.values():
        for sub in v if isinstance(v, tuple | list) else [v]:
          if hasattr(sub, "eqns"):
            walk(sub)
          elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(grads)(h, w).jaxpr)
  assert len(dots) == 4 and set(dots) == {("bfloat16", "bfloat16")}, dots  # forward, again (remat), dh, dw
  assert loss(h, w).dtype == jnp.float32
  want = jax.grad(loss, (0, 1))(h.astype(jnp.float32), w.astype(jnp.float32))
  for got, ref in zip(grads(h, w), want, strict=True):
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), ref, rtol=2e-2, atol=2e-3)


def test_mtp_depths_never_hold_their_logits_at_once(tiny):
  """Compiled temporary memory: three extra depths cost less than one logits tensor, and
  sequence chunks cut the remaining one."""
  vocab, length, batch = 8192, 64, 8
  logits_bytes = batch * length * vocab * 4

  def temp(depth, chunk):
    cfg = tiny(
      f"model.mtp.depth={depth}",
      f"model.vocab_size={vocab}",
      f"data.seq_len={length}",
      f"train.loss_chunk_len={chunk}",
      "model.moe.num_experts=0",
    )
    return build(cfg, jax.devices()[:1]).compile().memory_analysis().temp_size_in_bytes

  chunked = temp(3, 16)
  assert chunked - temp(0, 16) < logits_bytes
  assert temp(3, 0) - chunked > logits_bytes / 2


def test_router_bias_moves_without_the_optimizer_and_the_mtp_weight_follows_its_schedule(tiny):
  program = build(tiny("model.moe.bias_update_rate=0.01", "model.mtp.loss_weight_schedule=[[1, 0.1]]"))
  batch = {k: jax.device_put(v, program.batch_sharding) for k, v in fixed_batch(program.cfg).items()}
  state, first = program.step(program.init_state(), batch)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)]
  assert paths and not any("bias" in p for p in paths)
  bias = np.asarray(state.router_bias["layers"][1]["ffn"]["router"]["bias"][...][0])  # layer 1: the MoE stack's block 0
  # One sign step from zero: gamma * sign(mean load - load), 0 for an expert at exactly the mean.
  steps = np.round(bias / 0.01, 4)
  assert set(steps.tolist()) <= {-1.0, 0.0, 1.0} and np.count_nonzero(steps) >= 6, bias
  _, second = program.step(state, batch)
  assert [float(m["mtp_lambda"]) for m in (first, second)] == pytest.approx([0.3, 0.1])


def test_resumed_run_equals_uninterruptedrun_steps(tiny, tmp_path):
  """Through the real loop and Orbax: model state, a two-source data mixture (whose iterator
  state rides in the checkpoint) and the eval stream all resume exactly."""
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 256, rng.integers(5, 60)).astype(np.int32) for _ in range(40)]
  docs = [np.append(d, data.EOS_ID).astype(np.int32) for d in docs]
  a = write_dataset(tmp_path / "a", docs[:25], vocab_size=257, eos_id=256, eval_docs=docs[35:])
  b = write_dataset(tmp_path / "b_data", docs[25:35], vocab_size=257, eos_id=256)

  def cfg(workdir, steps):
    return tiny(
      f"train.workdir={workdir}",
      f"train.steps={steps}",
      "train.log_every=2",
      "checkpoint.every=4",
      "model.mtp.depth=2",
      "optimizer.decay_steps=6",  # one lr schedule for all three runs
      f"data.sources=[{{path: {a}, weight: 2}}, {{path: {b}, weight: 1}}]",
      "train.eval_every=3",
      "train.eval_batches=2",
      "train.eval_spec_tokens=6",  # after 8-token prompts: within data.seq_len 16
    )

  said = []
  straight = loop.train(cfg(tmp_path / "a_run", 6), log=said.append)
  assert any(line.startswith("compiled step memory per device: arguments") for line in said), said
  header = [line for line in said if line.startswith("compiled step per device: ")]  # 8 devices: gradients summed
  assert len(header) == 1 and " MiB a step to the others (all-reduce " in header[0], said
  assert any(line.startswith(f"data: {a}: 25 documents") for line in said), said
  first = loop.train(cfg(tmp_path / "b", 4), log=lambda *_: None)
  resumed = loop.train(cfg(tmp_path / "b", 6), log=lambda *_: None)
  train_steps = [r["step"] for r in first + resumed if "loss" in r]
  eval_steps = [r["step"] for r in first + resumed if "eval/ntp_loss" in r]
  assert train_steps == [2, 4, 6] and eval_steps == [3, 4, 6]
  (want,), (got,) = ([r for r in run if r["step"] == 6 and "loss" in r] for run in (straight, resumed))
  for k in STEP_KEYS:
    assert want[k] == got[k], k  # bitwise: the resumed run is the same computation
  (want,), (got,) = ([r for r in run if r["step"] == 6 and "eval/ntp_loss" in r] for run in (straight, resumed))
  per_depth = ["ntp_loss", "ntp_acc", *(f"mtp_{m}_{k}" for k in (1, 2) for m in ("loss", "acc", "agree"))]
  spec = ["spec_accept_1", "spec_accept_2", "spec_accepted_len", "spec_passes_per_token"]
  assert set(want) == {"step", *(f"eval/{m}" for m in per_depth + spec)}
  for k in want:
    assert want[k] == got[k], k
  lines = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
  assert sorted(r["step"] for r in lines) == [2, 3, 4, 4, 6, 6]
  lines = [r for r in lines if "loss" in r]
  for key in [
    "loss",
    "ntp_loss",
    "mtp_loss_1",
    "mtp_loss_2",
    "mtp_acc_1",
    "mtp_acc_2",
    "balance_loss",
    "z_loss",
    "expert_load_max_over_mean",
    "grad_norm",
    "learning_rate",
    "tokens_per_sec",
    "mfu",
  ]:
    assert key in lines[-1], key
  assert lines[-1]["mfu"] is None  # no known peak for a CPU
  assert list((tmp_path / "b" / "tensorboard").iterdir())
  assert loop.train(cfg(tmp_path / "b", 6), log=lambda *_: None) == []  # already done

  with pytest.raises(checkpoint.CheckpointError, match=r"6 does not fit this config: params\.\S+ has shape"):
    loop.train(
      tiny(
        f"train.workdir={tmp_path / 'b'}",
        "train.steps=8",
        "model.d_model=48",
        "model.mtp.depth=2",
        "optimizer.decay_steps=6",
      ),
      log=lambda *_: None,
    )
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["4", "6"]  # nothing lost

  # A damaged checkpoint with checkpoint.strict: one line from the command, a non-zero exit,
  # nothing deleted or moved.
  for f in (tmp_path / "b" / "checkpoints" / "6" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:20])
  overrides = [
    *TINY,
    f"train.workdir={tmp_path / 'b'}",
    "train.steps=8",
    "model.mtp.depth=2",
    "optimizer.decay_steps=6",
    "checkpoint.strict=true",
  ]
  out = subprocess.run([sys.executable, "-m", "mtp_jax.cli", *overrides], capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.startswith("mtp-train: checkpoint ") and "is damaged" in out.stderr, out.stderr
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr
  assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["4", "6"]


def test_tiny_config_loss_falls(tmp_path):
  from mtp_jax import config

  cfg = config.load(
    CONFIGS / "tiny.yaml",
    [
      f"train.workdir={tmp_path}",
      "train.steps=10",  # the loss at step 1 and 10, in warmup: 5.85 -> 4.72 (depth 1: 5.73 -> 4.75)
      "train.log_every=1",
      "train.eval_every=0",  # the loss is the point here; evaluation has its own tests
      "checkpoint.enabled=false",
      "train.progress_bar=false",
    ],
  )
  records = loop.train(cfg, devices=jax.devices()[:1], log=lambda *_: None)  # as on a laptop CPU
  first, last = records[0], records[-1]
  assert (first["step"], last["step"]) == (1, 10)
  assert last["ntp_loss"] < first["ntp_loss"] - 0.5, records
  assert last["mtp_loss_1"] < first["mtp_loss_1"] - 0.5, records


def test_mesh_checks_that_need_the_device_count(tiny):
  from mtp_jax.config import ConfigError

  with pytest.raises(
    ConfigError, match=r"model\.moe\.num_experts: 4 is not divisible by the expert axis \(8 devices\)"
  ):
    build(tiny("mesh.data=1", "mesh.expert=-1", "model.moe.num_experts=4"))
  with pytest.raises(ConfigError, match=r"train\.batch_size: 4 / grad_accum_steps 1 = 4 sequences per microbatch"):
    build(tiny("train.batch_size=4"))
  with pytest.raises(ConfigError, match="multiply to 4, not the 8 devices"):
    build(tiny("mesh.data=4"))
  # grad_accum_steps=-1: one sequence per batch-sharded device per microbatch, counted on this mesh.
  assert build(tiny("train.batch_size=32", "train.grad_accum_steps=-1")).cfg.train.grad_accum_steps == 4
  two = build(tiny("train.batch_size=32", "train.grad_accum_steps=-1", "mesh.data=2", "mesh.tensor=2", "mesh.expert=2"))
  assert two.cfg.train.grad_accum_steps == 8  # batch over data x expert: 4 ways
  with pytest.raises(ConfigError, match=r"grad_accum_steps: -1 needs train\.batch_size \(12\) to split over the 8"):
    build(tiny("train.batch_size=12", "train.grad_accum_steps=-1"))


def test_a_workdir_that_cannot_be_made_is_a_config_error_before_any_compile(tiny, tmp_path, monkeypatch):
  from mtp_jax.config import ConfigError

  (tmp_path / "file").write_text("")
  monkeypatch.setattr(loop, "build", lambda *_: pytest.fail("the step was built first"))
  with pytest.raises(ConfigError) as raised:
    loop.train(tiny(f"train.workdir={tmp_path / 'file' / 'run'}"))
  assert str(raised.value) == (f"config error: train.workdir: cannot make {tmp_path / 'file' / 'run'}: Not a directory")


def test_an_overflowing_update_is_skipped_like_a_nan(tiny, tmp_path):
  # Each update would send the parameters to ~1e30, whose norm overflows; the loss of step 1 is
  # still finite (computed before the update), so only the guard's check of the result catches it.
  cfg = tiny(
    f"train.workdir={tmp_path}",
    "train.steps=6",
    "train.log_every=3",
    "checkpoint.every=2",
    "train.max_bad_steps=2",
    "optimizer.learning_rate=1e30",
    "optimizer.warmup_steps=0",
    "optimizer.grad_clip=0",
  )
  with pytest.raises(loop.TrainingError, match=r"steps 1-2: 2 updates in a row skipped .* that of step 0"):
    loop.train(cfg, log=lambda *_: None)
  (saved,) = (tmp_path / "checkpoints").glob("[0-9]*")  # step 2: the initial state, finite
  assert saved.name == "2"


def test_weight_decay_spares_norms_and_the_router_bias(tiny):
  from flax import nnx

  from mtp_jax.train import optimizer, step

  model = nnx.eval_shape(lambda: step.build_model(tiny()))
  _, params, bias = step.split(model)
  mask = optimizer.decay_mask(params)
  flags = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flags and all(not v for k, v in flags.items() if "norm" in k)
  assert all(v for k, v in flags.items() if "norm" not in k)  # every matrix decays
  assert jax.tree.leaves(bias) and not any("bias" in k for k in flags)  # not a parameter at all


def test_attention_blocks_bound_the_score_memory(tiny):
  """Compiled temporary memory: with query blocks of 16, the float32 scores of 4 x 256 x 256
  per layer and sequence never exist whole, forward or backward."""
  batch, length, heads = 4, 256, 4
  scores_bytes = batch * heads * length * length * 4

  def temp(chunk):
    cfg = tiny(
      f"data.seq_len={length}",
      f"train.batch_size={batch}",
      f"train.attention_chunk_len={chunk}",
      "train.remat=full",
      "model.moe.num_experts=0",
      "model.mtp.depth=0",
    )
    return build(cfg, jax.devices()[:1]).compile().memory_analysis().temp_size_in_bytes

  assert temp(0) - temp(16) > scores_bytes


def test_metrics_reach_tensorboard_without_importing_torch(tmp_path):
  """A run's scalars land in a TensorBoard event file, and its start does not import torch
  (installed here for the export tests; tensorboardX's writer would import it, 1.8 s)."""
  from conftest import child_env
  from tensorboardX.proto import event_pb2

  code = (
    "import sys; from mtp_jax.train.metrics import MetricsWriter; w = MetricsWriter(sys.argv[1]);"
    "w.write(3, {'loss': 2.5, 'mfu': None}); w.close(); print('torch' in sys.modules)"
  )
  run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=child_env())
  assert run.returncode == 0 and run.stdout.split() == ["False"], run.stderr[-2000:]
  (events,) = (tmp_path / "tensorboard").iterdir()
  raw, scalars = events.read_bytes(), []
  while raw:  # TFRecords: length (8 bytes), its CRC (4), the Event, the Event's CRC (4)
    n = int.from_bytes(raw[:8], "little")
    event = event_pb2.Event.FromString(raw[12 : 12 + n])
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    raw = raw[16 + n :]
  assert scalars == [(3, "loss", 2.5)]
