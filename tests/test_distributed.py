"""Several processes: launch/local.sh, equality with one process, resharded restore, dead peers."""

import json
import os
import pathlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import yaml
from conftest import TINY, child_env

from mtp_jax import config, data, distributed
from mtp_jax.export import source
from mtp_jax.train import checkpoint, loop
from mtp_jax.train.checkpoint import Checkpointer
from mtp_jax.train.program import build

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ["train.steps=3", "train.log_every=1", "checkpoint.every=3", "train.eval_every=0"]


def _losses(workdir) -> dict[int, float]:
  """From the complete lines of metrics.jsonl (a running process may be halfway through one)."""
  text = (pathlib.Path(workdir) / "metrics.jsonl").read_text()
  lines = text[: text.rfind("\n") + 1].splitlines()
  return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def _quiet(*_) -> None:
  pass


def _env() -> dict[str, str]:
  # Each process gets its own device count; launch/local.sh runs this interpreter, not the PATH's
  # `python` (under another venv's pytest that mixed JAX versions, whose losses differ).
  return child_env(PYTHONUNBUFFERED="1", PYTHON=sys.executable)


def _port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(processes: int, devices: int, workdir, *overrides) -> str:
  """Runs launch/local.sh and returns what process 0 printed."""
  cmd = [str(ROOT / "launch" / "local.sh"), str(processes), str(devices), *TINY, *overrides]
  out = subprocess.run([*cmd, f"train.workdir={workdir}"], capture_output=True, text=True, env=_env(), timeout=600)
  logs = "".join(p.read_text()[-1500:] for p in sorted((pathlib.Path(workdir) / "logs").glob("*.log")))
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:] + logs
  return out.stdout


def _pieces(stream, batches: int, batch_size: int) -> Counter:
  """The document pieces (source, document, first token, end) of the stream's next batches."""
  rows = [stream.next_row() for _ in range(batch_size * batches)]
  return Counter((s, int(stream.sources[s].order[k]), a, b) for s, pieces in rows for k, a, b in pieces)


def test_two_processes_train_like_one_and_resume_in_one_on_another_mesh(tiny, tmp_path):
  """Global batch n is a pure function of (seed, n). 2 processes x 4 CPU devices (gloo), data over
  the two processes (DCN) and fsdp x expert inside each, 2 microbatches summed by each process's
  replica and added over DCN once a step, give the losses of one process with the same axes on
  8 devices. The checkpoint they write together restores in one process on another
  mesh equal to the one-process run's, mtp-export's reader reads it, and training resumed from it
  goes on with the uninterrupted run's losses and documents. (Four processes assembling and
  resuming the global batches: tests/test_data.py.)"""
  run = [
    "train.log_every=1",
    "checkpoint.every=3",
    "train.eval_every=0",
    "train.batch_size=16",
    "train.grad_accum_steps=2",
  ]
  # Experts through the shard_map all-to-all, with room for every token (factor E / K).
  axes = ["mesh.fsdp=2", "mesh.expert=2", "model.moe.mode=capacity", "model.moe.capacity_factor=4"]
  ref = tmp_path / "ref"
  records = loop.train(tiny(*run, *axes, "mesh.data=2", "train.steps=6", f"train.workdir={ref}"), log=_quiet)
  want = {r["step"]: r["loss"] for r in records if "loss" in r}
  assert sorted(want) == [1, 2, 3, 4, 5, 6]

  multi = tmp_path / "multi"
  stdout = _launch(2, 4, multi, *run, *axes, "mesh.data=1", "mesh.dcn.data=2", "train.steps=3")
  assert "mesh {'data': 2, 'fsdp': 2, 'sequence': 1, 'expert': 2, 'tensor': 1}" in stdout
  assert "experts via all_to_all" in stdout
  assert stdout.count("step 3: loss") == 1, "only process 0 logs"
  assert "step 3: loss" not in (multi / "logs" / "process_1.log").read_text()
  got = _losses(multi)
  assert sorted(got) == [1, 2, 3]
  np.testing.assert_allclose([got[s] for s in (1, 2, 3)], [want[s] for s in (1, 2, 3)], rtol=2e-6)

  other = tiny(*run, "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "train.steps=6", f"train.workdir={multi}")
  target = build(other).abstract_state
  restored, alone = (Checkpointer(r / "checkpoints", read_only=True).restore(3, target)[0] for r in (multi, ref))
  w = restored.params["layers"][1]["ffn"]["experts"]["w_gate"][...]
  assert len(w.sharding.device_set) == 8 and "tensor" in w.sharding.spec  # really on the new mesh
  got, want_state = checkpoint.named_leaves(restored), checkpoint.named_leaves(alone)
  assert got.keys() == want_state.keys()
  for k in want_state:
    np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want_state[k]), rtol=1e-5, atol=1e-7, err_msg=k)
  # mtp-export's reader takes the checkpoint both processes wrote one array, or one block of a
  # stack, at a time, each checked against its checksum: the parameters and router biases are
  # those restored above.
  leaves = source.abstract_leaves(other)
  reader = source.Reader(source.locate(str(multi)), leaves)
  try:
    for name, leaf in leaves.items():
      np.testing.assert_array_equal(reader.read([(name, None)])[name, None], np.asarray(got[name]), err_msg=name)
      if ".layers." in name:
        blocks = reader.read([(name, j) for j in range(leaf.shape[0])])
        np.testing.assert_array_equal(np.stack(list(blocks.values())), np.asarray(got[name]), err_msg=name)
  finally:
    reader.close()

  said = []  # saved on 2 processes, resumed on 1 with another mesh
  records = loop.train(other, log=said.append)
  assert "resumed from step 3" in "\n".join(said) and "data order" not in "\n".join(said), said
  np.testing.assert_allclose([r["loss"] for r in records if "loss" in r], [want[s] for s in (4, 5, 6)], rtol=1e-5)

  # The saved positions are global and equal; from them the documents go on, none twice, none skipped.
  position = {r: Checkpointer(r / "checkpoints", read_only=True).data_position for r in (ref, multi)}
  assert position[multi](3) == position[ref](3) and position[multi](6) == position[ref](6)
  cfg = other.data
  sources = data.open_sources(cfg)

  def fresh():
    return data.Stream(cfg, sources, seed=0, shuffle=cfg.shuffle, repeat=True)

  size = other.train.batch_size
  whole, resumed = _pieces(fresh(), 6, size), fresh()
  first = _pieces(resumed, 3, size)
  resumed.set_state(position[multi](3))
  assert first + _pieces(resumed, 3, size) == whole and set(whole.values()) == {1}


def test_a_stopped_process_makes_the_other_fail_in_bounded_time(tmp_path):
  """A peer that hangs (SIGSTOP: alive, sockets open, no progress) would block the others in
  a collective forever; the watchdog stops them with one line within peer_timeout_s."""
  port, timeout = _port(), 8
  run = [*TINY, "train.steps=10000", "train.log_every=1", "checkpoint.enabled=false", f"train.workdir={tmp_path}"]
  env = {**_env(), "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
  procs, logs = [], [tmp_path / f"p{i}.txt" for i in range(2)]
  for i in range(2):
    join = [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2"]
    args = [*run, *join, f"distributed.process_id={i}", f"distributed.peer_timeout_s={timeout}"]
    with open(logs[i], "w") as out:
      procs.append(subprocess.Popen([sys.executable, "-m", "mtp_jax.cli", *args], stdout=out, stderr=out, env=env))
  try:
    deadline = time.monotonic() + 300
    while not (tmp_path / "metrics.jsonl").exists() or len(_losses(tmp_path)) < 2:
      assert procs[0].poll() is None and time.monotonic() < deadline, logs[0].read_text()[-3000:]
      time.sleep(0.2)
    procs[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    code = procs[0].wait(timeout=timeout + 30)
    waited = time.monotonic() - stopped
  finally:
    for p in procs:
      p.kill()
  lines = [line for line in logs[0].read_text().splitlines() if line.startswith("mtp-train:")]
  assert code == 1 and len(lines) == 1, logs[0].read_text()[-3000:]
  assert lines[0].startswith("mtp-train: process 0/2: process 1 has sent no heartbeat for"), lines
  assert "Traceback" not in logs[0].read_text()
  # Not before the peer was silent for the timeout (its last heartbeat may predate the SIGSTOP on a
  # loaded machine, so that is counted from the heartbeat), and soon after.
  silent = float(re.search(r"no heartbeat for (\d+)s", lines[0]).group(1))
  assert silent >= timeout and waited <= timeout + 15, (silent, waited)


def test_the_step_watchdog_ends_a_stuck_process_with_one_line():
  code = "import time; from mtp_jax.distributed import Watchdog; w = Watchdog(0.5, 0); w.beat(7); time.sleep(30)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert out.returncode == 1
  assert out.stderr.startswith("mtp-train: no step finished for "), out.stderr
  assert "after step 7 (distributed.step_timeout_s=0.5)" in out.stderr and out.stderr.count("\n") == 1


def test_a_single_process_starts_no_distributed_runtime(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_MCA_orte_hnp_uri", "KUBERNETES_SERVICE_HOST"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.initialize(config.load(None).distributed) is False
  assert distributed.initialize(config.load(None, ["distributed.initialize=never"]).distributed) is False


@pytest.mark.parametrize(
  "args, status, message",
  [
    (  # nothing listens there: the run cannot start (1), though nothing in the config is wrong
      [
        "distributed.coordinator_address=127.0.0.1:1",
        "distributed.num_processes=2",
        "distributed.process_id=1",
        "distributed.initialization_timeout_s=1",
      ],
      1,
      "mtp-train: distributed: could not join the job: ",
    ),
    (
      ["distributed.num_processes=2", "distributed.process_id=2"],
      2,
      "mtp-train: config error: distributed.process_id: 2 is not below distributed.num_processes (2)",
    ),
  ],
)
def test_joining_problems_are_one_line(args, status, message):
  env = {**_env(), "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "mtp_jax.cli", *TINY, *args], capture_output=True, text=True, env=env)
  assert out.returncode == status and out.stderr.startswith(message) and out.stderr.count("\n") == 1, out.stderr


# ----------------------------------------------------------------------------- launchers

LAUNCH = ROOT / "launch"


@pytest.mark.parametrize("script", ["local.sh", "tpu_pod.sh", "gke.sh", "slurm.sbatch"])
def test_launchers_parse_and_name_their_usage_in_one_line(script):
  assert subprocess.run(["bash", "-n", LAUNCH / script]).returncode == 0
  out = subprocess.run(["bash", LAUNCH / script], capture_output=True, text=True)
  assert out.returncode == 2 and out.stderr.startswith("usage: ") and out.stderr.count("\n") == 1, out.stderr


def test_tpu_pod_runs_the_same_quoted_command_on_every_worker():
  env = {**os.environ, "MTP_DRY_RUN": "1", "MTP_PROJECT": "p"}
  args = ["my-tpu", "us-east5-a", "--config", "configs/tiny.yaml", "train.workdir=/mnt/a b"]
  out = subprocess.run(["bash", LAUNCH / "tpu_pod.sh", *args], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr
  argv = shlex.split(out.stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
  assert "--worker=all" in argv and argv[argv.index("--project") + 1] == "p"
  remote = shlex.split(argv[argv.index("--command") + 1])
  assert remote[-4:] == ["mtp_jax.cli", "--config", "configs/tiny.yaml", "train.workdir=/mnt/a b"]


def test_gke_manifest_has_one_pod_per_host_of_the_slice():
  env = {**os.environ, "MTP_DRY_RUN": "1"}
  args = ["dsv3", "img:1", "v5p-256", "--config", "configs/deepseek-v3-671b.yaml", "train.workdir=/mnt/shared/x"]
  out = subprocess.run(["bash", LAUNCH / "gke.sh", *args], capture_output=True, text=True, env=env)
  assert out.returncode == 0, out.stderr
  job = yaml.safe_load(out.stdout)["spec"]["replicatedJobs"][0]["template"]["spec"]
  pod = job["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 32  # 128 chips, 4 per host
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4x8"
  assert pod["containers"][0]["args"] == args[3:]
  bad = subprocess.run(["bash", LAUNCH / "gke.sh", "a", "b", "v5p-12", "--config", "x"], capture_output=True, text=True)
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1
  assert "no standard v5p slice has 12 TensorCores" in bad.stderr
