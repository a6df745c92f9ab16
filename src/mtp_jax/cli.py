"""`mtp-train --config configs/tiny.yaml train.steps=50 model.mtp.depth=2`

Parses the command line and calls the loop; every expected failure is one line on stderr
and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    self.exit(2, f"{self.prog}: error: {message}\n")


def command_parser(prog: str, description: str, default_config: str | None = None) -> argparse.ArgumentParser:
  """A parser taking `--config` and dotted overrides, whose usage errors are one line.
  Shared by `mtp-train` and the scripts in benchmarks/."""
  parser = _Parser(prog=prog, description=description)
  parser.add_argument("--config", default=default_config, help="YAML config file")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
  return parser


def load_config(prog: str, path: str | None, overrides: list[str]):
  """The resolved config, or one line on stderr and exit status 2."""
  from mtp_jax import config

  try:
    return config.load(path, overrides)
  except config.ConfigError as err:
    print(f"{prog}: {err}", file=sys.stderr)
    raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
  parser = command_parser("mtp-train", "Train an MoE + multi-token-prediction transformer.")
  parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  args = parser.parse_args(argv)

  from mtp_jax import config

  cfg = load_config(parser.prog, args.config, args.overrides)
  if args.print_config:
    print(config.to_yaml(cfg), end="")
    return 0

  from mtp_jax import distributed

  try:
    distributed.initialize(cfg.distributed)
  except config.ConfigError as err:
    print(f"mtp-train: {err}", file=sys.stderr)
    return 2

  from mtp_jax.data import DataError
  from mtp_jax.train.checkpoint import CheckpointError
  from mtp_jax.train.loop import TrainingError, train

  try:
    train(cfg)
  except (config.ConfigError, CheckpointError, TrainingError, DataError) as err:
    prefix = "data error: " if isinstance(err, DataError) else ""
    print(f"mtp-train: {distributed.process_tag()}{prefix}{err}", file=sys.stderr)
    # Skip interpreter teardown: after a failed restore, Orbax's still-pending reads would
    # print their own copies of the error there, burying this line. Everything we wrote is
    # already closed by the loop.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  except Exception as err:
    import jax

    if jax.process_count() == 1 or not isinstance(err, jax.errors.JaxRuntimeError):
      raise
    # In a multi-process job this is almost always a collective that lost a peer. Exit now:
    # jax.distributed's shutdown barrier would wait for the dead process, then crash.
    first = str(err).strip().splitlines()[0]
    print(f"mtp-train: {distributed.process_tag()}{first}; another process probably died, see its log", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  except KeyboardInterrupt:
    print("mtp-train: interrupted", file=sys.stderr)
    return 130
  return 0


def prepare_main(argv: list[str] | None = None) -> int:
  """`mtp-prepare INPUT... --output DIR`: tokenize text files into a dataset for training."""
  parser = _Parser(
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

  from mtp_jax.data import prepare
  from mtp_jax.data.manifest import DataError

  try:
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
  except DataError as err:
    print(f"mtp-prepare: {err}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("mtp-prepare: interrupted; nothing was written", file=sys.stderr)
    return 130
  print(prepare.summary(manifest, args.output))
  return 0


if __name__ == "__main__":
  sys.exit(main())
