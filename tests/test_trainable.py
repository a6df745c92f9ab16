"""train.trainable=mtp: only the MTP modules train, on a trunk that runs forward only."""

import jax
import numpy as np
import pytest
from conftest import fixed_batch

from mtp_jax.model.flops import cost, traced_matmul_flops
from mtp_jax.train import loop
from mtp_jax.train.checkpoint import Checkpointer, CheckpointError, named_leaves
from mtp_jax.train.program import build

# Adam moves each parameter by its own gradient alone when nothing clips the global norm. One
# MTP module serves both depths (model.mtp.share_weights), its router bias moved by their summed load.
OVERRIDES = (
  "model.mtp.depth=2",
  "model.mtp.share_weights=true",
  "optimizer.grad_clip=0",
  "optimizer.learning_rate=0.01",
)


def _leaves(tree) -> dict[str, np.ndarray]:
  return named_leaves(jax.device_get(tree))


def _run(cfg, steps: int):
  """(parameters, router biases and optimizer state at the start), (parameters and router biases
  after each step), metrics of each step."""
  program = build(cfg, jax.devices()[:1])
  state = program.init_state()
  start = _leaves(state.params), _leaves(state.router_bias), _leaves(state.opt_state)
  batch = fixed_batch(cfg)
  after, history = [], []
  for _ in range(steps):
    state, metrics = program.step(state, batch)
    after.append((_leaves(state.params), _leaves(state.router_bias)))
    history.append(jax.device_get(metrics))
  return start, after, history


def test_training_only_the_mtp_modules_leaves_everything_else_bit_identical(tiny):
  (params0, bias0, opt), after, history = _run(tiny(*OVERRIDES, "train.trainable=mtp"), steps=3)
  params, bias = after[-1]
  mtp = [k for k in params if k.startswith("mtp.")]
  assert mtp and len(mtp) < len(params)
  for name, value in params.items():
    if name in mtp:
      assert not np.array_equal(value, params0[name]), f"{name} did not train"
    else:
      assert np.array_equal(value, params0[name]), f"{name} changed"
  # The optimizer holds moments for the MTP modules only.
  moments = [k for k in opt if ".mu." in k or ".nu." in k]
  assert len(moments) == 2 * len(mtp) and all(".mtp." in k for k in moments), list(opt)
  # The MTP depths' routers move by the load rule; the trunk's stay as they were.
  assert [k for k in bias if k.startswith("mtp.")], list(bias)
  for name, value in bias.items():
    assert np.array_equal(value, bias0[name]) != name.startswith("mtp."), name
  assert history[-1]["mtp_loss_1"] < history[0]["mtp_loss_1"]
  assert history[-1]["ntp_loss"] == history[0]["ntp_loss"]  # the same batch through the same trunk

  # From the same start the MTP modules take the step full training gives them: their gradients
  # do not depend on whether the trunk's are taken too.
  _, [(full, _)], _ = _run(tiny(*OVERRIDES), steps=1)
  only = after[0][0]
  for name in mtp:
    np.testing.assert_allclose(only[name], full[name], rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("kind", ["sequential", "parallel"])
def test_a_frozen_trunk_costs_its_forward_only(tiny, kind):
  """The traced step's matmuls equal the model's count for each: a frozen trunk and head run
  forward only, and no weight gradient of the shared head is taken. (Dense blocks, and the
  attention scores counted over whole rows as the einsum runs them, which `cost` counts for a
  sequence of 2L - 1; each depth with a backward pass recomputes its head chunk once.)"""
  for trainable in ("all", "mtp"):
    cfg = tiny("model.moe.num_experts=0", "model.mtp.depth=2", f"model.mtp.kind={kind}", f"train.trainable={trainable}")
    program = build(cfg, jax.devices()[:1])
    traced = traced_matmul_flops(program.step.trace(program.abstract_state, program.abstract_batch()).jaxpr, 1)
    tokens = cfg.train.batch_size * cfg.data.seq_len
    m = cfg.model
    backward_depths = m.mtp.depth + (trainable == "all")
    expected = cost(m, 2 * cfg.data.seq_len - 1, trainable).train_flops_per_token
    expected += backward_depths * 2 * m.d_model * m.vocab_size
    assert traced == pytest.approx(expected * tokens, rel=1e-9), (trainable, traced / tokens, expected)


def test_a_run_without_mtp_modules_gets_a_drafter_trained_on_its_frozen_trunk(tiny, tmp_path):
  """checkpoint.load_params_only from a run with fewer MTP modules: the modules it lacks start
  afresh, and train.trainable=mtp trains them alone on the restored trunk."""
  base = tiny("model.mtp.depth=0", "train.steps=2", f"train.workdir={tmp_path / 'base'}")
  loop.train(base, log=lambda _: None)
  logs = []
  drafter = tiny(
    "model.mtp.depth=1",
    "train.trainable=mtp",
    "train.steps=2",
    f"train.workdir={tmp_path / 'drafter'}",
    f"checkpoint.restore_from={tmp_path / 'base'}",
    "checkpoint.load_params_only=true",
  )
  records = loop.train(drafter, log=logs.append)
  assert any("MTP module(s) 1 are not in" in line and "initialised afresh" in line for line in logs), logs
  assert [r for r in records if "mtp_loss_1" in r]
  program = build(drafter)
  saved = {}
  for name, path in [("base", tmp_path / "base" / "checkpoints"), ("drafter", tmp_path / "drafter" / "checkpoints")]:
    ckpt = Checkpointer(path, read_only=True)
    target = program.abstract_state.params if name == "drafter" else build(base).abstract_state.params
    saved[name] = named_leaves(ckpt.restore(2, {"params": target}, partial=True)[0]["params"])
    ckpt.close()
  assert set(saved["drafter"]) - set(saved["base"]) == {k for k in saved["drafter"] if k.startswith("mtp.")}
  for name, value in saved["base"].items():
    assert np.array_equal(value, saved["drafter"][name]), f"{name} changed"
  # Resuming it as full training: its optimizer state covers the MTP modules alone, said in one line.
  full = drafter.model_copy(update={"train": drafter.train.model_copy(update={"trainable": "all", "steps": 3})})
  with pytest.raises(CheckpointError, match=r"has no opt_state\..*\(train\.trainable changed\?\): start a new run"):
    loop.train(full, log=lambda _: None)
