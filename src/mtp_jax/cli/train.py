"""`mtp-train --config configs/tiny.yaml train.steps=50 model.mtp.depth=2`: train a model."""

from __future__ import annotations

import sys

from mtp_jax.cli import command_parser, run
from mtp_jax.errors import RunError, first_line


def main(argv: list[str] | None = None) -> int:
  parser = command_parser("mtp-train", "Train an MoE + multi-token-prediction transformer.")
  parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  args = parser.parse_args(argv)
  # A failure exits at once: after a failed restore, Orbax's still-pending reads would print their
  # own copies of the error at interpreter teardown, burying our line, and in a multi-process job
  # jax.distributed's shutdown barrier would wait for a dead peer. The loop closes what it wrote.
  return run(parser.prog, lambda: _train(args), tag=_process_tag, exit_at_once=True)


def _process_tag() -> str:
  """Which process failed, in a multi-process job; JAX is not imported for a config error."""
  distributed = sys.modules.get("mtp_jax.distributed")
  return distributed.process_tag() if distributed else ""


def _train(args) -> None:
  from mtp_jax import config

  cfg = config.load(args.config, args.overrides)
  if args.print_config:
    print(config.to_yaml(cfg), end="")
    return
  from mtp_jax import distributed  # JAX from here on

  distributed.initialize(cfg.distributed)
  import jax

  from mtp_jax.train.loop import train

  try:
    train(cfg)
  except jax.errors.JaxRuntimeError as err:
    if jax.process_count() == 1:
      raise
    # In a multi-process job this is almost always a collective that lost a peer.
    raise RunError(f"{first_line(err)}; another process probably died, see its log") from None


if __name__ == "__main__":
  sys.exit(main())
