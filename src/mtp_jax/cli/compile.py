"""`mtp-compile --config configs/deepseek-v3-671b.yaml --topology v5p-1024`: does a config fit a pod?

Prints what compile.py measures: per-chip memory against HBM, FLOPs per step, a roofline step
time and the MFU it implies. Exit status 0: fits; 1: does not fit; 2: bad input.

TPU names need libtpu (`pip install 'mtp-jax[tpu-aot]'`), GPU names (h100, h200:8, 4xh100:8) JAX's
CUDA plugin and cuDNN, but no GPU (`pip install 'mtp-jax[gpu-aot]'`); `--topology cpu:8` (8 fake
CPU devices) and `--topology local` (this machine's devices) need nothing more.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from mtp_jax.cli import EXIT_RUN, command_parser, run
from mtp_jax.errors import InputError
from mtp_jax.topology import FORMS, parse_topology, prepare_environment


def main(argv: list[str] | None = None) -> int:
  parser = command_parser(
    "mtp-compile", "Compile the train step for a TPU slice or GPU hosts: memory, FLOPs, step time."
  )
  parser.add_argument("--topology", required=True, metavar="NAME", help=f"one of: {FORMS}")
  parser.add_argument("--hbm-gib", type=float, metavar="GIB", help="judge the fit against this HBM per chip instead")
  parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")
  parser.add_argument(
    "--dump",
    metavar="DIR",
    help="also have XLA write its dumps of the compiled step here (HLO, buffer assignment, live ranges) and "
    "list what is live at the peak",
  )
  args = parser.parse_args(argv)
  return run(parser.prog, lambda: _compile(parser.prog, args))


def _compile(prog: str, args) -> int:
  if args.dump:  # before minutes of compiling: XLA only logs a folder it cannot write, and goes on
    try:
      os.makedirs(args.dump, exist_ok=True)
    except OSError as err:
      raise InputError(f"--dump {args.dump}: cannot make this folder ({err.strerror})") from None
    if not os.access(args.dump, os.W_OK):
      raise InputError(f"--dump {args.dump}: this folder is not writable")
  if args.json and (problem := _unwritable(args.json)):  # likewise: it is written after the compile
    raise InputError(f"--json {args.json}: {problem}")
  topo = parse_topology(args.topology)
  prepare_environment(topo)  # before JAX starts
  from mtp_jax import config
  from mtp_jax.compile import check, describe

  cfg = config.load(args.config, args.overrides)
  report = check(cfg, topo, hbm_gib=args.hbm_gib, dump=args.dump)
  given = f"--config {args.config} " if args.config else ""
  print(f"{prog} {given}--topology {args.topology} {' '.join(args.overrides)}".rstrip())
  print("\n".join(describe(report)))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"config": args.config, "overrides": args.overrides, **dataclasses.asdict(report)}, f, indent=2)
  return EXIT_RUN if report.fits is False else 0


def _unwritable(path: str) -> str | None:
  """Why a file cannot be written at `path`, or None."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    return "is a folder"
  if not os.path.isdir(folder):
    return f"its folder {folder} {'is not a folder' if os.path.exists(folder) else 'does not exist'}"
  return None if os.access(folder, os.W_OK) else f"its folder {folder} is not writable"


if __name__ == "__main__":
  sys.exit(main())
