"""How one of our arrays becomes one tensor of another runtime's checkpoint, and back.

A `Tensor` names a target tensor, the leaf of our train state it comes from and the `Layout`
that carries one to the other. Each layout is a bijection (`to_hf` / `from_hf`), so a format's
table of Tensors serves export and import alike. Hugging Face Linear weights are [out, in];
ours are [in..., out...].
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  """Identity: vectors (norm scales, biases) and the embedding table."""

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x

  def from_hf(self, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return y.reshape(shape)

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape)


SAME = Layout()


@dataclasses.dataclass(frozen=True)
class Flat(Layout):
  """Our [H, K] per-head vector (a bias) as one [H*K] vector."""

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    return x.reshape(-1)

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (math.prod(shape),)


FLAT = Flat()


@dataclasses.dataclass(frozen=True)
class Linear(Layout):
  """Our [in_1..in_n, out_1..out_m] weight as a Linear [prod(out), prod(in)].

  `rope` > 0: the last `rope` entries of the last output axis are RoPE dims, in our rotate-half
  order (pair i is (i, i + rope/2)); they are stored interleaved (pair i at 2i, 2i + 1), the
  order DeepSeek's reference code, vLLM, SGLang and transformers' `rope_interleave: true` rotate.
  The same reordering of q's and k's RoPE dims leaves every q.k, so every output, unchanged."""

  in_axes: int = 1
  rope: int = 0

  def _order(self, last: int) -> np.ndarray:
    order = np.arange(last)
    if self.rope:
      half = self.rope // 2
      start = last - self.rope
      order[start:] = start + np.stack([np.arange(half), half + np.arange(half)], axis=1).reshape(-1)
    return order

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.rope:
      x = x[..., self._order(x.shape[-1])]
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[: self.in_axes]), -1).T)

  def from_hf(self, y: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    x = y.T.reshape(shape)
    if self.rope:
      x = x[..., np.argsort(self._order(shape[-1]))]
    return np.ascontiguousarray(x)

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (math.prod(shape[self.in_axes :]), math.prod(shape[: self.in_axes]))


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One tensor of the target checkpoint: `hf` is made from our leaf `ours` (a train-state
  name, `params.…` or `router_bias.…`), from its block `layer` when that is set (a stack of
  trunk blocks), then from its slice [expert] when that is set (stacked experts), through
  `layout`. Several Tensors may share a leaf (the MTP layer's copies of the embedding and head);
  import reads the first.

  `zero`: the target has no such tensor (`hf` then only describes what is missing). Export
  writes nothing and refuses a leaf that is not all zeros, since dropping it would change the
  model; import fills zeros."""

  hf: str
  ours: str
  layout: Layout = SAME
  layer: int | None = None
  expert: int | None = None
  keep_fp32: bool = False  # stored in float32 whatever the export dtype (the router's selection bias)
  file: str | None = None  # None: the sharded model files (in the index); else an extra file of that name
  zero: bool = False

  @property
  def piece(self) -> tuple[str, int | None]:
    """What is read for it: the leaf, or one block of a stacked leaf."""
    return self.ours, self.layer

  def piece_shape(self, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(leaf_shape) if self.layer is None else tuple(leaf_shape[1:])

  def to_hf(self, piece: np.ndarray) -> np.ndarray:
    """The target tensor from our piece (the leaf, or its block `layer`)."""
    return self.layout.to_hf(piece if self.expert is None else piece[self.expert])

  def part_shape(self, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of what `layout` carries: the leaf without its layer and expert axes."""
    shape = self.piece_shape(leaf_shape)
    return shape if self.expert is None else shape[1:]

  def hf_shape(self, leaf_shape: tuple[int, ...]) -> tuple[int, ...]:
    return self.layout.hf_shape(self.part_shape(leaf_shape))

  def index(self) -> tuple:
    """Where its part sits in the leaf."""
    return tuple(i for i in (self.layer, self.expert) if i is not None) or (...,)
