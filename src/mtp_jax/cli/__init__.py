"""The commands, each a thin layer over the library that parses its command line and calls one
function. Every expected failure is one line on stderr, never a traceback, and `run` gives each
kind of failure the same exit status in every command:

  0    done
  1    the run failed after it started: an `errors.RunError` (a loss that stays non-finite, a
       lost peer process, a job that could not be joined) or an OSError (a full disk); and
       `mtp-compile` when the job does not fit
  2    bad input: an `errors.InputError` (a config, dataset, checkpoint, model directory or
       topology that cannot be used) or a command line that does not parse
  130  interrupted (Ctrl-C)

train.py     mtp-train (also `python -m mtp_jax.cli`)
prepare.py   mtp-prepare
compile.py   mtp-compile
export.py    mtp-export, mtp-import
generate.py  mtp-generate
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from mtp_jax.errors import InputError, RunError, first_line

EXIT_RUN, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class Parser(argparse.ArgumentParser):
  """An argument parser whose usage errors are one line and exit status 2."""

  def error(self, message):
    self.exit(EXIT_INPUT, f"{self.prog}: error: {message}\n")


def command_parser(prog: str, description: str, default_config: str | None = None) -> Parser:
  """A parser taking `--config` and dotted overrides. Shared by `mtp-train`, `mtp-compile` and the
  scripts in benchmarks/."""
  parser = Parser(prog=prog, description=description)
  parser.add_argument("--config", default=default_config, help="YAML config file")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
  return parser


def load_config(prog: str, path: str | None, overrides: list[str]):
  """The resolved config, or one line on stderr and exit status 2 (for scripts outside `run`)."""
  from mtp_jax import config

  try:
    return config.load(path, overrides)
  except config.ConfigError as err:
    print(f"{prog}: {err}", file=sys.stderr)
    raise SystemExit(EXIT_INPUT) from None


def run(
  prog: str,
  work: Callable[[], int | None],
  *,
  tag: Callable[[], str] = lambda: "",
  interrupted: str = "interrupted",
  exit_at_once: bool = False,
) -> int:
  """work()'s exit status (None: 0), or that of its expected failure after one line on stderr,
  `prog: ` and `tag()` first (mtp-train's names the process in a multi-process job).
  exit_at_once: a failure ends the process here, skipping interpreter teardown (see mtp-train)."""
  try:
    return work() or 0
  except InputError as err:
    code, message = EXIT_INPUT, f"{err.label}{err}"
  except RunError as err:
    code, message = EXIT_RUN, str(err)
  except OSError as err:
    code, message = EXIT_RUN, first_line(err)
  except KeyboardInterrupt:
    code, message = EXIT_INTERRUPTED, interrupted
  print(f"{prog}: {tag()}{message}", file=sys.stderr)
  if exit_at_once and code != EXIT_INTERRUPTED:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  return code
