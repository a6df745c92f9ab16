"""`mtp-prepare INPUT... --output DIR`: tokenize text files into a dataset for training."""

from __future__ import annotations

import sys

from mtp_jax.cli import Parser, run


def main(argv: list[str] | None = None) -> int:
  parser = Parser(
    prog="mtp-prepare",
    description="Tokenize JSON Lines, Parquet and text files into ArrayRecord shards with a manifest.",
  )
  parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories (walked recursively) or globs")
  parser.add_argument("--output", "-o", required=True, metavar="DIR", help="dataset directory to write")
  parser.add_argument(
    "--tokenizer",
    default="bytes",
    metavar="SPEC",
    help="'bytes', a Hugging Face tokenizer.json or a SentencePiece .model",
  )
  parser.add_argument("--eos-token", metavar="TOKEN", help="end-of-document token, when the tokenizer's is not found")
  parser.add_argument("--text-field", default="text", metavar="NAME", help="JSON field / Parquet column of the text")
  parser.add_argument(
    "--eval-fraction", type=float, default=0.0, metavar="F", help="hold out this share of documents (by text hash)"
  )
  parser.add_argument(
    "--eval-input", nargs="+", action="extend", default=[], metavar="PATH", help="held out whole (even if under INPUT)"
  )
  parser.add_argument("--seed", type=int, default=0, help="changes which documents --eval-fraction holds out")
  parser.add_argument("--strict", action="store_true", help="stop at the first invalid JSON line instead of skipping")
  parser.add_argument("--workers", type=int, metavar="N", help="worker processes (default: all cores; 0 or 1: none)")
  parser.add_argument("--shard-tokens", type=int, default=1 << 28, metavar="N", help="tokens per shard (default 2**28)")
  parser.add_argument("--overwrite", action="store_true", help="replace DIR when it already holds something")
  parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
  args = parser.parse_args(argv)

  return run(parser.prog, lambda: _prepare(args), interrupted="interrupted; nothing was written")


def _prepare(args) -> None:
  from mtp_jax.data import prepare

  manifest = prepare.prepare(
    args.inputs,
    args.output,
    tokenizer=args.tokenizer,
    eos_token=args.eos_token,
    text_field=args.text_field,
    eval_fraction=args.eval_fraction,
    eval_inputs=args.eval_input,
    seed=args.seed,
    strict=args.strict,
    workers=args.workers,
    shard_tokens=args.shard_tokens,
    overwrite=args.overwrite,
    progress=not args.no_progress and sys.stderr.isatty(),
  )
  print(summary(manifest, args.output))


def summary(manifest, output: str) -> str:
  """A few lines on what `prepare` wrote."""
  count = lambda n, what: f"{n:,} {what}" + "s" * (n != 1)
  lines = []
  for name, split in manifest.splits.items():
    counts = count(split.documents, "document"), count(split.tokens, "token"), count(len(split.shards), "shard")
    lines.append(f"{name}: {', '.join(counts)}")
  if manifest.skipped:
    lines.append("skipped: " + ", ".join(f"{n:,} {why}" for why, n in manifest.skipped.items()))
  tok = manifest.tokenizer
  lines.append(f"tokenizer: {tok.kind} (vocab {tok.vocab_size}, eos {tok.eos_id}); wrote {output}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
