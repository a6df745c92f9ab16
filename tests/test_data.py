"""The input pipeline: packing, exactly-once epochs, one global stream read by host rows, mixtures, resume, bad data."""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
from collections import Counter

import numpy as np
import pytest
from conftest import child_env, write_dataset

from mtp_jax import data
from mtp_jax.config import ConfigError, DataConfig, ModelConfig, load
from mtp_jax.data import stdlib

SEQ_LEN = 64
NUM_DOCS = 20


def _cfg(**kw) -> DataConfig:
  return DataConfig(**{"seq_len": SEQ_LEN, "shuffle": True, "prefetch": 0, **kw})


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def _segments(row_or_batch):
  """Each segment's tokens, row by row, in order."""
  tokens, seg = np.atleast_2d(row_or_batch["tokens"]), np.atleast_2d(row_or_batch["segment_ids"])
  for t, s in zip(tokens, seg, strict=True):
    for i in np.unique(s[s > 0]):
      yield t[s == i]


def _pieces(docs, seq_len=SEQ_LEN) -> Counter:
  """first_fit's legal segments: piece k of a document is doc[k*L:(k+1)*L]."""
  return Counter(d[i : i + seq_len].tobytes() for d in docs for i in range(0, len(d), seq_len))


def _docs(rng, n, lo, hi, eos=999, min_len=3, max_len=150):
  """n documents of random ids in [lo, hi) ending in `eos`, each starting with a unique pair."""
  out = []
  for i in range(n):
    body = rng.integers(lo, hi, rng.integers(min_len, max_len))
    out.append(np.concatenate([[lo + i // (hi - lo), lo + i % (hi - lo)], body, [eos]]).astype(np.int32))
  return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Two prepared datasets with disjoint token ranges, and their documents."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("data")
  a, b = _docs(rng, 37, 0, 500), _docs(rng, 23, 500, 998)
  a_eval = _docs(rng, 5, 0, 500)
  return {
    "a": write_dataset(root / "a", a, eval_docs=a_eval),
    "b": write_dataset(root / "b", b),
    "a_docs": a,
    "b_docs": b,
    "a_eval": a_eval,
  }


def _one_epoch(cfg, **kw) -> list[dict[str, np.ndarray]]:
  return list(data.rows(cfg, data.open_sources(cfg), seed=0, repeat=False, **kw))


def test_stdlib_batches_have_shapes_and_dtypes():
  ds = data.make_dataset(_cfg(max_documents=NUM_DOCS), batch_size=8, seed=0, rows=range(4, 8))
  batch = next(iter(ds))
  assert set(batch) == {"tokens", "segment_ids", "positions"}
  for v in batch.values():
    assert v.shape == (4, SEQ_LEN) and v.dtype == np.int32
  assert batch["tokens"].min() >= 0 and batch["tokens"].max() <= data.EOS_ID
  with pytest.raises(ValueError, match="not indices into a batch of 6"):
    data.make_dataset(_cfg(), batch_size=6, seed=0, rows=[5, 6])


def test_stdlib_eval_split_is_held_out():
  train, held = stdlib.split_files("train"), stdlib.split_files("eval")
  assert held and not set(train) & set(held) and sorted(train + held) == sorted(stdlib.list_files())


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_segment_ids_and_positions_follow_the_documents(corpus, packing):
  rows = _one_epoch(_cfg(sources=[{"path": corpus["a"]}], packing=packing))
  for row in rows:
    tokens, seg, pos = row["tokens"], row["segment_ids"], row["positions"]
    pad = seg == 0
    assert not tokens[pad].any() and not pos[pad].any()
    real = seg[~pad]
    assert real[0] == 1 and set(np.diff(real)) <= {0, 1}  # documents numbered 1, 2, 3, ...
    assert not pad[: len(real)].any()  # padding only at the end of the row
    for i in np.unique(real):  # positions count 0, 1, ... within each segment
      np.testing.assert_array_equal(pos[seg == i], np.arange((seg == i).sum()))
    # A target never crosses a document: an EOS can only end a segment.
    for segment in _segments(row):
      assert 999 not in segment[:-1]


def test_first_fit_segments_are_pieces_and_each_appears_once_per_epoch(corpus):
  rows = _one_epoch(_cfg(sources=[{"path": corpus["a"]}]))
  seen = Counter(s.tobytes() for r in rows for s in _segments(r))
  assert seen == _pieces(corpus["a_docs"])
  assert np.mean([(r["segment_ids"] > 0).mean() for r in rows]) > 0.8  # rows are mostly full


def test_concat_lays_documents_end_to_end_exactly_once(corpus):
  rows = _one_epoch(_cfg(sources=[{"path": corpus["a"]}], packing="concat", shuffle=False))
  stream = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
  np.testing.assert_array_equal(stream, np.concatenate(corpus["a_docs"]))
  assert all((r["segment_ids"] > 0).all() for r in rows[:-1])  # no padding but the last row's


class _Recording:
  """A source's documents, noting which are read."""

  def __init__(self, documents):
    self.documents, self.read = documents, set()

  def __getitem__(self, i):
    self.read.add(int(i))
    return self.documents[i]


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_a_host_gets_its_rows_of_the_global_batch_and_reads_only_their_documents(corpus, packing):
  cfg = _cfg(sources=[{"path": corpus["a"], "weight": 2}, {"path": corpus["b"], "weight": 1}], packing=packing)
  whole = _take(iter(data.make_dataset(cfg, batch_size=8, seed=0)), 3)
  # Where each row's documents come from: the plan, which every host computes alone.
  plan = data.Stream(cfg, data.open_sources(cfg), seed=0, shuffle=True, repeat=True)
  rows = [plan.next_row() for _ in range(24)]
  needs = [{(s, int(plan.sources[s].order[k])) for k, _, _ in pieces} for s, pieces in rows]
  hosts = [[0, 1, 2], [3, 7], [4, 5, 6]]  # any rows, in any grouping: a host feeds its devices' rows
  read = set()
  for mine in hosts:
    sources = data.open_sources(cfg)
    notes = [_Recording(src.documents) for src in sources]
    sources = [dataclasses.replace(src, documents=n) for src, n in zip(sources, notes, strict=True)]
    got = _take(iter(data.make_dataset(cfg, batch_size=8, seed=0, rows=mine, sources=sources)), 3)
    for want, have in zip(whole, got, strict=True):
      for k in want:
        np.testing.assert_array_equal(want[k][mine], have[k])
    mine_docs = set().union(*(needs[8 * b + r] for b in range(3) for r in mine))
    assert {(s, d) for s, n in enumerate(notes) for d in n.read} == mine_docs  # its rows' documents, no others
    read |= mine_docs
  assert read == set().union(*needs)


def test_every_document_once_in_each_epoch_and_each_epoch_in_its_own_order(corpus):
  cfg = _cfg(sources=[{"path": corpus["a"]}], packing="concat")
  n = len(corpus["a_docs"])
  stream = np.concatenate([r["tokens"] for r in _take(data.rows(cfg, data.open_sources(cfg), seed=0), 120)])
  docs = [d.tobytes() for d in np.split(stream, np.flatnonzero(stream == 999) + 1)]
  first, second = docs[:n], docs[n : 2 * n]
  everything = sorted(d.tobytes() for d in corpus["a_docs"])
  assert sorted(first) == everything and sorted(second) == everything and first != second
  again = np.concatenate([r["tokens"] for r in _take(data.rows(cfg, data.open_sources(cfg), seed=1), 120)])
  assert not np.array_equal(stream, again)  # the seed decides the order


@pytest.mark.parametrize("packing", ["first_fit", "concat"])
def test_mixture_honours_the_weights(corpus, packing):
  cfg = _cfg(sources=[{"path": corpus["a"], "weight": 3}, {"path": corpus["b"], "weight": 1}], packing=packing)
  batches = _take(iter(data.make_dataset(cfg, batch_size=8, seed=0)), 50)  # 400 rows
  bodies = [t[(s > 0) & (t != 999)] for b in batches for t, s in zip(b["tokens"], b["segment_ids"], strict=True)]
  rows_from_a, rows_from_b = [(t < 500).all() for t in bodies], [(t >= 500).all() for t in bodies]
  assert all(x != y for x, y in zip(rows_from_a, rows_from_b, strict=True))  # a row comes from one source
  share = np.mean(rows_from_a)
  # Grain interleaves deterministically by the integer proportions: 300 of 400 rows, up to rounding.
  assert abs(share - 0.75) < 0.01, share


@pytest.mark.parametrize(
  "overrides",
  [{}, {"prefetch": 2}, {"packing": "concat"}, {"workers": 1}],
  ids=["plain", "thread-prefetch", "concat", "reader-threads"],
)
def test_mid_epoch_resume_yields_the_same_next_batches(corpus, overrides):
  cfg = _cfg(sources=[{"path": corpus["a"], "weight": 2}, {"path": corpus["b"], "weight": 1}], **overrides)
  it = iter(data.make_dataset(cfg, batch_size=4, seed=0))
  _take(it, 7)  # mid-epoch, mid packing group: ~4 epochs of source b pass below
  state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
  expected = _take(it, 40)
  it.close()
  restored = iter(data.make_dataset(cfg, batch_size=4, seed=0, rows=[1, 3]))  # another host's rows
  restored.set_state(state)
  for want, got in zip(expected, _take(restored, 40), strict=True):
    for k in want:
      np.testing.assert_array_equal(want[k][[1, 3]], got[k])
  # The position counts rows, not batches: a run resumed with half the batch size goes on with
  # the same rows, two batches for one.
  halves = iter(data.make_dataset(cfg, batch_size=2, seed=0))
  halves.set_state(state)
  for want in expected[:10]:
    got = _take(halves, 2)
    for k in want:
      np.testing.assert_array_equal(want[k], np.concatenate([g[k] for g in got]))
  restored.close()
  halves.close()


def test_a_position_from_another_data_config_is_refused(corpus):
  cfg = _cfg(sources=[{"path": corpus["a"]}])
  it = iter(data.make_dataset(cfg, batch_size=4, seed=0))
  next(it)
  state = it.get_state()
  for other, message in [
    (
      _cfg(sources=[{"path": corpus["b"]}]),
      r"data.sources\[0\]: it was saved for .*a \(37 documents\), this source is ",
    ),
    (_cfg(sources=[{"path": corpus["a"]}], seq_len=32), r"saved with seq_len 64, this run has 32"),
    (_cfg(sources=[{"path": corpus["a"]}, {"path": corpus["b"]}]), r"saved with 1 data sources, this run has 2"),
  ]:
    with pytest.raises(ValueError, match=message):
      iter(data.make_dataset(other, batch_size=4, seed=0)).set_state(state)
  with pytest.raises(ValueError, match=r"saved with seed 0, this run has 1"):
    iter(data.make_dataset(cfg, batch_size=4, seed=1)).set_state(state)


def test_eval_stream_is_the_held_out_split_in_the_same_order_every_time(corpus):
  cfg = _cfg(sources=[{"path": corpus["a"]}, {"path": corpus["b"]}])  # b has no eval split: left out
  ds = data.make_dataset(cfg, batch_size=2, seed=0, split="eval")
  first, again = _take(iter(ds), 3), _take(iter(ds), 3)
  for x, y in zip(first, again, strict=True):
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  legal = _pieces(corpus["a_eval"])
  assert all(s.tobytes() in legal for b in first for s in _segments(b))


def test_describe_counts_the_documents_to_split(corpus):
  cfg = _cfg(sources=[{"path": corpus["a"]}])
  text = data.describe(cfg, data.open_sources(cfg))
  long = sum(len(d) > SEQ_LEN for d in corpus["a_docs"])
  assert "37 documents" in text and f"{long} documents longer than seq_len {SEQ_LEN} are split" in text


def test_data_path_is_shorthand_for_one_source(corpus):
  cfg = load(None, [f"data.path={corpus['a']}"])
  assert [(s.path, s.weight) for s in cfg.data.sources] == [(corpus["a"], 1.0)]
  with pytest.raises(ConfigError, match=r"data\.path: give data\.path or data\.sources, not both"):
    load(None, ["data.path=x", "data.sources=[{path: y}]"])


def test_model_must_read_the_tokenizer(corpus, tmp_path):
  sources = data.open_sources(_cfg(sources=[{"path": corpus["a"]}]))
  data.check_model(sources, ModelConfig(vocab_size=1024, eos_id=999))
  with pytest.raises(data.DataError, match=r"vocab size 1000 exceeds model.vocab_size 320"):
    data.check_model(sources, ModelConfig(vocab_size=320, eos_id=256))
  with pytest.raises(data.DataError, match=r"end-of-document id 999 differs from model.eos_id 2\b"):
    data.check_model(sources, ModelConfig(vocab_size=1000, eos_id=2))
  other = write_dataset(tmp_path / "hf", corpus["b_docs"], kind="huggingface", sha="ab12")
  mixed = data.open_sources(_cfg(sources=[{"path": corpus["a"]}, {"path": other}]))
  with pytest.raises(data.DataError, match=r"tokenised by huggingface:ab12, but data.sources\[0\].* by bytes"):
    data.check_model(mixed, ModelConfig(vocab_size=1000, eos_id=999))


def _break(path, how):
  if how == "no manifest":
    os.remove(os.path.join(path, "manifest.json"))
  elif how == "bad json":
    with open(os.path.join(path, "manifest.json"), "w") as f:
      f.write("{not json")
  elif how == "missing shard":
    os.remove(os.path.join(path, "train", "shard-00000.arrayrecord"))
  elif how == "bad field":
    file = pathlib.Path(path, "manifest.json")
    m = json.loads(file.read_text())
    m["tokenizer"]["vocab_size"] = "many"
    file.write_text(json.dumps(m))


@pytest.mark.parametrize(
  "how, message",
  [
    ("no manifest", r"no manifest\.json; is it a dataset made by mtp-prepare"),
    ("bad json", r"manifest\.json: not readable JSON"),
    ("missing shard", r"shard-00000\.arrayrecord: shard listed in .* is missing"),
    ("bad field", r"manifest\.json: tokenizer\.vocab_size: "),
  ],
)
def test_broken_datasets_are_one_line_errors(corpus, tmp_path, how, message):
  path = write_dataset(tmp_path / "d", corpus["a_docs"][:3])
  _break(path, how)
  with pytest.raises(data.DataError, match=message) as err:
    data.open_sources(_cfg(sources=[{"path": path}]))
  assert "\n" not in str(err.value)


def test_other_bad_data_is_named(corpus, tmp_path):
  with pytest.raises(data.DataError, match=r"nowhere: no such directory"):
    data.open_sources(_cfg(sources=[{"path": str(tmp_path / "nowhere")}]))
  with pytest.raises(data.DataError, match=r"no data source has a held-out 'eval' split; prepare one with mtp-prepare"):
    data.open_sources(_cfg(sources=[{"path": corpus["b"]}]), "eval")
  assert data.open_sources(_cfg(sources=[{"path": corpus["b"]}]), "eval", required=False) == []


def test_pipeline_runs_without_jax():
  code = (
    "import sys; sys.modules['jax'] = None\n"  # any `import jax` now fails
    "from mtp_jax.config import DataConfig; from mtp_jax import data\n"
    "cfg = DataConfig(seq_len=16, max_documents=2)\n"
    "next(iter(data.make_dataset(cfg, batch_size=2, seed=0)))\n"
  )
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
  result = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


_PROCESS = textwrap.dedent(
  """
  import json, os, sys
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import numpy as np
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  processes = int(sys.argv[6])
  jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=processes, process_id=int(sys.argv[2]))
  from jax.sharding import NamedSharding, PartitionSpec
  from mtp_jax import data, sharding
  from mtp_jax.config import DataConfig, MeshConfig
  from mtp_jax.train.checkpoint import Checkpointer
  cfg = DataConfig(path=sys.argv[3], seq_len=32, prefetch=1)
  sources = data.open_sources(cfg)
  mesh = sharding.make_mesh(MeshConfig(), jax.devices())
  shape = (4, 32)
  batch_sharding = sharding.batch_sharding(mesh, MeshConfig().rules, shape)
  rows = sharding.host_rows(batch_sharding, shape)
  assert len(rows) == 4 // processes, rows  # the data axis spans the processes: an even share of rows each
  def stream():
    return iter(data.make_dataset(cfg, batch_size=4, seed=0, rows=rows, sources=sources))
  it = stream()
  whole = []
  for _ in range(3):
    local = next(it)
    tokens = sharding.from_host_rows(local["tokens"], rows, batch_sharding, shape)
    assert tokens.shape == shape, tokens.shape
    for shard in tokens.addressable_shards:  # each device holds its rows of the global batch
      held = [rows.index(r) for r in range(*shard.index[0].indices(4))]
      np.testing.assert_array_equal(np.asarray(shard.data), local["tokens"][held])
    from jax.experimental import multihost_utils
    whole.append(multihost_utils.process_allgather(tokens, tiled=True).tolist())
  # The global position rides in the shared Orbax checkpoint, written once.
  replicated = NamedSharding(mesh, PartitionSpec())
  ckpt = Checkpointer(sys.argv[5])
  ckpt.save(3, {"w": jax.device_put(np.arange(4.0, dtype=np.float32), replicated)}, it)
  ckpt.wait()
  expected = [next(it)["tokens"].tolist() for _ in range(3)]
  it.close()
  it = stream()
  assert ckpt.restore_data(3, it)
  assert [next(it)["tokens"].tolist() for _ in range(3)] == expected, "resumed stream differs"
  it.close()
  ckpt.close()
  json.dump({"rows": rows, "whole": whole, "expected": expected}, open(sys.argv[4], "w"))
  jax.distributed.shutdown()
  """
)


@pytest.mark.parametrize("processes", [2, 4])
def test_processes_assemble_the_one_process_batches_and_resume_in_one(corpus, tmp_path, processes):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  script = tmp_path / "proc.py"
  script.write_text(_PROCESS)
  env = child_env(PYTHONPATH=os.pathsep.join(sys.path))  # one CPU device per process
  outs = [tmp_path / f"out{i}.json" for i in range(processes)]
  checkpoints = tmp_path / "checkpoints"
  procs = [
    subprocess.Popen(
      [sys.executable, str(script), str(port), str(i), corpus["a"], str(outs[i]), str(checkpoints), str(processes)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(processes)
  ]
  for p in procs:
    output, _ = p.communicate(timeout=240)
    assert p.returncode == 0, output[-3000:]
  got = [json.loads(o.read_text()) for o in outs]
  assert sorted(r for mine in got for r in mine["rows"]) == [0, 1, 2, 3]
  # The global batches the hosts assembled are those one process reads alone.
  cfg = _cfg(path=corpus["a"], seq_len=32, prefetch=0)
  one = iter(data.make_dataset(cfg, batch_size=4, seed=0))
  for want in got[0]["whole"]:
    assert next(one)["tokens"].tolist() == want
  assert all(mine["whole"] == got[0]["whole"] for mine in got)
  # The position they saved resumes one process where they stood.
  assert not (checkpoints / "3" / "data").exists() and (checkpoints / "3" / "position").is_dir()
  alone = iter(data.make_dataset(cfg, batch_size=4, seed=0))
  from mtp_jax.train.checkpoint import Checkpointer

  reader = Checkpointer(checkpoints, read_only=True)
  assert reader.restore_data(3, alone)
  reader.close()
  after = [next(alone)["tokens"] for _ in range(3)]
  for i, mine in enumerate(got):
    assert [a[mine["rows"]].tolist() for a in after] == mine["expected"], i


def test_mtp_train_refuses_bad_data_in_one_line(corpus, tmp_path):
  def run(*overrides):
    cmd = [sys.executable, "-m", "mtp_jax.cli", f"train.workdir={tmp_path / 'run'}", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)

  out = run(f"data.path={corpus['a']}", "model.vocab_size=320", "model.eos_id=256")  # a 1000-token vocabulary
  assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
  assert out.stderr.startswith(
    f"mtp-train: data error: data.sources[0] ({corpus['a']}): tokenizer vocab size 1000 exceeds model.vocab_size 320"
  )
  out = run(f"data.path={tmp_path / 'missing'}", "train.eval_every=5")
  assert out.returncode == 2 and out.stderr == f"mtp-train: data error: {tmp_path / 'missing'}: no such directory\n"
  assert not (tmp_path / "run").exists()  # nothing written before the data was checked


def test_the_model_takes_vocabulary_and_end_of_document_from_the_data_unless_told(corpus):
  tiny = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
  m = load(tiny, [f"data.path={corpus['a']}"]).model  # 1000 tokens, EOS 999
  assert (m.vocab_size, m.eos_id) == (1024, 999)  # rounded up to a multiple of 64
  m = load(None, [f"data.sources=[{{path: {corpus['b']}}}, {{path: {corpus['a']}}}]", "model.eos_id=auto"]).model
  assert (m.vocab_size, m.eos_id) == (1024, 999)  # the first source's
  m = load(tiny, [f"data.path={corpus['a']}", "model.vocab_size=2000", "model.eos_id=5"]).model
  assert (m.vocab_size, m.eos_id) == (2000, 5)  # what is set wins
  m = load(tiny).model
  assert (m.vocab_size, m.eos_id) == (320, 256)  # the stdlib corpus: 257 byte-level tokens


def test_a_run_that_would_never_evaluate_needs_no_eval_split(corpus, tmp_path):
  import jax

  from mtp_jax.train import loop

  def cfg(steps):
    run = [f"train.workdir={tmp_path / str(steps)}", f"data.path={corpus['b']}", f"train.steps={steps}"]
    return load(None, [*run, "train.eval_every=5", "checkpoint.enabled=false", "train.progress_bar=false"])

  said = []
  loop.train(cfg(4), devices=jax.devices()[:1], log=said.append)
  assert "note: no data source has a held-out eval split, and train.steps < train.eval_every" in "\n".join(said)
  with pytest.raises(data.DataError, match="no data source has a held-out 'eval' split"):
    loop.train(cfg(5), devices=jax.devices()[:1], log=said.append)
