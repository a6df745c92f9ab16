"""`mtp-prepare`: every document round-trips, output independent of workers and chunking, bad input is one line."""

import gzip
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import shutil
import subprocess
import sys

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

import mtp_jax
from mtp_jax.cli.prepare import main as prepare_main
from mtp_jax.data import manifest, prepare, units
from mtp_jax.data import tokenizer as tokenizer_lib
from mtp_jax.data.manifest import DataError

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "seven", "wizards", "hex", "zebras"]


def _text(i: int) -> str:
  return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 11)) + f" {i}"


def _hf_tokenizer(path, special_tokens=("<|endoftext|>",)) -> str:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    special_tokens=list(special_tokens),
    vocab_size=300,
    show_progress=False,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator([_text(i) for i in range(200)], trainer)
  tok.save(str(path))
  return str(path)


def _sp_model(path) -> str:
  model = io.BytesIO()
  lines = [_text(i) for i in range(200)] + ["Grüße, naïve café ✓"]
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(lines), model_writer=model, vocab_size=64, character_coverage=1.0, minloglevel=2
  )
  pathlib.Path(path).write_bytes(model.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A folder of every input kind, and the documents mtp-prepare must find in it, in order."""
  root = tmp_path_factory.mktemp("corpus")
  docs = []
  lines = []
  for i in range(12):
    lines.append(json.dumps({"id": i, "text": _text(i)}))
    docs.append(_text(i))
    if i == 3:
      lines += ["", "not json", "[1, 2]", json.dumps({"text": "   "})]
  lines.append(json.dumps({"text": "Grüße, naïve café ✓ 😀"}))
  docs.append("Grüße, naïve café ✓ 😀")
  (root / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"text": "caf\xe9"}\n')  # not UTF-8: invalid
  gz = [_text(i) for i in range(20, 25)]
  with gzip.open(root / "b.jsonl.gz", "wt") as f:
    f.write("".join(json.dumps({"text": t}) + "\n" for t in gz))
  docs += gz
  column = [_text(30 + i) for i in range(8)]
  column[2], column[5] = None, ""
  pq.write_table(pa.table({"id": list(range(8)), "text": column}), root / "c.parquet", row_group_size=3)
  docs += [t for t in column if t]
  (root / "texts").mkdir()
  (root / "texts" / "bin.dat").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0 binary")
  (root / "texts" / "empty.txt").write_text("")
  (root / "texts" / "t1.txt").write_text("first text file\nwith two lines\n")
  (root / "texts" / "t2.md").write_bytes("# second\r\n\ncafé".encode() + b"\xff")
  (root / "texts" / ".hidden.txt").write_text("never read")
  (root / ".cache").mkdir()
  (root / ".cache" / "seen.txt").write_text("never read either")
  docs += ["first text file\nwith two lines\n", "# second\r\n\ncafé\ufffd"]
  skipped = {"binary": 1, "empty": 4, "invalid_json": 3}  # empty: "   ", a Parquet null and "", empty.txt
  return root, docs, skipped


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  return {"hf": _hf_tokenizer(root / "tokenizer.json"), "sp": _sp_model(root / "sp.model")}


def _read(out, split="train"):
  """The manifest and every document of `split`, read back through grain."""
  man = manifest.read(out)
  source = grain.sources.ArrayRecordDataSource(manifest.shard_paths(out, man, split))
  return man, [manifest.decode_record(source[i], man.token_dtype).tolist() for i in range(len(source))]


def _expected(kind, tokenizer_files):
  """(tokenizer spec, text -> ids, eos id) from the libraries themselves, not mtp_jax's wrappers."""
  if kind == "bytes":
    return "bytes", lambda t: list(t.encode()), 256
  if kind == "hf":
    tok = tokenizers.Tokenizer.from_file(tokenizer_files["hf"])
    return (
      tokenizer_files["hf"],
      lambda t: tok.encode(t, add_special_tokens=False).ids,
      tok.token_to_id("<|endoftext|>"),
    )
  sp = spm.SentencePieceProcessor(model_file=tokenizer_files["sp"])
  return tokenizer_files["sp"], lambda t: sp.encode(t), sp.eos_id()


@pytest.mark.parametrize("kind", ["bytes", "hf", "sp"])
def test_every_document_round_trips(corpus, tokenizer_files, tmp_path, kind):
  root, texts, skipped = corpus
  spec, encode, eos = _expected(kind, tokenizer_files)
  out = tmp_path / "out"
  prepare.prepare([str(root)], str(out), tokenizer=spec, workers=0, shard_tokens=100)
  man, docs = _read(out)
  want = [[*encode(t), eos] for t in texts]
  assert docs == want
  assert man.splits.keys() == {"train"}
  split = man.splits["train"]
  assert (split.documents, split.tokens) == (len(want), sum(map(len, want)))
  assert split.max_document_tokens == max(map(len, want))
  assert [len(split.shards) > 1, sum(s.documents for s in split.shards)] == [True, len(want)]
  assert all(s.tokens >= 100 for s in split.shards[:-1])  # a new shard only once one is full
  np.testing.assert_array_equal(manifest.lengths(out, man, "train"), [len(d) for d in want])
  assert man.skipped == skipped
  assert [(os.path.basename(s.path), s.documents) for s in man.sources] == [
    ("a.jsonl", 13),
    ("b.jsonl.gz", 5),
    ("c.parquet", 6),
    ("bin.dat", 0),
    ("empty.txt", 0),
    ("t1.txt", 1),
    ("t2.md", 1),
  ]
  assert man.sources[0].bytes == os.path.getsize(root / "a.jsonl")
  tok = man.tokenizer
  assert (tok.eos_id, man.mtp_jax_version, man.text_field) == (eos, mtp_jax.__version__, "text")
  if kind == "bytes":
    assert (tok.kind, tok.vocab_size, tok.path, man.token_dtype) == ("bytes", 257, None, "uint16")
  else:
    assert tok.kind == {"hf": "huggingface", "sp": "sentencepiece"}[kind]
    assert tok.path == os.path.abspath(spec)
    assert tok.sha256 == hashlib.sha256(pathlib.Path(spec).read_bytes()).hexdigest()
    assert tok.vocab_size == {"hf": 300, "sp": 64}[kind]
  if kind == "sp":
    assert (tok.bos_id, tok.pad_id) == (1, None)


def test_tokenizers_pickle_as_their_file(tokenizer_files):
  for spec in tokenizer_files.values():
    tok = tokenizer_lib.load(spec)
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("the lazy fox").tolist() == tok.encode("the lazy fox").tolist()
    assert (again.vocab_size, again.eos_id) == (tok.vocab_size, tok.eos_id)
    assert again.decode(tok.encode("the lazy fox")) == "the lazy fox"


def _files(out) -> dict[str, bytes]:
  return {
    str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.name != "manifest.json" and p.is_file()
  }


def _manifest_without_time(out) -> dict:
  return {**manifest.read(out).model_dump(), "created": None}


def test_output_is_the_same_for_any_workers_and_chunking(corpus, tokenizer_files, tmp_path):
  root = corpus[0]
  kw = dict(tokenizer=tokenizer_files["hf"], eval_fraction=0.3, shard_tokens=64)
  prepare.prepare([str(root)], str(tmp_path / "one"), workers=1, **kw)
  assert len(units.plan([str(root / "a.jsonl")], "text", 100)) > 3  # the chunked run cuts a.jsonl
  prepare.prepare([str(root)], str(tmp_path / "two"), workers=2, chunk_bytes=100, **kw)
  assert _files(tmp_path / "one") == _files(tmp_path / "two")
  assert _manifest_without_time(tmp_path / "one") == _manifest_without_time(tmp_path / "two")
  assert len(_files(tmp_path / "one")) > 4


def test_line_numbers_and_worker_errors_survive_chunking(tmp_path):
  lines = [json.dumps({"text": _text(i)}) for i in range(40)]
  lines[33] = "{oops"
  (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
  with pytest.raises(DataError, match=r"big\.jsonl:34: not valid JSON"):
    prepare.prepare([str(tmp_path / "big.jsonl")], str(tmp_path / "o"), strict=True, workers=0, chunk_bytes=64)
  # A DataError raised inside a pool worker reaches the parent as the same one-line error.
  (tmp_path / "bad.jsonl.gz").write_bytes(gzip.compress(b'{"text": "fine"}\n')[:-9] + b"garbage!!")
  with pytest.raises(DataError, match=r"^\S*bad\.jsonl\.gz: cannot read \(.*\)$"):
    prepare.prepare([str(tmp_path)], str(tmp_path / "o"), workers=2)
  assert not list(tmp_path.glob("o*"))


# Run as a script: spawned workers import it as their main module, so the patch reaches them.
_DYING_WORKER = """
import multiprocessing, os, signal, sys
from mtp_jax.cli.prepare import main
from mtp_jax.data import units

_tokenize = units.Tokenize.__call__

def _die_on_poison(self, unit):  # what the kernel's OOM killer does to a worker
  if multiprocessing.parent_process() and "poison" in unit.paths[0]:
    os.kill(os.getpid(), signal.SIGKILL)
  return _tokenize(self, unit)

units.Tokenize.__call__ = _die_on_poison
if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_worker_ends_the_run_with_one_line_and_leaves_nothing(tmp_path):
  (tmp_path / "in").mkdir()
  for name in ["0-poison", "a", "z"]:  # the first unit: the first one the parent waits for
    (tmp_path / "in" / f"{name}.jsonl").write_text("".join(json.dumps({"text": _text(i)}) + "\n" for i in range(20)))
  (tmp_path / "script.py").write_text(_DYING_WORKER)
  out = tmp_path / "out"
  argv = [str(tmp_path / "in"), "-o", str(out), "--workers=2"]
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(mtp_jax.__file__))}
  done = subprocess.run(
    [sys.executable, str(tmp_path / "script.py"), *argv], capture_output=True, text=True, env=env, timeout=120
  )
  assert done.returncode == 1, done.stderr
  assert re.fullmatch(r"mtp-prepare: \S*/0-poison\.jsonl: a tokenizer worker process died .*\n", done.stderr), (
    done.stderr
  )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "script.py"]  # no DIR, no DIR.tmp-PID


def test_eval_fraction_is_deterministic_and_eval_input_is_held_out_whole(tmp_path):
  (tmp_path / "data").mkdir()
  texts = [_text(i) + f" #{i}" for i in range(400)]
  (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  (tmp_path / "data" / "valid.jsonl").write_text(json.dumps({"text": "held out"}) + "\n")
  runs = {}
  for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
    out = tmp_path / name
    prepare.prepare([str(tmp_path / "data")], str(out), eval_fraction=0.25, seed=seed, workers=0)
    runs[name] = (_read(out, "train")[1], _read(out, "eval")[1])
  train, held = runs["a"]
  assert runs["b"] == runs["a"] and runs["c"] != runs["a"]
  assert 60 < len(held) < 140 and len(train) + len(held) == 401
  assert sorted(map(tuple, train + held)) == sorted(tuple([*t.encode(), 256]) for t in [*texts, "held out"])
  out = tmp_path / "e"
  argv = [str(tmp_path / "data"), "-o", str(out), "--eval-input", str(tmp_path / "data" / "valid.jsonl"), "--workers=0"]
  assert prepare_main(argv) == 0
  man, held = _read(out, "eval")
  assert held == [[*b"held out", 256]] and man.splits["train"].documents == 400
  assert [(os.path.basename(s.path), s.split) for s in man.sources] == [
    ("train.jsonl", "train"),
    ("valid.jsonl", "eval"),
  ]


def test_lone_surrogates_become_replacement_characters(tmp_path):
  (tmp_path / "s.jsonl").write_text('{"text": "a\\ud800b"}\n')
  prepare.prepare([str(tmp_path / "s.jsonl")], str(tmp_path / "o"), workers=0)
  assert _read(tmp_path / "o")[1] == [[*"a\ufffdb".encode(), 256]]


def _bad_inputs(tmp: pathlib.Path, tokenizer_files) -> dict[str, tuple[list[str], list[str]]]:
  """name -> (argv, pieces the one-line message must contain)."""
  (tmp / "ok.jsonl").write_text('{"text": "fine", "id": 1}\n')
  (tmp / "empty").mkdir()
  (tmp / "empty" / "e.txt").write_text("")
  (tmp / "empty" / "blank.jsonl").write_text("\n\n")
  (tmp / "bad.jsonl").write_text('{"text": "a"}\n{"text": "b"}\n{"text": \n')
  (tmp / "number.jsonl").write_text('{"text": "a"}\n{"text": 7}\n')
  pq.write_table(pa.table({"body": ["x"], "id": [1]}), tmp / "c.parquet")
  (tmp / "tok.json").write_text("{}")
  (tmp / "broken.jsonl.gz").write_bytes(b"not gzip at all")
  no_eos = _hf_tokenizer(tmp / "noeos.json", special_tokens=())
  ok = str(tmp / "ok.jsonl")
  return {
    "missing path": ([str(tmp / "nope.jsonl")], ["nope.jsonl", "no such file"]),
    "empty glob": ([str(tmp / "*.xyz")], ["*.xyz", "matches no files"]),
    "nothing in it": ([str(tmp / "empty")], ["no documents", "1 empty"]),
    "strict JSON": ([str(tmp / "bad.jsonl"), "--strict"], ["bad.jsonl:3:", "not valid JSON"]),
    "missing field": ([ok, "--text-field", "body"], ["ok.jsonl:1:", "'body'", "fields: text, id", "--text-field"]),
    "not a string": ([str(tmp / "number.jsonl")], ["number.jsonl:2:", "number, not a string"]),
    "missing column": ([str(tmp / "c.parquet")], ["c.parquet", "no column 'text'", "columns: body, id"]),
    "bad tokenizer": ([ok, "--tokenizer", str(tmp / "tok.json")], ["tok.json", "not a Hugging Face tokenizer.json"]),
    "no tokenizer": ([ok, "--tokenizer", str(tmp / "no.model")], ["no.model", "not a SentencePiece model"]),
    "no EOS": ([ok, "--tokenizer", no_eos], ["noeos.json", "<|endoftext|>", "--eos-token"]),
    "unknown EOS": ([ok, "--tokenizer", tokenizer_files["sp"], "--eos-token", "<zz>"], ["sp.model", "'<zz>'"]),
    "broken gzip": ([str(tmp / "broken.jsonl.gz")], ["broken.jsonl.gz", "cannot read"]),
    "eval fraction": ([ok, "--eval-fraction", "1"], ["--eval-fraction 1.0", "below 1"]),
    "eval held nothing": ([ok, "--eval-fraction", "1e-9"], ["--eval-fraction 1e-09", "none of the 1 documents"]),
  }


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, tokenizer_files, capsys):
  for name, (argv, pieces) in _bad_inputs(tmp_path, tokenizer_files).items():
    status = prepare_main([*argv, "--output", str(tmp_path / "out"), "--workers=0"])
    err = capsys.readouterr().err
    assert status == 2, name
    assert err.startswith("mtp-prepare: data error: ") and err.count("\n") == 1 and "Traceback" not in err, (name, err)
    for piece in pieces:
      assert piece in err, (name, piece, err)
    assert not list(tmp_path.glob("out*")), name  # nothing left behind, not even a temporary directory


def test_usage_errors_exit_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    prepare_main(["in.jsonl"])
  assert exit_info.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_hf_eos_token_can_be_named(tmp_path):
  tok = _hf_tokenizer(tmp_path / "noeos.json", special_tokens=("<|my_eos|>",))
  (tmp_path / "d.txt").write_text("the fox")
  prepare.prepare([str(tmp_path / "d.txt")], str(tmp_path / "o"), tokenizer=tok, eos_token="<|my_eos|>", workers=0)
  eos = tokenizers.Tokenizer.from_file(tok).token_to_id("<|my_eos|>")
  assert manifest.read(tmp_path / "o").tokenizer.eos_id == eos and _read(tmp_path / "o")[1][0][-1] == eos


def test_existing_output_survives_unless_overwritten(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("first")
  (tmp_path / "b.txt").write_text("second")
  out = tmp_path / "out"
  assert prepare_main([str(tmp_path / "a.txt"), "-o", str(out), "--workers=0"]) == 0
  assert "train: 1 document, 6 tokens, 1 shard" in capsys.readouterr().out
  before = {**_files(out), "manifest": (out / "manifest.json").read_bytes()}
  state = lambda: {**_files(out), "manifest": (out / "manifest.json").read_bytes()}

  assert prepare_main([str(tmp_path / "b.txt"), "-o", str(out), "--workers=0"]) == 2
  assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
  assert state() == before
  # A run that fails part-way, even with --overwrite, leaves the old dataset as it was.
  (tmp_path / "bad.jsonl").write_text("{}\n")
  assert (
    prepare_main([str(tmp_path / "b.txt"), str(tmp_path / "bad.jsonl"), "-o", str(out), "--overwrite", "--workers=0"])
    == 2
  )
  assert "no field 'text'" in capsys.readouterr().err
  assert state() == before
  assert prepare_main([str(tmp_path / "b.txt"), "-o", str(out), "--overwrite", "--workers=0"]) == 0
  assert _read(out)[1] == [[*b"second", 256]]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt", "bad.jsonl", "out"]
  # The output must not swallow its own inputs.
  assert prepare_main([str(out), "-o", str(out), "--overwrite", "--workers=0"]) == 2
  assert "holds the input" in capsys.readouterr().err
  # An output under a file cannot be made: named, not its temporary sibling.
  assert prepare_main([str(tmp_path / "a.txt"), "-o", str(tmp_path / "b.txt" / "o"), "--workers=0"]) == 2
  assert (
    capsys.readouterr().err
    == f"mtp-prepare: data error: --output {tmp_path}/b.txt/o: cannot make it: Not a directory\n"
  )


def test_console_script_end_to_end(tmp_path):
  (tmp_path / "in").mkdir()
  (tmp_path / "in" / "x.jsonl").write_text('{"text": "hello"}\n{"text": "world"}\n')
  script = shutil.which("mtp-prepare", path=os.path.dirname(sys.executable))
  command = [script] if script else [sys.executable, "-m", "mtp_jax.cli.prepare"]
  env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(mtp_jax.__file__))}
  ok = subprocess.run(
    [*command, str(tmp_path / "in"), "-o", str(tmp_path / "o")], capture_output=True, text=True, env=env
  )
  assert ok.returncode == 0, ok.stderr
  assert "train: 2 documents, 12 tokens, 1 shard" in ok.stdout and ok.stderr == ""
  assert _read(tmp_path / "o")[1] == [[*b"hello", 256], [*b"world", 256]]
  bad = subprocess.run(
    [*command, str(tmp_path / "missing"), "-o", str(tmp_path / "p")], capture_output=True, text=True, env=env
  )
  assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "missing: no such file" in bad.stderr
