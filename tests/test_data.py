"""The default input pipeline: byte tokenizer, stdlib corpus, packing, sharding, resume."""

import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from mtp_jax import data
from mtp_jax.config import DataConfig
from mtp_jax.data import stdlib

SEQ_LEN = 64
NUM_DOCS = 20


def _cfg(**kw) -> DataConfig:
  return DataConfig(**{"seq_len": SEQ_LEN, "max_documents": NUM_DOCS, "shuffle": True, **kw})


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def _docs(paths) -> list[np.ndarray]:
  return [np.append(data.encode(stdlib.read_text(p)), data.EOS_ID).astype(np.int32) for p in paths]


def _pieces(docs) -> set[bytes]:
  """Every legal segment: piece k of a document is doc[k*L:(k+1)*L] (the last one may be short)."""
  return {d[i : i + SEQ_LEN].tobytes() for d in docs for i in range(0, len(d), SEQ_LEN)}


def _segments(batch):
  for tokens, seg in zip(batch["tokens"], batch["segment_ids"], strict=True):
    for s in np.unique(seg[seg > 0]):
      yield tokens[seg == s]


@pytest.fixture(scope="module")
def all_docs():
  paths = stdlib.list_files(max_documents=NUM_DOCS)
  assert len(paths) == NUM_DOCS
  return _docs(paths)


def test_tokenizer_round_trips():
  text = "def f(x):\n  return 'héllo → 世界'\r\n"
  ids = data.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 256
  assert data.decode(ids) == text
  assert data.decode(np.append(ids, data.EOS_ID)) == text  # EOS is skipped
  assert data.decode([0xFF]) == "\ufffd"
  assert data.VOCAB_SIZE_MIN == data.EOS_ID + 1


def test_shapes_and_dtypes():
  batch = next(iter(data.make_dataset(_cfg(), batch_size=8, seed=0, process_index=1, process_count=2)))
  assert set(batch) == {"tokens", "segment_ids", "positions"}
  for v in batch.values():
    assert v.shape == (4, SEQ_LEN) and v.dtype == np.int32
  assert batch["tokens"].min() >= 0 and batch["tokens"].max() <= data.EOS_ID
  with pytest.raises(ValueError, match="batch_size"):
    data.make_dataset(_cfg(), batch_size=6, seed=0, process_count=4)


def test_segment_ids_and_positions_are_consistent():
  for batch in _take(iter(data.make_dataset(_cfg(), batch_size=8, seed=0)), 20):
    for tokens, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"], strict=True):
      pad = seg == 0
      assert not tokens[pad].any() and not pos[pad].any()
      real = seg[~pad]
      assert real[0] == 1 and set(np.diff(real)) <= {0, 1}  # documents numbered 1, 2, 3, ...
      assert not pad[: len(real)].any()  # padding only at the end of the row
      starts = np.flatnonzero(np.diff(seg, prepend=-1) != 0)
      starts = starts[seg[starts] > 0]
      np.testing.assert_array_equal(np.flatnonzero((pos == 0) & ~pad), starts)
      inside = (np.arange(SEQ_LEN) > 0) & ~pad & (pos != 0)
      np.testing.assert_array_equal(pos[inside], pos[np.flatnonzero(inside) - 1] + 1)


def test_segments_are_pieces_of_real_documents(all_docs):
  legal = _pieces(all_docs)
  seen = 0
  for batch in _take(iter(data.make_dataset(_cfg(), batch_size=8, seed=3)), 20):
    for segment in _segments(batch):
      assert segment.tobytes() in legal
      seen += 1
  assert seen >= 160


def test_rows_are_mostly_full():
  batches = _take(iter(data.make_dataset(_cfg(), batch_size=8, seed=0)), 20)
  assert np.mean([(b["segment_ids"] > 0).mean() for b in batches]) > 0.9


def test_process_shards_are_disjoint(all_docs):
  shards = []
  for p in range(2):
    docs = data.document_dataset(_cfg(), seed=0, process_index=p, process_count=2)
    assert len(docs) > 10 * NUM_DOCS  # repeats forever
    shards.append([docs[i].tobytes() for i in range(NUM_DOCS // 2)])
  # A partition of the documents (compared as a multiset: two stdlib files are identical).
  assert Counter(shards[0]) + Counter(shards[1]) == Counter(d.tobytes() for d in all_docs)
  # What a process packs comes from its own shard only.
  own = _pieces([np.frombuffer(d, np.int32) for d in shards[1]])
  ds = data.make_dataset(_cfg(), batch_size=8, seed=0, process_index=1, process_count=2)
  for batch in _take(iter(ds), 10):
    assert all(s.tobytes() in own for s in _segments(batch))


def test_epochs_are_reshuffled():
  docs = data.document_dataset(_cfg(), seed=0)
  epochs = [[docs[e * NUM_DOCS + i].tobytes() for i in range(NUM_DOCS)] for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
  ordered = data.document_dataset(_cfg(shuffle=False), seed=0)
  paths = stdlib.list_files(max_documents=NUM_DOCS)
  assert [ordered[NUM_DOCS + i].tobytes() for i in range(NUM_DOCS)] == [d.tobytes() for d in _docs(paths)]


def test_resume_from_state_is_exact():
  cfg = _cfg(max_documents=3)  # ~11 batches per epoch: the run below crosses epochs
  it = iter(data.make_dataset(cfg, batch_size=8, seed=0))
  _take(it, 5)  # part-way through a group of packed rows
  state = json.loads(json.dumps(it.get_state()))  # checkpoints store it as JSON
  expected = _take(it, 30)
  restored = iter(data.make_dataset(cfg, batch_size=8, seed=0))
  restored.set_state(state)
  for want, got in zip(expected, _take(restored, 30), strict=True):
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])


def test_same_seed_same_batches_other_seed_differs():
  def first(seed):
    return np.stack([b["tokens"] for b in _take(iter(data.make_dataset(_cfg(), batch_size=8, seed=seed)), 3)])

  np.testing.assert_array_equal(first(7), first(7))
  assert not np.array_equal(first(7), first(8))


def test_no_documents_names_the_setting(tmp_path, monkeypatch):
  monkeypatch.setattr(stdlib, "stdlib_dir", lambda: str(tmp_path))
  with pytest.raises(ValueError, match=r"data\.source"):
    data.make_dataset(_cfg(), batch_size=8, seed=0)


def test_describe():
  line = data.describe(_cfg())
  assert "\n" not in line and f"{NUM_DOCS} files" in line and stdlib.stdlib_dir() in line


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
