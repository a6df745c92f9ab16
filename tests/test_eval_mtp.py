"""Held-out measures of the MTP depths as drafters: argmax agreement with the main model, and
speculative acceptance on fixed prompts during training."""

import contextlib
import json
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_dataset
from flax import nnx

from mtp_jax import data
from mtp_jax.config import ConfigError
from mtp_jax.generate.speculative import speculative_generate
from mtp_jax.train import evaluate, loop, step
from mtp_jax.train.checkpoint import Checkpointer
from mtp_jax.train.program import build

# Shared by the tests below, so that they share compiled programs (init, eval step): dense, as
# routing is not what they test; the head chunked and the sequence split over devices, so the
# agreement's shift crosses chunk and device boundaries.
MODEL = ["model.moe.num_experts=0", "train.loss_chunk_len=4", "mesh.data=4", "mesh.sequence=2"]


def _packed_batch(rng, rows: int, length: int, vocab: int) -> dict[str, np.ndarray]:
  """Rows of several documents of random lengths, some ending in padding (segment 0)."""
  seg = np.zeros((rows, length), np.int32)
  pos = np.zeros((rows, length), np.int32)
  for r in range(rows):
    i, s = 0, 1
    while i < length - 2 * (r % 2):  # odd rows keep 2 padding slots at the end
      n = min(int(rng.integers(1, 7)), length - 2 * (r % 2) - i)
      seg[r, i : i + n], pos[r, i : i + n] = s, np.arange(n)
      i, s = i + n, s + 1
  tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32) * (seg != 0)
  return {"tokens": tokens, "segment_ids": seg, "positions": pos}


def test_agreement_is_depth_k_argmax_against_the_main_argmax_k_later(tiny):
  """The eval step's agreement counts equal a numpy count from the model's own forward outputs,
  over positions whose target t_{i+1+k} is in the same document."""
  depth = 2
  cfg = tiny(*MODEL, f"model.mtp.depth={depth}")
  program = build(cfg)
  state = program.init_state()
  head = state.params["head"]  # 4 live output columns: argmaxes among 5 tokens (the 4, or the first zero logit)
  head[...] = jax.device_put(head[...].at[:, 4:].set(0.0), head[...].sharding)
  host = _packed_batch(np.random.default_rng(0), cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size)
  sums = jax.device_get(
    program.eval_step(state, {k: jax.device_put(v, program.batch_sharding) for k, v in host.items()})
  )

  @jax.jit  # one program, not one for each op of the forward
  def argmaxes(params, bias, tokens, segment_ids, positions):
    model = nnx.merge(step.graphdef_of(cfg), params, bias)
    return [jnp.argmax(model.logits(h), -1) for h in model(tokens, segment_ids, positions).hidden]

  batch = (host[k] for k in ("tokens", "segment_ids", "positions"))
  top = [np.asarray(x) for x in argmaxes(state.params, state.router_bias, *batch)]
  seg = host["segment_ids"]
  b, length = seg.shape
  want, want_unmasked = [], []
  for k in range(1, depth + 1):
    same = np.zeros((b, length), bool)  # t_{i+1+k} exists and is in position i's document
    same[:, : length - 1 - k] = (seg[:, : length - 1 - k] != 0) & (seg[:, 1 + k :] == seg[:, : length - 1 - k])
    hit = np.zeros((b, length), bool)
    hit[:, : length - k] = top[k][:, : length - k] == top[0][:, k:]
    want.append(int((hit & same).sum()))
    want_unmasked.append(int(hit.sum()))
    assert sums["targets"][k] == same.sum()
  print("agreements", want, "of", sums["targets"][1:], "unmasked", want_unmasked)
  assert sums["agree"].tolist() == want
  assert want != want_unmasked and min(want) > 0  # the mask matters, and the counts are not all zero
  metrics = step.eval_metrics(sums)
  for k in range(1, depth + 1):
    assert metrics[f"eval/mtp_agree_{k}"] == pytest.approx(want[k - 1] / sums["targets"][k])
    assert 0 < metrics[f"eval/mtp_agree_{k}"] < 1


def test_evaluation_runs_in_the_train_steps_microbatches(tiny):
  """With train.grad_accum_steps, the eval step runs the batch in the train step's microbatches:
  the same sums as the whole batch at once, with fewer temporaries (one microbatch's activations;
  a batch that fits training only in parts fits evaluation)."""
  sums, temporaries = {}, {}
  for accum in (1, 8):
    cfg = tiny(*MODEL, "model.mtp.depth=2", "train.batch_size=64", f"train.grad_accum_steps={accum}")
    program = build(cfg)
    state = program.init_state()
    host = _packed_batch(np.random.default_rng(1), cfg.train.batch_size, cfg.data.seq_len, cfg.model.vocab_size)
    batch = {k: jax.device_put(v, program.batch_sharding) for k, v in host.items()}
    compiled = program.eval_step.lower(state, batch).compile()
    sums[accum], temporaries[accum] = (
      jax.device_get(compiled(state, batch)),
      compiled.memory_analysis().temp_size_in_bytes,
    )
  print("temporaries", temporaries)
  for k in ("hits", "targets", "agree"):
    assert sums[8][k].tolist() == sums[1][k].tolist()
  np.testing.assert_allclose(sums[8]["nll"], sums[1]["nll"], rtol=1e-6)
  assert temporaries[8] < temporaries[1] / 2


def test_prompts_are_the_first_rows_cut_inside_their_first_document():
  eos = 9
  batch = {
    "tokens": np.array([[1, 2, 3, 4, 5, 6], [7, 8, eos, 1, 2, 3], [5, 6, 7, 1, 2, 3], [eos, 1, 2, 3, 4, 5]]),
    "segment_ids": np.array([[1] * 6, [1, 1, 1, 2, 2, 2], [1, 1, 2, 3, 3, 3], [1, 2, 2, 2, 2, 2]]),
  }
  assert evaluate.held_out_prompts(batch, 4, 4, eos) == [[1, 2, 3, 4], [7, 8], [5, 6], [eos]]
  assert evaluate.held_out_prompts(batch, 2, 8, eos) == [[1, 2, 3, 4, 5, 6], [7, 8]]


def test_training_reports_the_speculative_acceptance_of_its_parameters(tiny, tmp_path, caplog):
  """A tiny run evaluates twice; each time the MTP depths draft greedily for the first held-out
  prompts. The last numbers are what `speculative_generate` measures with the saved parameters
  on the same prompts, and what evaluation runs is compiled once, ahead of it."""
  rng = np.random.default_rng(0)
  docs = [np.append(rng.integers(0, 256, rng.integers(10, 40)), data.EOS_ID).astype(np.int32) for _ in range(30)]
  path = write_dataset(tmp_path / "data", docs[:20], vocab_size=257, eos_id=256, eval_docs=docs[20:])
  depth, prompts, prompt_len, new = 2, 3, 6, 8
  cfg = tiny(
    f"data.path={path}",
    f"train.workdir={tmp_path / 'run'}",
    "train.steps=4",
    "train.log_every=4",
    "train.eval_every=2",
    "train.eval_batches=1",
    f"train.eval_spec_prompts={prompts}",
    f"train.eval_spec_prompt_len={prompt_len}",
    f"train.eval_spec_tokens={new}",
    "checkpoint.every=4",
    *MODEL,
    f"model.mtp.depth={depth}",
    "optimizer.warmup_steps=0",
    "optimizer.learning_rate=0.01",
  )
  said = []
  jax.config.update("jax_log_compiles", True)  # in every thread (`jax.log_compiles` is the caller's only)
  try:
    with caplog.at_level(logging.WARNING):
      records = loop.train(cfg, log=said.append)
  finally:
    jax.config.update("jax_log_compiles", False)
  compiles = [
    (r.threadName, name)
    for r in caplog.records
    for name in ("eval_step", "_speculative")
    if f"Compiling jit({name})" in r.getMessage()
  ]
  # Each compiled once, ahead, in the thread beside the train steps; both evaluations find them.
  assert compiles == [("mtp-eval-compile_0", "eval_step"), ("mtp-eval-compile_0", "_speculative")], compiles
  (line,) = [s for s in said if s.startswith("evaluation compiled in ")]
  assert "eval step " in line and f"speculative decoding of {prompts} prompts (train.eval_spec_prompts) " in line
  first = next(s for s in said if s.startswith("eval at step "))
  assert said.index(line) < said.index(first), said  # also where the first evaluation waited for it
  evals = [r for r in records if "eval/ntp_loss" in r]
  assert [r["step"] for r in evals] == [2, 4]
  lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  (got,) = [r for r in lines if r["step"] == 4 and "eval/ntp_loss" in r]
  accept = [got[f"eval/spec_accept_{j}"] for j in range(1, depth + 1)]
  agree = [got[f"eval/mtp_agree_{k}"] for k in range(1, depth + 1)]
  print(got)
  assert all(0 <= a <= 1 for a in accept + agree)
  assert accept[0] > 0  # a model that has learnt the byte distribution drafts something right
  assert got["eval/spec_accepted_len"] == pytest.approx(1 + sum(accept))  # drafts are accepted in order
  assert 1 / (1 + depth) <= got["eval/spec_passes_per_token"] <= 1
  line = next(s for s in said if s.startswith("eval at step 4: "))
  assert "agree " in line and "spec accept " in line, line

  program = build(cfg)
  state, _ = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).restore(4, program.abstract_state)
  model = nnx.merge(step.graphdef_of(cfg), state.params, state.router_bias)
  eval_data = data.make_dataset(cfg.data, batch_size=cfg.train.batch_size, seed=0, split="eval")
  held_out = evaluate.held_out_prompts(next(iter(eval_data)), prompts, prompt_len, data.EOS_ID)
  assert len(held_out) == prompts and all(1 <= len(p) <= prompt_len for p in held_out)
  _, stats = speculative_generate(model, held_out, new, eos_id=data.EOS_ID)
  assert accept == list(stats.acceptance)
  assert got["eval/spec_accepted_len"] == pytest.approx(1 + stats.mean_accepted)
  assert got["eval/spec_passes_per_token"] == pytest.approx(stats.passes_per_token)


class _Refused:
  """A lowered program XLA refuses, as XLA:TPU refuses one too big for its chips, once `after`
  is set (a compile takes a while)."""

  def __init__(self, after: threading.Event):
    self.after = after

  def compile(self):
    self.after.wait(60)
    raise jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm.\nmore"
    )


def _long_run(tiny, tmp_path, *overrides):
  """A 400-step run that would evaluate at its end only, checkpointing every step."""
  rng = np.random.default_rng(0)
  docs = [np.append(rng.integers(0, 256, 30), data.EOS_ID).astype(np.int32) for _ in range(30)]
  path = write_dataset(tmp_path / "data", docs[:20], vocab_size=257, eos_id=256, eval_docs=docs[20:])
  return tiny(
    f"data.path={path}",
    f"train.workdir={tmp_path / 'run'}",
    "train.steps=400",
    "train.log_every=1",
    "train.eval_every=400",
    "train.eval_spec_prompts=0",
    "checkpoint.every=1",
    *MODEL,
    *overrides,
  )


def test_on_gpus_the_evaluation_compiles_before_the_first_step(tiny, tmp_path, monkeypatch):
  """XLA:GPU times its kernel choices on the GPU as it compiles: there nothing runs beside it."""
  monkeypatch.setattr(evaluate, "COMPILE_FIRST_ON", (jax.devices()[0].platform,))
  said = []
  loop.train(_long_run(tiny, tmp_path, "train.steps=2", "train.progress_bar=false"), log=said.append)
  (line,) = [s for s in said if s.startswith("evaluation compiled in ")]
  assert said.index(line) < said.index(next(s for s in said if s.startswith("step 1: "))), said
  assert "waiting" not in line and said[-1].startswith("eval at step 2: "), said


def test_an_evaluation_xla_refuses_stops_the_run_at_its_start(tiny, tmp_path, monkeypatch):
  """The evaluation's programs compile beside the first train steps: one the compiler refuses
  stops the run with one line naming it right then, not at its first evaluation hours later,
  and the checkpoints saved before stay."""
  cfg = _long_run(tiny, tmp_path)
  saved, save = threading.Event(), Checkpointer.save
  monkeypatch.setattr(Checkpointer, "save", lambda self, *args: (save(self, *args), saved.set())[0])
  monkeypatch.setattr(evaluate, "lowered", lambda program, *prompts: [("eval step", _Refused(saved))])
  said = []
  with pytest.raises(evaluate.EvaluationError) as raised:
    loop.train(cfg, log=said.append)
  assert str(raised.value) == (
    "evaluation (train.eval_every=400): XLA refuses the eval step on these devices: RESOURCE_EXHAUSTED: "
    "XLA:TPU compile permanent error. Ran out of memory in memory space hbm."
  )
  steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  print("stopped after step", steps[-1])
  assert steps[-1] < 400 and not any(s.startswith("eval at") for s in said)
  latest = Checkpointer(tmp_path / "run" / "checkpoints", read_only=True).latest_step()
  assert latest is not None and latest >= steps[-1] - 1


@pytest.mark.parametrize("stop", ["preempted", "interrupted"])
def test_a_run_stopped_while_its_evaluation_compiles_says_why_it_is_still_there(tiny, tmp_path, monkeypatch, stop):
  """A preemption notice or Ctrl-C at step 2 while the evaluation's compile (held here until the
  run has returned) goes on: the process waits for that thread at exit, and the log says so."""
  cfg = _long_run(tiny, tmp_path)
  release = threading.Event()
  monkeypatch.setattr(evaluate.Evaluator, "_compile", lambda self: (release.wait(60), (0.0, []))[1])

  def reached(self, done):
    if done == 2 and stop == "interrupted":
      raise KeyboardInterrupt
    return done == 2

  monkeypatch.setattr(loop.Preemption, "reached", reached)
  said = []
  try:
    with contextlib.suppress(KeyboardInterrupt):
      loop.train(cfg, log=said.append)
  finally:
    release.set()
  assert said[-1] == "the evaluation's programs are still compiling: the process ends once XLA has finished them"
  if stop == "preempted":
    assert said[-2].startswith("preempted at step 2: saved checkpoint step 2 in "), said[-2:]


@pytest.mark.parametrize(
  "overrides, message",
  [
    (
      ["train.eval_spec_tokens=12"],
      r"train\.eval_spec_tokens: 8-token prompts \+ 12 new tokens exceed data\.seq_len \(16\); lower it",
    ),
    (
      ["train.eval_spec_tokens=4", "train.eval_spec_prompt_len=14"],
      r"train\.eval_spec_tokens: 14-token prompts \+ 4 new tokens exceed data\.seq_len \(16\)",
    ),
    (["train.eval_spec_tokens=4", "train.eval_spec_prompts=9"], r"eval_spec_prompts: 9 exceeds the rows of one eval"),
    (["train.eval_spec_tokens=1"], r"train\.eval_spec_tokens: Input should be greater than or equal to 2"),
    (["train.eval_spec_prompts=-1"], r"train\.eval_spec_prompts: Input should be greater than or equal to 0"),
  ],
)
def test_speculative_eval_settings_must_fit(tiny, overrides, message):
  with pytest.raises(ConfigError, match=message):
    tiny("train.eval_every=5", *overrides)


def test_speculative_eval_settings_are_free_when_nothing_runs(tiny):
  for off in (
    ["train.eval_every=0"],
    ["train.eval_every=5", "model.mtp.depth=0"],
    ["train.eval_every=5", "train.eval_spec_prompts=0"],
  ):
    assert tiny("train.eval_spec_tokens=64", *off).train.eval_spec_tokens == 64
