"""Eight fake CPU devices (set before JAX is imported) so sharded code runs in CI."""

import atexit
import functools
import gc
import importlib.util
import os
import re
import shutil
import tempfile

# The tests compile many tiny programs and run each for a few steps. At XLA's backend
# optimisation level 0 a tiny train step compiles in 3.5 s instead of 5.4 s and its initialiser
# in 2.3 s instead of 5.6 s, and each step runs in 20 ms instead of 12 ms (measured on the 2-core
# VM). The level changes float results in their last bits, so a test that compares against a
# subprocess must hand it the same level: build the subprocess's environment with `child_env`.
# Each process computes on one thread (no Eigen thread pool): the tiny programs gain nothing from
# one, and with two xdist workers and the runs they start on 2 cores its threads only contend
# (tests/test_step_equivalence.py alone: 126 s with the pool, 119 s without).
# XLA:CPU's elemental emitters instead of its MLIR fusion emitters: backend compiles are most of
# the suite's time, and a tiny train step compiles in 2.0 s instead of 3.5 s (8 devices: 2.9 s
# instead of 4.1 s), its initialiser in 1.8 s instead of 2.1 s; configs/tiny.yaml's step runs 8%
# slower (0.63 s, 0.58 s). The suite: 422 s instead of 607-643 s (benchmarks/RESULTS.md).


def _xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA takes `flag` (an unknown flag in XLA_FLAGS aborts the process, and
  XLA drops flags like this one when the older path goes: jaxlib 0.11 did). Asked of XLA itself,
  in a child process (2 s; xdist's workers inherit a yes with the flag and ask again after a no);
  the flag's name among jaxlib's bytes is no answer, as 0.11 keeps it as a reserved name in a
  proto descriptor."""
  import subprocess
  import sys

  env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
  return (
    subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True).returncode == 0
  )


_FLAGS = ["--xla_backend_optimization_level=0", "--xla_cpu_multi_thread_eigen=false"]
_FLAGS += ["--xla_cpu_use_fusion_emitters=false", "--xla_force_host_platform_device_count=8"]
# Each flag once: xdist's workers inherit the flags the controller set (and then ask XLA nothing).
_missing = [f for f in _FLAGS if f not in os.environ.get("XLA_FLAGS", "").split()]
if "--xla_cpu_use_fusion_emitters=false" in _missing and not _xla_accepts("--xla_cpu_use_fusion_emitters=false"):
  _missing.remove("--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_missing]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the session, shared with the subprocesses the tests start: the
# same tiny programs are compiled by many tests, and each compile costs seconds on 2 cores.
# The process that makes it (pytest's controller, which outlives its workers) removes it at exit:
# it holds ~100 MB after a run, and every run makes a new one.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mtp-jax-test-xla-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from array_record.python.array_record_module import ArrayRecordWriter  # noqa: E402
from flax import nnx  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")  # catch silent broadcasting bugs
# Orbax saves a replicated array replica-parallel (each device's copy writes a slice) except on
# GPU. On the 8 fake CPU devices every copy is already in host memory, so that only adds a slicing
# op per device and shape: the first save of the tests' model takes 5.7 s instead of 1.0 s, later
# ones 0.55 s instead of 0.2 s. Here in the test process each array is written from one copy;
# the runs the tests start as subprocesses (launch/local.sh, mtp-train) keep Orbax's default.
_arrays = ocp.type_handlers.get_type_handler(jax.Array)
if hasattr(_arrays, "_use_replica_parallel"):  # Orbax 0.12's name; a speed setting, so no error elsewhere
  _arrays._use_replica_parallel = False

from mtp_jax import config  # noqa: E402
from mtp_jax.data import manifest  # noqa: E402

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="libtpu is not installed (pip install 'mtp-jax[tpu-aot]'): no TPU topology to compile for",
)

# A tiny model shared by the unit tests: small enough that each compile takes seconds.
TINY = [
  "model.vocab_size=320",
  "model.d_model=32",
  "model.num_layers=2",
  "model.first_k_dense=1",
  "model.d_ff=64",
  "model.attention.num_heads=4",
  "model.attention.num_kv_heads=2",
  "model.attention.head_dim=8",
  "model.attention.kv_lora_rank=16",
  "model.attention.qk_nope_head_dim=8",
  "model.attention.qk_rope_head_dim=4",
  "model.attention.v_head_dim=8",
  "model.moe.num_experts=8",
  "model.moe.top_k=2",
  "model.moe.expert_d_ff=16",
  "data.seq_len=16",
  "train.batch_size=8",
  "train.progress_bar=false",
]


# The longest test files, longest first (`--durations=0`, summed per file): xdist's loadfile
# scheduling hands files out in collection order, so these start first and the many short files
# fill in at the end instead of leaving one worker alone with a long file.
_LONGEST_FIRST = (
  "test_checkpoint.py",
  "test_step_equivalence.py",
  "test_train.py",
  "test_compile.py",
  "test_distributed.py",
  "test_import.py",
  "test_speculative.py",
  "test_gcs.py",
  "test_export.py",
  "test_data.py",
  "test_generate_cli.py",
  "test_export_qwen3.py",
  "test_trainable.py",
  "test_expert_parallel.py",
  "test_attention_kernels.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# Python's cyclic garbage collector runs between test files, not during them. A worker ends holding
# about 2 million objects (JAX's tracing and compilation caches), and every automatic full
# collection walked them all: 29 s of each worker's 10 minutes. At the end pytest collects five
# times more (1.2-1.5 s each), past the 5 s after which execnet sends its busy worker a SIGINT:
# the KeyboardInterrupt "ignored in _xla_gc_callback" printed at the end of every run. Between
# files: one collection of what the file left, then gc.freeze() moves the survivors where no later
# collection looks (benchmarks/RESULTS.md, 2026-12-06, second). Garbage is still freed by
# reference counting at once; cycles wait for the file's end.
@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  gc.disable()  # in the processes that run tests (not xdist's controller)
  result = yield
  if nextitem is None or nextitem.path != item.path:
    gc.collect()
    gc.freeze()
  return result


def child_env(**overrides: str) -> dict[str, str]:
  """This process's environment for a subprocess: the same XLA options without the 8 fake
  devices (a child takes one CPU device, or the count it is told), plus `overrides`."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = re.sub(r"\s*--xla_force_host_platform_device_count=\d+", "", env["XLA_FLAGS"]).strip()
  return {**env, **overrides}


def tiny_config(*overrides: str) -> config.Config:
  return config.load(None, [*TINY, *overrides])


@pytest.fixture
def tiny():
  return tiny_config


def write_dataset(path, docs, *, vocab_size=1000, eos_id=999, eval_docs=(), kind="bytes", sha=None) -> str:
  """A prepared dataset written directly through the format module (independent of mtp-prepare)."""
  os.makedirs(path)
  dtype = manifest.token_dtype(vocab_size)
  splits = {}
  for split, split_docs in [("train", docs), ("eval", eval_docs)]:
    if not len(split_docs):
      continue
    os.makedirs(os.path.join(path, split))
    shard = f"{split}/shard-00000.arrayrecord"
    writer = ArrayRecordWriter(os.path.join(path, shard), "group_size:1")
    for d in split_docs:
      writer.write(manifest.encode_record(d, dtype))
    writer.close()
    lengths = np.array([len(d) for d in split_docs], np.int64)
    np.save(os.path.join(path, split, "lengths.npy"), lengths)
    n, tokens = len(split_docs), int(lengths.sum())
    splits[split] = manifest.Split(
      documents=n,
      tokens=tokens,
      max_document_tokens=int(lengths.max()),
      shards=[manifest.Shard(path=shard, documents=n, tokens=tokens)],
      lengths=f"{split}/lengths.npy",
    )
  tok = manifest.TokenizerInfo(
    kind=kind, path=None if kind == "bytes" else "/t/tokenizer.json", sha256=sha, vocab_size=vocab_size, eos_id=eos_id
  )
  manifest.Manifest(tokenizer=tok, token_dtype=dtype, splits=splits, sources=[]).write(path)
  return str(path)


# The metrics that say two runs took the same steps.
STEP_KEYS = ("loss", "ntp_loss", "mtp_loss_1", "mtp_loss_2", "balance_loss", "grad_norm", "expert_load_max_over_mean")


def fixed_batch(cfg: config.Config) -> dict:
  """The first batch of the config's data, the same every call."""
  from mtp_jax import data

  return next(iter(data.make_dataset(cfg.data, batch_size=cfg.train.batch_size, seed=0)))


@functools.partial(jax.jit, static_argnums=0)
def forward_logits(graphdef, states, tokens_BxL):
  """Every depth's logits, [depths + 1, B, L, V], of the model `nnx.merge(graphdef, *states)` with
  one document a row: one compiled program (for each graphdef and shape), not one for each op."""
  model, ones = nnx.merge(graphdef, *states), jnp.ones_like(tokens_BxL)
  return jnp.stack([model.logits(h) for h in model(tokens_BxL, ones, jnp.cumsum(ones, 1) - 1).hidden])


def run_steps(cfg: config.Config, steps: int = 3, devices=None):
  """Metrics of each of `steps` train steps on one fixed batch, and the final state."""
  from mtp_jax.train.program import build

  program = build(cfg, devices)
  state = program.init_state()
  batch = {k: jax.device_put(v, program.batch_sharding) for k, v in fixed_batch(cfg).items()}
  history = []
  for _ in range(steps):
    state, metrics = program.step(state, batch)
    history.append(jax.device_get(metrics))
  return history, state
