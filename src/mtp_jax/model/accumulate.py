"""Gradients added into an accumulator where they are made.

Gradient accumulation adds each microbatch's gradient to a running sum. Written as
`acc + grad(loss)(params)`, the scan over a stack's layers writes that microbatch's gradient of
the whole stack into a buffer of its own, which lives beside `acc` until the add: one more
parameter-sized float32 buffer at the step's peak. Here the accumulator itself is what is
differentiated: `grad(loss, acc)` is `acc` plus the parameters' gradient. A stack hands each
layer's gradient to the accumulator's row for that layer inside the backward loop, so the only
stack-sized gradient buffer is the accumulator itself, updated in place. The additions are the
same; where XLA fuses one into the matmul that makes the gradient, the sum is rounded once
instead of twice, so a value may differ from `acc + grad` in its last bits
(tests/test_step_equivalence.py).
"""

from __future__ import annotations

import jax
from jax import lax


@jax.custom_vjp
def into(params, acc):
  """`params` as they are; their gradient is added to `acc` and comes back as `acc`'s gradient
  (the parameters get none). `acc` has `params`' structure, shapes and dtypes."""
  return params


def _into_fwd(params, acc):
  return params, acc


def _into_bwd(acc, g):
  return None, _map(lambda a, g: a + g, acc, g)


into.defvjp(_into_fwd, _into_bwd)


@jax.custom_vjp
def into_row(params, acc, i):
  """(`params`, `acc`) as they are, for layer `i` (int32) of a scanned stack: `params` that layer's
  slice, `acc` the accumulator of the whole stack, passed on through the scan's carry. On the way
  back the slice's gradient is added into row `i` of `acc`'s (in place: the backward loop carries
  it), and the slice gets none. Close the chain with `start` on the scan's output and last `acc`."""
  return params, acc


def _into_row_fwd(params, acc, i):
  return (params, acc), i


def _into_row_bwd(i, cts):
  g, acc = cts
  add = lambda a, g: lax.dynamic_update_index_in_dim(a, lax.dynamic_index_in_dim(a, i, keepdims=False) + g, i, 0)
  return None, _map(add, acc, g), None


into_row.defvjp(_into_row_fwd, _into_row_bwd)


@jax.custom_vjp
def start(x, acc_out, acc):
  """`x` (the scan's output) as it is. On the way back `x`'s gradient passes as it comes, and the
  gradient of the stack's last `acc` (`acc_out`) is `acc`, the sum so far, where the layers'
  `into_row` begin adding. No arithmetic on `x`, so the forward pass compiles as without."""
  return x


def _start_fwd(x, acc_out, acc):
  return x, acc


def _start_bwd(acc, g):
  return g, acc, None


start.defvjp(_start_fwd, _start_bwd)


def _map(f, acc, g):
  """f over the leaves of `acc` and `g` paired in order, in `acc`'s structure (their trees may
  differ in metadata, e.g. a stack's axes names against its slice's)."""
  leaves, tree = jax.tree.flatten(acc)
  return jax.tree.unflatten(tree, [f(a, b) for a, b in zip(leaves, jax.tree.leaves(g), strict=True)])
