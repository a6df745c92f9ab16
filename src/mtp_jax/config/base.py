"""What every config section shares: frozen, no unknown keys, a one-line error naming the key."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from mtp_jax.errors import InputError


class ConfigError(InputError):
  """A configuration problem: `config error: KEY: PROBLEM`, one line naming the dotted key."""

  def __init__(self, key: str, problem: str):
    super().__init__(key, problem)  # both kept in args, so the error pickles
    self.key, self.problem = key, problem

  def __str__(self) -> str:
    return f"config error: {self.key}: {self.problem}"


class Section(BaseModel):
  """A config section. Checks of one field live on the field; checks of fields that must fit
  together live in `problems`, in the smallest section that holds them all."""

  model_config = ConfigDict(extra="forbid", frozen=True)

  def problems(self) -> Iterator[tuple[str, str]]:
    """Yields (dotted key, problem) for values of this section that do not fit together."""
    yield from ()

  @pydantic.model_validator(mode="after")
  def _consistent(self):
    for key, problem in self.problems():
      raise ConfigError(key, problem)
    return self


def field(default: Any, doc: str, **kw: Any) -> Any:
  """A setting: its default, its one-line description (`--print-config` and docs show it), bounds."""
  return Field(default, description=doc, **kw)
