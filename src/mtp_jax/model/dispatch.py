"""How tokens reach their experts: the plan for a mesh, the sort by expert, and the exchange.

The only model file that names mesh axes. `MOE.md` beside it has the mode x dispatch table.

Every plan but `gspmd` runs routing, dispatch, the experts and the combine in one `shard_map`
over the axes that split the tokens, so each device sorts and computes its own tokens only:
- local: every device holds every expert (no mesh axis splits them); the exchange is trivial.
- all_to_all (capacity mode): buffers go to the devices holding their experts and back.
- ragged_all_to_all (dropless; GPU and TPU): sorted rows go there and back.
gspmd runs the same code on the whole microbatch and leaves the placement to the compiler.

Shape letters beyond the package legend (model/__init__.py); inside the shard_map body
(`_per_device` and what it calls) B, L and T are this device's tokens, E every expert:
  T tokens (B·L) · K experts chosen per token · C buffer slots per expert (capacity)
  R routed rows, T·K (row r: token r // K, choice r % K), in token order · O the same rows in
    expert order
  P devices along the expert axes · U experts held by one device · A slots one device receives
    for one of its experts, P·C
  N rows a device sends, in expert order · Q rows it receives (ragged_all_to_all)
  I rows into `_take_rows` · J rows out of it
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from mtp_jax import sharding
from mtp_jax.config import ConfigError, MoEConfig
from mtp_jax.model.experts import WEIGHT_AXES, Weights, swiglu_batched, swiglu_ragged

# The dropless collective, looked up at trace time: CPU has no ragged_all_to_all, so the tests
# put an exact emulation here. Anything other than the jax primitive counts as available.
ragged_all_to_all = jax.lax.ragged_all_to_all

# run_experts(rows, gates, group_sizes_E) -> (outputs, times their gates where given; rows
# dropped or None): capacity buffers ExCxD with gates ExC and group_sizes_E None, or rows sorted
# by expert, their N gates and the rows' count per expert (dropless). Where the rows travel to
# other devices, their gates travel with them and weigh the rows there, in the experts' kernel
# (`experts._hidden`): the gates' gradient needs the rows' hidden activations, which the backward
# pass then finds where they are, and the outputs' way back to their tokens, whose result it no
# longer reads, is not run again under remat (on DeepSeek-V3's 64-way expert axis, one of a
# layer's six token exchanges a step).
RunExperts = Callable[[jax.Array, jax.Array | None, jax.Array | None], tuple[jax.Array, jax.Array | None]]
# route(router_params, x_TxD) -> (gates_TxK, experts_TxK, scores_TxE, logits_TxE)
Route = Callable[..., tuple[jax.Array, jax.Array, jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Plan:
  kind: str  # local | all_to_all | ragged_all_to_all | gspmd
  note: str | None = None
  ep: tuple[str, ...] = ()  # mesh axes the experts are split over (the all-to-all group)
  tp: tuple[str, ...] = ()  # mesh axes the expert hidden dim is split over (tokens replicated)
  tokens: PartitionSpec | None = None  # of the B x L x D tokens inside the shard_map; None: no shard_map


ONE_DEVICE = Plan("local")


def dispatch_plan(
  cfg: MoEConfig, mesh: Mesh | None, rules: sharding.Rules, tokens_BxL: Sequence[int] | None = None
) -> tuple[str, str | None]:
  """The dispatch the MoE layers will use on this mesh (local, all_to_all, ragged_all_to_all or
  gspmd) and a one-line note when it is not what the config asked for. tokens_BxL (the
  microbatch shape) lets the note see when the rules would not split the tokens there. Raises
  ConfigError for an explicit ragged_all_to_all on a backend without it."""
  p = plan(cfg, mesh, rules, tokens_BxL)
  return p.kind, p.note


def plan(cfg: MoEConfig, mesh: Mesh | None, rules: sharding.Rules, tokens_BxL=None) -> Plan:
  want = cfg.dispatch
  if mesh is None or not cfg.num_experts:
    return ONE_DEVICE
  platform = sharding.platform(mesh)
  has_ragged = platform != "cpu" or ragged_all_to_all is not jax.lax.ragged_all_to_all
  if want == "ragged_all_to_all" and not has_ragged:
    raise ConfigError(
      "model.moe.dispatch",
      f"ragged_all_to_all is not implemented on the {platform} backend; "
      "use auto or gspmd (or all_to_all with model.moe.mode=capacity)",
    )
  w_spec = _expert_weight_spec(cfg, mesh, rules)
  ep = sharding.axes_of(w_spec[0])
  if tokens_BxL is None:
    split = {a for a in mesh.axis_names if mesh.shape[a] > 1 and a not in mesh.manual_axes}
    tokens, token_axes = None, {a for n in ("act_batch", "act_length") for a in rules.get(n, []) if a in split}
  else:
    tokens = sharding.spec(("act_batch", "act_length", None), (*tokens_BxL, 1), mesh, rules)
    token_axes = {a for entry in tokens for a in sharding.axes_of(entry)}
  tp = tuple(a for a in sharding.axes_of(w_spec[2]) if a not in token_axes)
  if want == "gspmd":
    why = None
    if not ep:
      why = (
        "model.moe.dispatch=gspmd: no mesh axis splits the experts, so every device computes the experts of the "
        "whole microbatch (auto computes each device's own tokens)"
      )
    return Plan("gspmd", why)
  if not ep:  # nothing to exchange: each device computes its own tokens
    why = f"model.moe.dispatch={want}: the experts are not split over any mesh axis; they run where the tokens are"
    return Plan("local", None if want == "auto" else why, (), tp, tokens)
  kind = want
  if want == "auto":
    kind = "all_to_all" if cfg.mode == "capacity" else "ragged_all_to_all" if has_ragged else "gspmd"
  if kind == "gspmd":
    return Plan(
      "gspmd",
      f"model.moe.dispatch=auto: ragged_all_to_all is not implemented on the {platform} backend; dropless "
      f"experts over {_names(ep)} use gspmd (model.moe.mode=capacity uses the all_to_all)",
    )
  if missing := [a for a in ep if a not in token_axes]:
    return Plan(
      "gspmd",
      f"model.moe.dispatch={want}: the tokens are not split over {_names(missing)} (mesh.rules.act_batch, "
      f"act_length) as the experts are; {kind} needs them there, so the experts use gspmd",
    )
  return Plan(kind, None, ep, tp, tokens)


def _expert_weight_spec(cfg: MoEConfig, mesh: Mesh, rules: sharding.Rules) -> PartitionSpec:
  """How the ExDxF expert weights split: experts over spec[0], their hidden dim over spec[2]."""
  return sharding.spec(("experts", None, "expert_mlp"), (cfg.num_experts, 1, cfg.expert_d_ff), mesh, rules)


def expert_group(cfg: MoEConfig, mesh: Mesh, rules: sharding.Rules) -> int:
  """Devices the experts are split over (1: every device holds them all)."""
  return math.prod(mesh.shape[a] for a in sharding.axes_of(_expert_weight_spec(cfg, mesh, rules)[0]))


def capacity(cfg: MoEConfig, num_tokens: int) -> int:
  """Buffer rows per expert for `num_tokens` tokens (one device's, except under gspmd)."""
  return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))


def receive_rows(cfg: MoEConfig, group: int, n_rows: int) -> tuple[int, int]:
  """ragged_all_to_all over `group` devices that each send `n_rows` rows (token-slots): (the rows
  each receives into, the worst case, every device's rows for its experts arriving at one)."""
  worst = group * (n_rows // cfg.top_k) * min(cfg.top_k, cfg.num_experts // group)
  if not cfg.ragged_buffer_factor:
    return worst, worst
  return min(worst, math.ceil(cfg.ragged_buffer_factor * n_rows)), worst


def _names(axes) -> str:
  return f"the {' x '.join(axes)} mesh axis" + ("es" if len(axes) > 1 else "")


# ---- Routing, dispatch, experts and combine, as the plan places them ----------------------


def routed_experts(
  m: MoEConfig, p: Plan, route: Route, router_params, w: Weights, x_BxLxD: jax.Array, valid_BxL: jax.Array
):
  """(y_BxLxD, experts_BxLxK, scores_BxLxE, logits_BxLxE, dropped): the routed experts' gated
  sum for every token, the routing that chose them, and the token-slots dropped over all
  devices. `route(router_params, x_TxD)` chooses the experts, on each device for its tokens."""
  active = sharding.active()
  if p.tokens is None:  # one device, or gspmd: the whole microbatch at once
    return _per_device(
      m, route, router_params, _local(w, (), m.kernel, constrain=active is not None), x_BxLxD, valid_BxL, ()
    )
  tok = p.tokens
  tok_BxL = PartitionSpec(*tok[:2])
  ep, tp = p.ep or None, p.tp or None
  rows = _rows(w, p, *active)
  w_specs = (
    PartitionSpec(ep, sharding.entry(rows[0]), tp),
    PartitionSpec(ep, sharding.entry(rows[1]), tp),
    PartitionSpec(ep, tp, sharding.entry(rows[2])),
  )
  token_axes = tuple(a for entry in tok for a in sharding.axes_of(entry))

  def body(router_params, w, x_BxLxD, valid_BxL):
    # The weights' D rows arrive as stored (FSDP) and are gathered here, so that their gradient
    # leaves as a reduce-scatter to each device's rows: given whole, the shard_map's transpose
    # summed every expert's whole gradient over every device, then kept a slice. w_gate's and
    # w_up's rows keep their stored layout (F minor), so that the relayout the backward loop's
    # recompute wants is made of one layer's rows here, not of the stacked weights
    # (`sharding.keep_layout`). w_down is left to the compiler: XLA:TPU stores it F minor where
    # its D share is not whole 128-lane tiles (448 on 4xv6e-256), and pinned, it was copied.
    w = (*map(sharding.keep_layout, w[:2]), w[2])
    w = tuple(sharding.gather(x, r, d) for x, r, d in zip(w, rows, _EMBED_DIMS, strict=True))
    if p.kind == "all_to_all":
      run = functools.partial(_all_to_all_experts, w=w, ep=p.ep, tp=p.tp)
    elif p.kind == "ragged_all_to_all":
      run = functools.partial(_ragged_all_to_all_experts, w=w, ep=p.ep, tp=p.tp, m=m)
    else:
      run = _local(w, p.tp, m.kernel)
    gates_travel = p.kind in ("all_to_all", "ragged_all_to_all")
    return _per_device(m, route, router_params, run, x_BxLxD, valid_BxL, token_axes, gates_travel)

  router_specs = jax.tree.map(lambda _: PartitionSpec(), router_params)
  sharded = jax.shard_map(
    body,
    mesh=active[0],
    in_specs=(router_specs, w_specs, tok, tok_BxL),
    out_specs=(tok, tok, tok, tok, PartitionSpec()),
    # Off: a Pallas kernel's outputs (megablox on TPU) carry no device-variance type. The
    # layer's values and gradients are tested against one device on every plan with it off.
    check_vma=False,
  )
  return sharded(router_params, w, x_BxLxD, valid_BxL)


_EMBED_DIMS = tuple(names.index("embed") for names in WEIGHT_AXES)  # each expert weight's D


def _rows(w: Weights, p: Plan, mesh: Mesh, rules: sharding.Rules) -> tuple[tuple[str, ...], ...]:
  """The mesh axes each expert weight's D dimension is stored split over (`embed`, FSDP's),
  less the experts' and hidden dim's axes, which the shard_map keeps split."""
  kept = set(p.ep) | set(p.tp)
  return tuple(
    tuple(a for a in sharding.axes_of(sharding.spec(names, x.shape, mesh, rules)[d]) if a not in kept)
    for names, x, d in zip(WEIGHT_AXES, w, _EMBED_DIMS, strict=True)
  )


def _per_device(
  m: MoEConfig, route: Route, router_params, run: RunExperts, x_BxLxD, valid_BxL, token_axes, gates_travel=False
):
  b, l, d = x_BxLxD.shape
  x_TxD = x_BxLxD.reshape(b * l, d)
  gates_TxK, experts_TxK, scores_TxE, logits_TxE = route(router_params, x_TxD)
  y_TxD, dropped = _routed(m, x_TxD, experts_TxK, gates_TxK, valid_BxL.reshape(-1).astype(jnp.int32), run, gates_travel)
  if token_axes:
    dropped = jax.lax.psum(dropped, token_axes)
  return (
    y_TxD.reshape(b, l, d),
    experts_TxK.reshape(b, l, -1),
    scores_TxE.reshape(b, l, -1),
    logits_TxE.reshape(b, l, -1),
    dropped,
  )


def _routed(m: MoEConfig, x_TxD, experts_TxK, gates_TxK, valid_T, run_experts: RunExperts, gates_travel=False):
  """Gate-weighted sum of each token's routed experts, and the dropped token-slots.

  The T x K token-slots ("rows", row r = token r // K, choice r % K) are sorted by expert, and
  moved there and back by gathers with the inverse permutation (`_take_rows`), so neither pass
  scatters. Dropless: all rows, in token order within an expert. Capacity: an expert's buffer
  takes its first C rows of valid tokens, first choices first, then by token order (GShard's
  priority); the rest are dropped.

  With `gates_travel` (the plans that send rows to other devices) each row's gate goes with it
  and weighs the row where its expert runs (`RunExperts` says how), and what comes back is only
  summed; else the outputs are weighed once back, where a partitioner is left to place them
  (gspmd: XLA's SPMD partitioner aborted on the weighing inside, in a data replica's shard_map)."""
  t, d = x_TxD.shape
  k = experts_TxK.shape[1]
  e = m.num_experts
  gates_R = gates_TxK.reshape(t * k).astype(jnp.float32) if gates_travel else None
  if m.mode == "dropless":
    keys_R = experts_TxK.reshape(-1)
    row_O = jnp.argsort(keys_R, stable=True)  # the row at each place in expert order
    pos_R = jnp.argsort(row_O)  # its inverse
    _, size_E = _groups(keys_R[row_O], e)
    gates_O = None if gates_R is None else _take_rows(gates_R, row_O, pos_R, 1)
    y_O, lost_O = run_experts(_take_rows(x_TxD, row_O, pos_R, k), gates_O, size_E)
    y_R = _take_rows(y_O, pos_R, row_O, 1)
    dropped = jnp.zeros((), jnp.int32) if lost_O is None else jnp.sum(lost_O * valid_T[row_O // k])
  else:
    cap = capacity(m, t)
    keys_KxT = jnp.where(valid_T[None] > 0, experts_TxK.T, e)  # choice-major; padding sorts last, unbuffered
    order_O = jnp.argsort(keys_KxT.reshape(-1), stable=True)
    row_O = (order_O % t) * k + order_O // t
    pos_R = jnp.argsort(row_O)
    sorted_O = keys_KxT.reshape(-1)[order_O]
    start_E, size_E = _groups(sorted_O, e)
    # Buffer slot (expert i, c) holds sorted position start_i + c while c < size_i; else nothing (t k).
    c_C = jnp.arange(cap)
    at_ExC = jnp.minimum(start_E[:, None] + c_C[None], t * k - 1)
    src_ExC = jnp.where(c_C[None] < size_E[:, None], row_O[at_ExC], t * k)
    expert_R = sorted_O[pos_R]
    c_R = pos_R - start_E[jnp.minimum(expert_R, e - 1)]
    dst_R = jnp.where((expert_R < e) & (c_R < cap), expert_R * cap + c_R, e * cap)
    buf_ExCxD = _take_rows(x_TxD, src_ExC.reshape(-1), dst_R, k).reshape(e, cap, d)
    gates_ExC = None if gates_R is None else _take_rows(gates_R, src_ExC.reshape(-1), dst_R, 1).reshape(e, cap)
    y_ExCxD = run_experts(buf_ExCxD, gates_ExC, None)[0]
    y_R = _take_rows(y_ExCxD.reshape(e * cap, d), dst_R, src_ExC.reshape(-1), 1)
    dropped = jnp.sum(jnp.maximum(size_E - cap, 0))
  y_TxKxD = y_R.reshape(t, k, d)
  if gates_R is not None:
    return y_TxKxD.sum(1, dtype=jnp.float32).astype(y_R.dtype), dropped
  return jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype)), dropped


def _groups(sorted_keys: jax.Array, e: int) -> tuple[jax.Array, jax.Array]:
  """(first position, count) of each of the e keys in a sorted array (keys >= e not counted)."""
  ids = jnp.arange(e, dtype=sorted_keys.dtype)
  start = jnp.searchsorted(sorted_keys, ids, side="left").astype(jnp.int32)
  return start, jnp.searchsorted(sorted_keys, ids, side="right").astype(jnp.int32) - start


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _take_rows(x_IxD: jax.Array, idx_J: jax.Array, inv: jax.Array, group: int) -> jax.Array:
  """Row j of the result is row idx_J[j] // group of x (zeros where idx_J[j] >= I group): a
  token's row repeated `group` times, then permuted. inv is the inverse map (a repeated row's
  index -> j, or an index past the result where nothing took it), so the backward pass is a
  gather too, and the repeats' cotangents add up by a sum over them instead of a scatter-add."""
  del inv
  return x_IxD.at[idx_J // group].get(mode="fill", fill_value=0)


def _take_rows_fwd(x_IxD, idx_J, inv, group):
  return _take_rows(x_IxD, idx_J, inv, group), (inv, x_IxD.shape[0])


def _take_rows_bwd(group, res, g_JxD):
  inv, n = res
  g = g_JxD.at[inv].get(mode="fill", fill_value=0)
  return g.reshape(n, group, *g.shape[1:]).sum(1), None, None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


# ---- The exchanges ------------------------------------------------------------------------


def _local(w: Weights, tp: tuple[str, ...], kernel: str, constrain: bool = False) -> RunExperts:
  """Every expert here: nothing to send. Under gspmd (constrain) the buffers carry the experts'
  layout, so the compiler splits them as the weights are split."""

  def run(rows, gates, group_sizes_E):
    del gates  # None: nothing travels, so `_routed` weighs the outputs once back
    if group_sizes_E is None:
      if constrain:
        rows = sharding.constrain(rows, ("experts", None, "act_embed"))
      y = swiglu_batched(rows, w)
    else:
      y = swiglu_ragged(rows, w, group_sizes_E, kernel)
    return (jax.lax.psum(y, tp) if tp else y), None  # tp: partial sums over the split hidden dim

  return run


def _all_to_all_experts(buf_ExCxD, gates_ExC, group_sizes_E, *, w: Weights, ep, tp):
  """This device's capacity buffers for every expert and their gates -> (the experts' weighted
  outputs for them, None)."""
  del group_sizes_E
  e, c, d = buf_ExCxD.shape
  e_loc = w[0].shape[0]
  p = e // e_loc  # devices in the all-to-all group, each holding e_loc consecutive experts

  def there(a):  # the ExCxD buffers or their ExC gates -> UxAxD or UxA
    rest = a.shape[2:]
    recv = jax.lax.all_to_all(a.reshape(p, e_loc, c, *rest), ep, 0, 0)  # P: source
    return recv.swapaxes(0, 1).reshape(e_loc, p * c, *rest)

  y_UxAxD = swiglu_batched(there(buf_ExCxD), w, there(gates_ExC))
  if tp:
    y_UxAxD = jax.lax.psum(y_UxAxD, tp)  # partial sums over the split hidden dim
  y_PxUxCxD = y_UxAxD.reshape(e_loc, p, c, d).swapaxes(0, 1)
  return jax.lax.all_to_all(y_PxUxCxD, ep, 0, 0).reshape(e, c, d), None


def _ragged_all_to_all_experts(x_NxD, gates_N, group_sizes_E, *, w: Weights, ep, tp, m: MoEConfig):
  """This device's rows sorted by expert (group_sizes_E per expert) and their gates -> (the
  experts' weighted outputs, the rows dropped for want of room where they were sent, or None when
  the buffer holds the worst case)."""
  n_rows, d = x_NxD.shape
  e = group_sizes_E.shape[0]
  e_loc = w[0].shape[0]
  p = e // e_loc  # devices in the group; device j holds experts [j e_loc, (j + 1) e_loc)
  send_PxU = group_sizes_E.reshape(p, e_loc)
  send_sizes_P = send_PxU.sum(1)
  send_offsets_P = jnp.cumsum(send_sizes_P) - send_sizes_P
  recv_PxU = jax.lax.all_to_all(send_PxU, ep, 0, 0)  # [source, local expert]: rows coming here
  rows, worst = receive_rows(m, p, n_rows)
  lost_N = None
  if rows < worst:
    # On overflow every source keeps the same share of what it sends here (floors of a cumulative
    # split, so the shares sum to at most `rows`), the head of its rows, which are in expert
    # order; it learns how many arrived.
    sizes_P = recv_PxU.sum(1)
    end_P, total = jnp.cumsum(sizes_P), sizes_P.sum()
    kept_end_P = jnp.minimum(jnp.floor(end_P * (rows / jnp.maximum(total, 1))), rows).astype(end_P.dtype)
    kept_end_P = jnp.where(total > rows, kept_end_P, end_P)
    quota_P = jnp.minimum(jnp.diff(kept_end_P, prepend=0), sizes_P)
    end_PxU = jnp.cumsum(recv_PxU, axis=1)
    recv_PxU = jnp.clip(quota_P[:, None] - (end_PxU - recv_PxU), 0, recv_PxU)
    send_sizes_P = jax.lax.all_to_all(recv_PxU.sum(1), ep, 0, 0, tiled=True)
    row_N = jnp.arange(n_rows, dtype=send_offsets_P.dtype)
    dest_N = jnp.searchsorted(send_offsets_P, row_N, side="right") - 1  # destination of each row
    lost_N = row_N - send_offsets_P[dest_N] >= send_sizes_P[dest_N]
  recv_sizes_P = recv_PxU.sum(1)
  recv_offsets_P = jnp.cumsum(recv_sizes_P) - recv_sizes_P  # source s's rows land here
  # ragged_all_to_all wants, per destination, where the rows land there: its recv_offsets[me].
  dest_offsets_P = jax.lax.all_to_all(recv_offsets_P, ep, 0, 0, tiled=True)

  def there(a):  # the NxD rows or their N gates -> QxD or Q
    buffer = jnp.zeros_like(a, shape=(rows, *a.shape[1:]))
    return ragged_all_to_all(a, buffer, send_offsets_P, send_sizes_P, dest_offsets_P, recv_sizes_P, axis_name=ep)

  recv_QxD, gates_Q = there(x_NxD), there(gates_N)
  # Arrived source-major, then by local expert; the experts want them expert-major.
  bounds = jnp.cumsum(recv_PxU.reshape(-1))
  segment_Q = jnp.searchsorted(bounds, jnp.arange(rows, dtype=bounds.dtype), side="right")
  expert_Q = jnp.where(segment_Q < p * e_loc, segment_Q % e_loc, e_loc)  # padding rows last
  order = jnp.argsort(expert_Q, stable=True)
  inverse = jnp.argsort(order)

  def expert_order(a):  # the arrived rows or their gates, sorted by local expert
    return _take_rows(a, order, inverse, 1)

  y_sorted = swiglu_ragged(expert_order(recv_QxD), w, recv_PxU.sum(0), m.kernel, expert_order(gates_Q))
  if tp:
    y_sorted = jax.lax.psum(y_sorted, tp)  # partial sums over the split hidden dim
  y_QxD = _take_rows(y_sorted, inverse, order, 1)
  # Back the same way: each source's rows return to where it sent them from (dropped ones stay 0).
  y_NxD = ragged_all_to_all(
    y_QxD,
    jnp.zeros_like(y_QxD, shape=(n_rows, d)),
    recv_offsets_P,
    recv_sizes_P,
    jax.lax.all_to_all(send_offsets_P, ep, 0, 0, tiled=True),
    send_sizes_P,
    axis_name=ep,
  )
  return y_NxD, lost_N
