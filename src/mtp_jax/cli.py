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

  from mtp_jax.train.checkpoint import CheckpointError
  from mtp_jax.train.loop import TrainingError, train

  try:
    train(cfg)
  except (config.ConfigError, CheckpointError, TrainingError) as err:
    print(f"mtp-train: {err}", file=sys.stderr)
    # Skip interpreter teardown: after a failed restore, Orbax's still-pending reads would
    # print their own copies of the error there, burying this line. Everything we wrote is
    # already closed by the loop.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  except KeyboardInterrupt:
    print("mtp-train: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
