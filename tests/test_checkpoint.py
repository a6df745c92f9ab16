"""Checkpoints: kill -9 anywhere, SIGTERM, resharding, damage, the resume order, the NaN guard."""

import json
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, child_env

from mtp_jax.train import checkpoint, loop
from mtp_jax.train.checkpoint import Checkpointer
from mtp_jax.train.program import build

_NOT_DETERMINISTIC = {"tokens_per_sec", "mfu"}


def _records(workdir) -> list[dict]:
  """The complete lines of metrics.jsonl (a running child may be halfway through writing one)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  text = path.read_text() if path.exists() else ""
  return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def _complete_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def _same_values(got: dict, want: dict) -> None:
  """Bitwise: JSON round-trips a float32 exactly, and NaN is written as null."""
  for k in set(want) - _NOT_DETERMINISTIC:
    assert got.get(k) == want[k], (got["step"], k, got.get(k), want[k])


# ----------------------------------------------------------------------------- kill -9 and SIGTERM

KILL_RUN = ["train.steps=14", "train.log_every=1", "checkpoint.every=3", "checkpoint.max_to_keep=2"]


def _start(workdir, log_path) -> subprocess.Popen:
  # One CPU device: the quickest steps. Unbuffered: what it printed before a kill -9 is in the log.
  env = child_env(PYTHONUNBUFFERED="1")
  cmd = [sys.executable, "-m", "mtp_jax.cli", *TINY, *KILL_RUN, f"train.workdir={workdir}"]
  with open(log_path, "w") as out:  # the child writes to its own copy of the descriptor
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def _wait_for(proc: subprocess.Popen, ready, timeout=240.0, poll=0.005) -> None:
  deadline = time.monotonic() + timeout
  while not ready():
    assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before the moment to interrupt it"
    assert time.monotonic() < deadline, "timed out waiting for the moment to interrupt the run"
    time.sleep(poll)


def test_kill_anywhere_then_resume_reproduces_the_uninterrupted_losses(tiny, tmp_path):
  """kill -9 during a step and during a save, then SIGTERM: every restart resumes from the latest
  complete checkpoint, and every logged step of every run equals the uninterrupted run bitwise."""
  want = {
    r["step"]: r
    for r in loop.train(
      tiny(*KILL_RUN, f"train.workdir={tmp_path / 'straight'}"), devices=jax.devices()[:1], log=lambda *_: None
    )
    if "loss" in r
  }
  assert sorted(want) == list(range(1, 15))
  rng = np.random.default_rng(4)
  workdir = tmp_path / "run"
  ckpts = workdir / "checkpoints"

  def logged(step):  # by the run now going: earlier runs' records are in the same file
    return lambda: any(r["step"] >= step for r in _records(workdir)[seen:])

  def half_written():
    return {p.name for p in ckpts.iterdir() if "tmp" in p.name} if ckpts.is_dir() else set()

  def saving():  # a save of this run in flight (a kill can leave one behind for the next run to clear)
    return bool(half_written() - stale)

  interruptions = [
    ("kill", logged(int(rng.integers(2, 5))), rng.uniform(0, 0.3)),  # somewhere in the steps
    ("kill", saving, 0.0),  # while a checkpoint is being written
    ("kill", logged(int(rng.integers(8, 10))), rng.uniform(0, 0.3)),
    ("term", logged(11), 0.0),  # a preemption notice: save at the step boundary and exit 0
    ("finish", None, 0.0),
  ]
  expect_resume, killed_mid_save = None, False
  for i, (how, moment, delay) in enumerate(interruptions):
    log_path = tmp_path / f"log{i}.txt"
    stale, seen = half_written(), len(_records(workdir))
    proc = _start(workdir, log_path)
    if how == "finish":
      assert proc.wait(timeout=240) == 0, log_path.read_text()[-3000:]
    else:
      _wait_for(proc, moment)
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL if how == "kill" else signal.SIGTERM)
      code = proc.wait(timeout=240)
      assert code == (-signal.SIGKILL if how == "kill" else 0), log_path.read_text()[-3000:]
      killed_mid_save |= moment is saving and saving()  # the kill left a half-written step behind
    out = log_path.read_text()
    if expect_resume is None:
      assert "starting from fresh initialisation" in out, out[-3000:]
    else:
      assert f"resumed from step {expect_resume} in {ckpts} (the latest complete checkpoint)" in out, out[-3000:]
    if how == "term":
      (preempted,) = re.findall(r"preempted at step (\d+): saved checkpoint step \1", out)
      assert int(preempted) >= 11 and int(preempted) in _complete_steps(workdir)
    expect_resume = max(_complete_steps(workdir), default=None)
  assert killed_mid_save, "no kill landed while a checkpoint was being written"
  assert not [p for p in ckpts.iterdir() if not p.name.isdigit()]  # half-written steps were cleared away
  records = [r for r in _records(workdir) if "loss" in r]
  assert {r["step"] for r in records} == set(range(1, 15))
  for r in records:  # steps redone after a kill are logged again, and must agree too
    _same_values(r, want[r["step"]])


# ----------------------------------------------------------------------------- the Checkpointer alone


def test_restore_onto_another_mesh_and_device_count_keeps_every_value(tiny, tmp_path):
  saved_on = build(tiny("mesh.data=1", "mesh.fsdp=8"))
  state = saved_on.init_state()
  state = state.replace(opt_state=jax.tree.map(lambda x: x + jnp.ones_like(x), state.opt_state))  # not all zeros
  ckpt = Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, state, None)
  ckpt.wait()
  restored_on = build(tiny("mesh.data=1", "mesh.fsdp=2", "mesh.expert=2"), jax.devices()[:4])
  restored, run = ckpt.restore(1, restored_on.abstract_state)
  ckpt.close()
  assert run["origin"] is None
  w = restored.params["layers"][1]["ffn"]["experts"]["w_gate"][...]
  assert len(w.sharding.device_set) == 4 and "expert" in w.sharding.spec  # really on the new mesh
  before, after = checkpoint.named_leaves(state), checkpoint.named_leaves(restored)
  assert before.keys() == after.keys()
  for k in before:
    np.testing.assert_array_equal(np.asarray(before[k]), np.asarray(after[k]), err_msg=k)


def test_checksums_see_one_changed_element_and_not_the_layout(tiny):
  program = build(tiny("mesh.data=1", "mesh.fsdp=8"))
  state = program.init_state()
  sums = checkpoint.checksums(state.params)
  moved = jax.device_put(state.params, jax.tree.map(lambda _: jax.devices()[0], state.params))
  assert checkpoint.checksums(moved) == sums
  w = state.params["layers"][1]["attn"]["wq"]
  w[...] = w[...].at[0, 3, 1, 2].add(1e-6)
  changed = checkpoint.checksums(state.params)
  assert [k for k in sums if sums[k] != changed[k]] == ["layers.1.attn.wq"]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.bool_])
@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_checksum_terms_of_a_stacks_blocks_add_up_to_the_arrays(dtype, chunk, monkeypatch):
  """The host's checksum (numpy, what a reader computes) against the devices' (what a save
  records): of a whole array, and of a stack's blocks summed; in passes of 7 elements too."""
  monkeypatch.setattr(checkpoint, "_HOST_CHUNK", chunk)
  x = (jax.random.normal(jax.random.key(0), (4, 6, 5)) * 1e4).astype(dtype)
  whole = checkpoint.checksums({"x": x})["x"]
  assert checkpoint.slice_checksum(np.asarray(x)) == whole
  size = x[0].size
  assert sum(checkpoint.slice_checksum(np.asarray(x[j]), j * size) for j in range(4)) % 2**32 == whole
  assert checkpoint.slice_checksum(x[1], size) != checkpoint.slice_checksum(x[1], 0)  # where a block sits counts
  # Offsets past 2**32 elements wrap as the device's uint32 index does.
  assert checkpoint.slice_checksum(x[1], size + 2**32) == checkpoint.slice_checksum(x[1], size)


def test_a_checkpoint_of_the_block_by_block_layout_is_refused_in_one_line(tiny, tmp_path):
  program = build(tiny("mesh.data=1"), jax.devices()[:1])
  ckpt = Checkpointer(tmp_path / "checkpoints")
  ckpt.save(1, {"params": {"blocks": {"0": {"attn_norm": {"scale": {"value": jnp.ones(32)}}}}}}, None)
  ckpt.wait()
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"/checkpoints/1 stores the trunk a block at a time \(params\.blocks\.0\.attn_norm\.scale\), .* "
    r"mtp-import the result$",
  ):
    ckpt.restore(1, program.abstract_state)
  ckpt.close()


def test_retention_keeps_the_latest_n_and_every_mth(tmp_path):
  from mtp_jax.config import CheckpointConfig

  ckpt = Checkpointer(tmp_path, CheckpointConfig(max_to_keep=2, keep_every=4))
  for step in range(1, 11):
    ckpt.save(step, {"x": jnp.full((3,), step, jnp.float32)}, None)
  ckpt.wait()
  assert ckpt.steps() == [4, 8, 9, 10]
  ckpt.close()


def _flip_bytes(path: pathlib.Path) -> None:
  b = bytearray(path.read_bytes())
  for i in range(len(b) // 2, len(b) // 2 + 8):
    b[i] ^= 0xFF
  path.write_bytes(bytes(b))


def test_damage_anywhere_is_caught_and_never_restored_silently(tmp_path):
  """Flip bytes in each file of a checkpoint in turn: the restore either fails as Damaged or
  returns exactly what was saved (a file no read touches). Compressed chunks that still
  decode are what the checksums are for; at least one flip must be caught by them."""
  rng = np.random.default_rng(0)
  state = {
    "w": jnp.asarray(rng.normal(size=(64, 96)), jnp.float32),
    "h": jnp.asarray(rng.normal(size=(48, 32)), jnp.bfloat16),
    "n": jnp.arange(300, dtype=jnp.int32),
  }
  ckpt = Checkpointer(tmp_path / "saved")
  ckpt.save(1, state, None)
  ckpt.close()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=one) for k, v in state.items()}
  files = sorted(f.relative_to(tmp_path / "saved") for f in (tmp_path / "saved").rglob("*") if f.is_file())
  by_checksum = 0
  for rel in files:
    shutil.rmtree(tmp_path / "copy", ignore_errors=True)
    shutil.copytree(tmp_path / "saved", tmp_path / "copy")
    _flip_bytes(tmp_path / "copy" / rel)
    reader = Checkpointer(tmp_path / "copy", read_only=True)
    try:
      restored, _ = reader.restore(1, target)
    except checkpoint.Damaged as err:
      by_checksum += "does not match its checksum" in str(err)
      continue
    finally:
      reader.close()
    for k in state:
      np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]), err_msg=f"{rel}: {k}")
  assert by_checksum >= 1, files

  # Read in the saved dtype, checked, then cast: a changed param_dtype is not damage.
  reader = Checkpointer(tmp_path / "saved", read_only=True)
  as_bf16 = {k: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16, sharding=one) for k, v in target.items() if k != "n"}
  restored, _ = reader.restore(1, as_bf16, partial=True)
  reader.close()
  for k in as_bf16:
    assert restored[k].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k].astype(jnp.bfloat16)), err_msg=k)


# ----------------------------------------------------------------------------- through the loop


RUN = ["train.steps=4", "train.log_every=1", "checkpoint.every=2", "model.moe.bias_update_rate=0.01"]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  """A 4-step run with checkpoints at steps 2 and 4; tests copy it before touching it."""
  from conftest import tiny_config

  workdir = tmp_path_factory.mktemp("first") / "run"
  records = loop.train(tiny_config(*RUN, f"train.workdir={workdir}"), log=lambda *_: None)
  return workdir, {r["step"]: r for r in records if "loss" in r}


def _copy(first_run, dest) -> pathlib.Path:
  shutil.copytree(first_run[0], dest)
  return dest


def _train(tiny, workdir, *overrides):
  said = []
  records = loop.train(tiny(*RUN, f"train.workdir={workdir}", *overrides), log=said.append)
  return {r["step"]: r for r in records if "loss" in r}, "\n".join(said)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_latest_checkpoint_is_set_aside_and_the_one_before_resumed(tiny, tmp_path, first_run, damage):
  workdir = _copy(first_run, tmp_path / "run")
  for f in (workdir / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.parent.name == "d":  # the array data
      _flip_bytes(f) if damage == "flip" else f.write_bytes(f.read_bytes()[:20])
  with pytest.raises(checkpoint.CheckpointError, match=r"checkpoints/4 is damaged \(.*\); checkpoint.strict stops"):
    _train(tiny, workdir, "checkpoint.strict=true")
  assert _complete_steps(workdir) == [2, 4]  # nothing moved or deleted
  records, said = _train(tiny, workdir)
  assert re.search(r"warning: checkpoint \S+/checkpoints/4 is damaged \(.+\); trying the one before it", said), said
  assert "resumed from step 2" in said and "checkpoints-damaged/4" in said, said
  assert (workdir / "checkpoints-damaged" / "4" / "_CHECKPOINT_METADATA").is_file()  # kept for a post-mortem
  assert sorted(records) == [3, 4] and _complete_steps(workdir) == [2, 4]
  for step in (3, 4):
    _same_values(records[step], first_run[1][step])


def test_resume_order_rollback_restore_from_another_run_and_params_only(tiny, tmp_path, first_run):
  want = first_run[1]
  # A step of this run: roll back to it, set later steps aside; a relaunch does not roll back again.
  workdir = _copy(first_run, tmp_path / "a")
  records, said = _train(tiny, workdir, "checkpoint.restore_from=2")
  assert f"restored step 2 from {workdir / 'checkpoints' / '2'} (checkpoint.restore_from)" in said, said
  assert (workdir / "checkpoints-rolled-back" / "4").is_dir()
  for step in (3, 4):
    _same_values(records[step], want[step])
  _, said = _train(tiny, workdir, "checkpoint.restore_from=2", "train.steps=5")
  assert "checkpoint.restore_from=2 was applied before" in said and "resumed from step 4" in said, said
  records, said = _train(tiny, workdir, "checkpoint.restore_data=false", "train.steps=6")  # e.g. new data.sources
  assert "resumed from step 5" in said and "data position of step 5 not restored" in said, said
  assert sorted(records) == [6]

  # Another run's checkpoint: the whole state and the data position continue exactly.
  records, said = _train(tiny, tmp_path / "b", f"checkpoint.restore_from={first_run[0] / 'checkpoints' / '2'}")
  assert "restored step 2 from" in said, said
  for step in (3, 4):
    _same_values(records[step], want[step])
  with pytest.raises(checkpoint.CheckpointError, match=r"already holds checkpoints \(latest step 4 in .*\) of a run"):
    _train(tiny, tmp_path / "b", f"checkpoint.restore_from={first_run[0]}")

  # Parameters only: a new run from step 0. With a learning rate far below float32's resolution
  # of the weights and a still router bias, its checkpoint holds exactly the source's latest
  # parameters and router biases.
  params_only = [f"checkpoint.restore_from={first_run[0]}", "checkpoint.load_params_only=true"]
  still = ["optimizer.learning_rate=1e-30", "model.moe.bias_update_rate=0", "train.steps=2", "optimizer.weight_decay=0"]
  records, said = _train(tiny, tmp_path / "c", *params_only, *still)
  assert f"loaded parameters from {first_run[0] / 'checkpoints' / '4'}" in said, said
  assert sorted(records) == [1, 2]
  source = Checkpointer(first_run[0] / "checkpoints", read_only=True).run_record(4)["checksums"]
  new = Checkpointer(tmp_path / "c" / "checkpoints", read_only=True).run_record(2)
  assert new["origin"] == {"restore_from": str(first_run[0]), "params_only": True}
  model = [k for k in source if k.startswith(("params.", "router_bias."))]
  assert model and all(new["checksums"][k] == source[k] for k in model)
  assert new["checksums"]["step"] != source["step"]  # step 2 of the new run, not 4


def test_a_checkpoint_with_per_process_data_positions_resumes_its_model_with_a_note(tiny, tmp_path, first_run):
  """Checkpoints of mtp-jax before the global data order held one Grain position per process."""
  workdir = _copy(first_run, tmp_path / "run")
  step = workdir / "checkpoints" / "4"
  shutil.rmtree(step / "position")
  (step / "data").mkdir()
  (step / "data" / "process_0-of-1.json").write_text('{"next_index": 7}')
  records, said = _train(tiny, workdir, "train.steps=5")
  assert "resumed from step 4" in said, said
  assert "note: checkpoint step 4 holds per-process data positions from an older mtp-jax" in said, said
  assert sorted(records) == [5]
  # A position of another data stream is refused in one line, and nothing is set aside.
  workdir = _copy(first_run, tmp_path / "other")
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"checkpoints/4: the saved data position does not fit this data config \(it was saved with seq_len 16, "
    r"this run has 12\); restore with the data config it was saved with, or checkpoint.restore_data=false$",
  ):
    _train(tiny, workdir, "train.steps=5", "data.seq_len=12")
  assert _complete_steps(workdir) == [2, 4]


def test_a_checkpoint_of_other_shapes_is_refused_naming_the_array(tiny, tmp_path, first_run):
  workdir = _copy(first_run, tmp_path / "run")
  with pytest.raises(
    checkpoint.CheckpointError,
    match=r"checkpoints/4 does not fit this config: params\.embed\.table has shape \(320, 32\) there, "
    r"\(320, 48\) here",
  ):
    _train(tiny, workdir, "model.d_model=48", "train.steps=6")
  with pytest.raises(checkpoint.CheckpointError, match=r"has no params\.mtp\.1\.\S+, which this config needs \(shape"):
    _train(tiny, workdir, "model.mtp.depth=2", "train.steps=6")
  with pytest.raises(checkpoint.CheckpointError, match=r"it has params\.mtp\.0\.\S+ \(shape .*\), which this config"):
    _train(tiny, workdir, "model.mtp.depth=0", "train.steps=6")
  assert _complete_steps(workdir) == [2, 4]


# ----------------------------------------------------------------------------- the non-finite guard


def test_a_nan_step_is_skipped_leaving_the_state_as_it_was(tiny):
  program = build(tiny("train.inject_nan_at_steps=[2]", "mesh.data=1"), jax.devices()[:1])
  from mtp_jax import data

  cfg = program.cfg
  batch = next(iter(data.make_dataset(cfg.data, batch_size=cfg.train.batch_size, seed=0)))
  batch = {k: jax.device_put(v, program.batch_sharding) for k, v in batch.items()}
  state, m1 = program.step(program.init_state(), batch)
  after_one = jax.device_get(state)
  state, m2 = program.step(state, batch)
  assert float(m1["update_skipped"]) == 0 and float(m2["update_skipped"]) == 1 and np.isnan(float(m2["loss"]))
  assert int(state.step) == 2 and int(state.skipped_steps) == 1 and int(state.bad_streak) == 1
  for part in ("params", "router_bias", "opt_state"):
    a, b = checkpoint.named_leaves(getattr(after_one, part)), checkpoint.named_leaves(getattr(state, part))
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], np.asarray(b[k]), err_msg=f"{part}.{k}")
  state, m3 = program.step(state, batch)  # and the next good step goes on from there
  assert float(m3["update_skipped"]) == 0 and int(state.bad_streak) == 0 and int(state.skipped_steps) == 1


def test_too_many_bad_steps_in_a_row_stop_the_run_naming_them(tiny, tmp_path):
  cfg = tiny(
    f"train.workdir={tmp_path}",
    "train.steps=10",
    "train.log_every=1",
    "checkpoint.every=2",
    "train.inject_nan_at_steps=[3, 5, 6, 7]",
    "train.max_bad_steps=3",
  )
  with pytest.raises(
    loop.TrainingError,
    match=r"steps 5-7: 3 updates in a row skipped .* the state is still that of step 4, and checkpoint step 6 in",
  ):
    loop.train(cfg, log=lambda *_: None)
  records = {r["step"]: r for r in _records(tmp_path) if "loss" in r}
  assert [s for s, r in records.items() if r["update_skipped"]] == [3, 5, 6, 7]
  assert records[7]["skipped_steps"] == 4 and records[7]["bad_streak"] == 3 and records[7]["loss"] is None
  assert _complete_steps(tmp_path) == [2, 4, 6]
  # Step 6 was saved mid-streak: it holds step 4's parameters, with the data moved on.
  ckpt = Checkpointer(tmp_path / "checkpoints", read_only=True)
  sums = [ckpt.run_record(s)["checksums"] for s in (4, 6)]
  assert all(sums[0][k] == sums[1][k] for k in sums[0] if k.startswith(("params.", "opt_state.", "router_bias.")))


# ----------------------------------------------------------------------------- two hosts

_HOST = """
import json, os, sys
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from mtp_jax import config
from mtp_jax.train import loop
loop.train(config.load(None, json.loads(sys.argv[3])))
jax.distributed.shutdown()
"""


def test_sigterm_to_one_host_stops_both_at_one_step_and_one_host_resumes(tiny, tmp_path):
  """JAX's preemption sync: the notice reaches one process, both save the same step and exit 0.
  Then a single process (8 devices instead of 2 processes of 1) resumes the model state."""
  import socket

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  run = ["train.steps=1000", "train.log_every=1", "checkpoint.every=1000", f"train.workdir={tmp_path}"]
  env = child_env(PYTHONUNBUFFERED="1")  # one CPU device per process
  logs = [tmp_path / f"host{i}.txt" for i in range(2)]
  procs = []
  for i in range(2):
    with open(logs[i], "w") as out:
      argv = [sys.executable, "-c", _HOST, str(port), str(i), json.dumps([*TINY, *run])]
      procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env))
  try:
    _wait_for(procs[0], lambda: len(_records(tmp_path)) >= 3, poll=0.05)
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=120) for p in procs]
  finally:
    for p in procs:
      p.kill()
  outs = [log.read_text() for log in logs]
  assert codes == [0, 0], outs[1][-3000:]
  steps = [re.findall(r"preempted at step (\d+): saved checkpoint step \1", out) for out in outs]
  assert len(steps[0]) == 1 and steps[1] == [], steps  # only process 0 logs; both saved (below)
  step = int(steps[0][0])
  assert (tmp_path / "checkpoints" / str(step) / "position").is_dir()  # one global data position

  said = []
  records = loop.train(tiny(*run[1:], f"train.steps={step + 1}"), log=said.append)
  said = "\n".join(said)
  assert f"resumed from step {step}" in said and "data order" not in said, said  # the data position too
  assert [r["step"] for r in records if "loss" in r] == [step + 1]


def test_mtp_train_names_a_bad_restore_from_in_one_line(tmp_path, first_run):
  cmd = [sys.executable, "-m", "mtp_jax.cli", *TINY, f"train.workdir={tmp_path}"]
  out = subprocess.run([*cmd, f"checkpoint.restore_from={tmp_path / 'nope'}"], capture_output=True, text=True)
  assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
  assert out.stderr.startswith(f"mtp-train: checkpoint.restore_from: {tmp_path / 'nope'}: no such file"), out.stderr
  other_shapes = [f"checkpoint.restore_from={first_run[0]}", "model.d_model=48"]  # read through Orbax, quietly
  out = subprocess.run([*cmd, *other_shapes], capture_output=True, text=True)
  assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
  assert "does not fit this config: params.embed.table has shape (320, 32) there" in out.stderr, out.stderr
  out = subprocess.run([*cmd, "checkpoint.load_params_only=true"], capture_output=True, text=True)
  assert out.returncode == 2 and "checkpoint.load_params_only: needs checkpoint.restore_from" in out.stderr
