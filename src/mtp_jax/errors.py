"""The two kinds of expected failure. Every command reports either as one line on stderr, never
a traceback, and `cli.run` gives each its exit status: 2 for bad input, 1 for a failed run."""

from __future__ import annotations

from typing import ClassVar


class InputError(ValueError):
  """Bad input: a config, dataset, checkpoint, model directory or command-line value that cannot be
  used as it is. The user fixes the input and runs again. Exit status 2."""

  label: ClassVar[str] = ""  # what the commands write before the message, e.g. "data error: "


class RunError(RuntimeError):
  """The run started with good input and could not go on: a loss that stays non-finite, a lost
  peer process, a job that could not be joined. Exit status 1."""


def first_line(err: BaseException) -> str:
  """The first line of an error's message (its type's name when it has none): library errors
  quoted inside ours can run to pages."""
  text = str(err).strip()
  return text.splitlines()[0] if text else type(err).__name__
