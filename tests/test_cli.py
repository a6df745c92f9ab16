"""Every command reports each kind of failure the same way: one line on stderr naming the command,
and exit status 2 for bad input, 1 for a run that failed, 130 for Ctrl-C. The real failures
behind these (a bad config, dataset, checkpoint, topology; a killed worker, a lost peer, a job
that does not fit) are tested with their commands; here each command's wiring to the runner is."""

import os

import pytest

from mtp_jax.cli import compile as compile_cli
from mtp_jax.cli import export as export_cli
from mtp_jax.cli import generate as generate_cli
from mtp_jax.cli import prepare as prepare_cli
from mtp_jax.cli import train as train_cli
from mtp_jax.data import DataError
from mtp_jax.errors import InputError, RunError

# command -> (its main, the library function it calls, a command line that reaches that call)
COMMANDS = {
  "mtp-train": (train_cli.main, "mtp_jax.train.loop.train", ["train.steps=1"]),
  "mtp-prepare": (prepare_cli.main, "mtp_jax.data.prepare.prepare", ["in.txt", "-o", "out"]),
  "mtp-compile": (compile_cli.main, "mtp_jax.compile.check", ["--topology", "local"]),
  "mtp-export": (export_cli.main, "mtp_jax.export.exporter.export", ["--checkpoint", "run", "-o", "out"]),
  "mtp-import": (export_cli.import_main, "mtp_jax.export.importer.import_", ["hf", "-o", "out"]),
  "mtp-generate": (generate_cli.main, "mtp_jax.generate.load.load", ["--checkpoint", "run", "--prompt", "x"]),
}

FAILURES = [
  (InputError("in.txt: not what was expected"), 2, "in.txt: not what was expected"),
  (DataError("data/a: no such directory"), 2, "data error: data/a: no such directory"),
  (RunError("process 1 has sent no heartbeat for 61s"), 1, "process 1 has sent no heartbeat for 61s"),
  (OSError(28, "No space left on device"), 1, "[Errno 28] No space left on device"),
  (KeyboardInterrupt(), 130, "interrupted"),
]


@pytest.fixture
def exits(monkeypatch):
  """mtp-train ends the process at once on a failure (cli.run's exit_at_once): here that is a
  SystemExit instead. The environment the commands set (JAX_PLATFORMS, XLA_FLAGS) is undone."""
  saved = dict(os.environ)

  def exit_now(code):
    raise SystemExit(code)

  monkeypatch.setattr(os, "_exit", exit_now)
  yield
  os.environ.clear()
  os.environ.update(saved)


@pytest.mark.parametrize(
  "failure, status, message", FAILURES, ids=lambda x: type(x).__name__ if isinstance(x, BaseException) else None
)
@pytest.mark.parametrize("command", COMMANDS)
def test_each_kind_of_failure_has_one_exit_status_in_every_command(
  command, failure, status, message, exits, monkeypatch, capsys
):
  main, target, argv = COMMANDS[command]

  def fail(*_, **__):
    raise failure

  monkeypatch.setattr(target, fail)
  try:
    got = main(argv)
  except SystemExit as exit_:
    got = exit_.code
  err = capsys.readouterr().err
  assert got == status, (command, err)
  assert err.startswith(f"{command}: ") and err.count("\n") == 1, err
  assert message in err, err


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_line_that_does_not_parse_is_bad_input(command, capsys):
  main, _, argv = COMMANDS[command]
  with pytest.raises(SystemExit) as exit_:
    main([*argv, "--no-such-flag"])
  err = capsys.readouterr().err
  assert exit_.value.code == 2 and err.count("\n") == 1 and "--no-such-flag" in err, err
