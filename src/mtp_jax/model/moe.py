"""Mixture-of-experts FFN: router, routed experts (dropless or capacity), shared experts.

The layer returns its auxiliary terms explicitly (`MoEAux`): the sequence-wise balance loss,
router z-loss, per-expert load and the number of dropped token-slots. The aux-loss-free
bias (DeepSeek-V3 eq. 16) lives in a `RouterBias` variable, outside the parameters, so the
optimizer and weight decay never see it; the train step moves it with `update_bias`.

Expert parallelism (`model.moe.dispatch`, chosen by `dispatch_plan`): routing stays under
GSPMD; when the experts are split over mesh axes that also split the tokens, dispatch,
expert compute and combine run in a `shard_map` that sends each token to the devices owning
its experts and back:
- all_to_all (capacity mode, every backend): each device fills (E, C_local, D) buffers from its
  own tokens, C_local = capacity(cfg, local tokens), and exchanges them with `all_to_all`.
  Capacity is per source device, so what overflows can differ from the one-device capacity
  mode (one global C); with nothing dropped (e.g. capacity_factor >= E / K) both equal the
  dropless result.
- ragged_all_to_all (dropless; GPU and TPU): per-expert counts are exchanged first, then the
  sorted rows themselves with `ragged_all_to_all` into a worst-case sized buffer, or one of
  `ragged_buffer_factor` x the rows each device sends, where rows beyond it are dropped.
Expert weights split over further axes (`expert_mlp -> tensor`) see the same tokens on every
device of those axes; the down projection's partial sums are added with a psum there.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from mtp_jax import sharding
from mtp_jax.config import ConfigError, ModelConfig, MoEConfig
from mtp_jax.model.layers import MLP, weight

# The dropless collective, looked up at trace time: CPU has no ragged_all_to_all, so the tests
# put an exact emulation here. Anything other than the jax primitive counts as available.
ragged_all_to_all = jax.lax.ragged_all_to_all


class RouterBias(nnx.Variable):
  """Per-expert selection bias: updated by a sign rule after each step, never by gradients."""


@chex.dataclass
class MoEAux:
  balance_loss: jax.Array  # scalar, already weighted by alpha
  z_loss: jax.Array  # scalar, already weighted
  load: jax.Array  # E: token-slots routed to each expert (valid tokens only)
  dropped: jax.Array  # scalar: token-slots dropped for lack of capacity, over all devices


class Router(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m = cfg.moe
    self.kernel = weight(rngs, (cfg.d_model, m.num_experts), ("embed", None), cfg.init_std, jnp.float32)
    self.bias = RouterBias(jnp.zeros((m.num_experts,), jnp.float32), axes=(None,))
    self.cfg = m

  def __call__(self, x_TxD: jax.Array):
    """Returns (gates_TxK, experts_TxK, scores_TxE, logits_TxE); routing math in float32."""
    m = self.cfg
    logits_TxE = x_TxD.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32)
    scores_TxE = jax.nn.sigmoid(logits_TxE) if m.score_func == "sigmoid" else jax.nn.softmax(logits_TxE, -1)
    # The bias steers which experts are chosen, never how much they weigh (eq. 16).
    choice_TxE = scores_TxE + self.bias[...][None]
    if m.n_group > 1:
      t = choice_TxE.shape[0]
      grouped = choice_TxE.reshape(t, m.n_group, -1)
      group_score_TxG = jax.lax.top_k(grouped, 2)[0].sum(-1)
      _, keep_TxG = jax.lax.top_k(group_score_TxG, m.topk_group)
      keep = jnp.zeros_like(group_score_TxG, bool).at[jnp.arange(t)[:, None], keep_TxG].set(True)
      choice_TxE = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(t, -1)
    _, experts_TxK = jax.lax.top_k(choice_TxE, m.top_k)
    gates_TxK = jnp.take_along_axis(scores_TxE, experts_TxK, axis=-1)
    if m.norm_topk_prob:
      gates_TxK = gates_TxK / (gates_TxK.sum(-1, keepdims=True) + 1e-20)
    return gates_TxK * m.routed_scaling_factor, experts_TxK, scores_TxE, logits_TxE

  def update_bias(self, load_E: jax.Array, rate: float) -> None:
    """b_i += gamma * sign(mean load - load_i) (DeepSeek-V3 eq. 16)."""
    self.bias[...] = self.bias[...] + rate * jnp.sign(load_E.mean() - load_E)


Weights = tuple[jax.Array, jax.Array, jax.Array]  # w_gate ExDxF, w_up ExDxF, w_down ExFxD


# Where `swiglu_ragged` runs the blocked loop instead of lax.ragged_dot; read at trace time
# (benchmarks/moe_experts.py changes it to compare the two).
BLOCKED_BACKENDS = frozenset({"cpu"})


def swiglu_ragged(x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array) -> jax.Array:
  """Each expert's SwiGLU over its rows: rows sorted by expert, group_sizes_E of them to each in
  turn, rows past their sum giving zeros. TPU and GPU get `lax.ragged_dot`, left to their
  compilers (a grouped matmul on TPU; GPU: README, "Expert parallelism"); JAX lowers it for CPU
  as every row times every expert, masked (E times the FLOPs), so there the rows go in blocks of
  one expert (`swiglu_blocked`)."""
  if _platform() in BLOCKED_BACKENDS:
    return swiglu_blocked(x_NxD, w, group_sizes_E)
  return swiglu_ragged_dot(x_NxD, w, group_sizes_E)


def swiglu_ragged_dot(x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array) -> jax.Array:
  """`swiglu_ragged` through `lax.ragged_dot`, on any backend."""
  gate = jax.lax.ragged_dot(x_NxD, w[0], group_sizes_E)
  up = jax.lax.ragged_dot(x_NxD, w[1], group_sizes_E)
  return jax.lax.ragged_dot(jax.nn.silu(gate) * up, w[2], group_sizes_E)


def swiglu_blocked(x_NxD: jax.Array, w: Weights, group_sizes_E: jax.Array) -> jax.Array:
  """`swiglu_ragged` as dense blocks: each expert's rows are padded to whole blocks of R rows,
  and a loop multiplies each block by its own expert's weights, read in place (gathering every
  block's weights would copy them: slower than the masked product at decoding sizes). Blocks of
  R = N / 2E rows keep the padding under about half the rows, and the block count M static:
  sum over experts of ceil(g_e / R) <= (N + min(E, N)(R - 1)) / R."""
  n, d = x_NxD.shape
  e = group_sizes_E.shape[0]
  r = max(1, n // (2 * e))
  m = (n + min(e, n) * (r - 1)) // r
  blocks_E = (group_sizes_E + r - 1) // r
  end_row_E, end_block_E = jnp.cumsum(group_sizes_E), jnp.cumsum(blocks_E)
  row_N = jnp.arange(n, dtype=group_sizes_E.dtype)
  expert_N = jnp.searchsorted(end_row_E, row_N, side="right", method="compare_all")  # E past the last group
  ex_N = jnp.minimum(expert_N, e - 1)
  # A row's slot: its expert's first block, then its place in its group; past the groups, out of range.
  slot_N = (end_block_E - blocks_E)[ex_N] * r + row_N - (end_row_E - group_sizes_E)[ex_N]
  slot_N = jnp.where(expert_N < e, slot_N, m * r)
  x_MxRxD = jnp.zeros((m * r, d), x_NxD.dtype).at[slot_N].set(x_NxD, mode="drop").reshape(m, r, d)
  # Unused blocks (zero rows) take the last expert.
  expert_M = jnp.minimum(jnp.searchsorted(end_block_E, jnp.arange(m), side="right", method="compare_all"), e - 1)

  def block(_, rows):  # one block per iteration: swiglu_batched with one expert
    x_RxD, i = rows
    return None, swiglu_batched(x_RxD[None], tuple(jax.lax.dynamic_slice_in_dim(wi, i, 1) for wi in w))[0]

  y_MxRxD = jax.lax.scan(block, None, (x_MxRxD, expert_M))[1]
  return y_MxRxD.reshape(m * r, d).at[slot_N].get(mode="fill", fill_value=0)


def _platform() -> str:
  """The backend the layer is being traced for: the active mesh's, else JAX's default."""
  active = sharding.active()
  return active[0].devices.flat[0].platform if active else jax.default_backend()


def swiglu_batched(x_ExCxD: jax.Array, w: Weights) -> jax.Array:
  gate = jnp.einsum("ecd,edf->ecf", x_ExCxD, w[0])
  up = jnp.einsum("ecd,edf->ecf", x_ExCxD, w[1])
  return jnp.einsum("ecf,efd->ecd", jax.nn.silu(gate) * up, w[2])


class Experts(nnx.Module):
  """E SwiGLU experts with stacked weights."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f, std = cfg.moe.num_experts, cfg.d_model, cfg.moe.expert_d_ff, cfg.init_std
    pdt = jnp.dtype(cfg.param_dtype)
    self.w_gate = weight(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pdt)
    self.w_up = weight(rngs, (e, d, f), ("experts", "embed", "expert_mlp"), std, pdt)
    self.w_down = weight(rngs, (e, f, d), ("experts", "expert_mlp", "embed"), std, pdt)
    self.dtype = jnp.dtype(cfg.dtype)

  def weights(self) -> Weights:
    return tuple(w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))

  def ragged(self, x_NxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """Rows of x sorted by expert; group_sizes_E rows go to each expert in turn."""
    return swiglu_ragged(x_NxD, self.weights(), group_sizes_E)

  def batched(self, x_ExCxD: jax.Array) -> jax.Array:
    """One fixed-size buffer of rows per expert."""
    return swiglu_batched(x_ExCxD, self.weights())


def capacity(cfg: MoEConfig, num_tokens: int) -> int:
  return max(1, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))


def dispatch_slots(experts_TxK: jax.Array, valid_T: jax.Array, num_experts: int, cap: int):
  """Slot of each (token, choice) in its expert's buffer, first choices first, then by
  token order (GShard-style priority); slots >= cap overflow and are dropped."""
  t, k = experts_TxK.shape
  onehot_KxTxE = jax.nn.one_hot(experts_TxK.T, num_experts, dtype=jnp.int32) * valid_T[None, :, None]
  rank = jnp.cumsum(onehot_KxTxE.reshape(k * t, num_experts), axis=0).reshape(k, t, num_experts) - 1
  slot_TxK = jnp.take_along_axis(rank, experts_TxK.T[..., None], axis=-1)[..., 0].T
  keep_TxK = (slot_TxK < cap) & valid_T[:, None].astype(bool)
  return slot_TxK, keep_TxK


# ---- Choosing the dispatch ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  kind: str  # gspmd | all_to_all | ragged_all_to_all
  note: str | None = None
  ep: tuple[str, ...] = ()  # mesh axes the experts are split over (the all-to-all group)
  tp: tuple[str, ...] = ()  # mesh axes the expert hidden dim is split over (tokens replicated)
  tokens: PartitionSpec | None = None  # of the B x L x D tokens inside the shard_map


def dispatch_plan(
  cfg: MoEConfig, mesh: Mesh | None, rules: sharding.Rules, tokens_BxL: Sequence[int] | None = None
) -> tuple[str, str | None]:
  """The dispatch the MoE layers will use on this mesh (gspmd, all_to_all or
  ragged_all_to_all) and a one-line note when it is not what the config asked for; gspmd also
  means no expert parallelism at all. tokens_BxL (the microbatch shape) lets the note see when
  the rules would not split the tokens there. Raises ConfigError for an explicit
  ragged_all_to_all on a backend without it."""
  p = _plan(cfg, mesh, rules, tokens_BxL)
  return p.kind, p.note


def _plan(cfg: MoEConfig, mesh: Mesh | None, rules: sharding.Rules, tokens_BxL=None) -> _Plan:
  want = cfg.dispatch
  if mesh is None or not cfg.num_experts:
    return _Plan("gspmd")
  platform = mesh.devices.flat[0].platform
  has_ragged = platform != "cpu" or ragged_all_to_all is not jax.lax.ragged_all_to_all
  if want == "ragged_all_to_all" and not has_ragged:
    raise ConfigError(
      f"config error: model.moe.dispatch: ragged_all_to_all is not implemented on the {platform} backend; "
      "use auto or gspmd (or all_to_all with model.moe.mode=capacity)"
    )
  if want == "gspmd":
    return _Plan("gspmd")
  w_spec = _expert_weight_spec(cfg, mesh, rules)
  ep = _axes(w_spec[0])
  if not ep:  # nothing to exchange: the one-device code path, under GSPMD
    why = f"model.moe.dispatch={want}: the experts are not split over any mesh axis; they run where the tokens are"
    return _Plan("gspmd", None if want == "auto" else why)
  kind = want
  if want == "auto":
    kind = "all_to_all" if cfg.mode == "capacity" else "ragged_all_to_all" if has_ragged else "gspmd"
  if kind == "gspmd":
    return _Plan(
      "gspmd",
      f"model.moe.dispatch=auto: ragged_all_to_all is not implemented on the {platform} backend; dropless "
      f"experts over {_names(ep)} use gspmd (model.moe.mode=capacity uses the all_to_all)",
    )
  if tokens_BxL is None:
    tokens, token_axes = None, {a for n in ("act_batch", "act_length") for a in rules.get(n, []) if mesh.shape[a] > 1}
  else:
    tokens = sharding.spec(("act_batch", "act_length", None), (*tokens_BxL, 1), mesh, rules)
    token_axes = {a for entry in tokens for a in _axes(entry)}
  if missing := [a for a in ep if a not in token_axes]:
    return _Plan(
      "gspmd",
      f"model.moe.dispatch={want}: the tokens are not split over {_names(missing)} (mesh.rules.act_batch, "
      f"act_length) as the experts are; {kind} needs them there, so the experts use gspmd",
    )
  tp = tuple(a for a in _axes(w_spec[2]) if a not in token_axes)
  return _Plan(kind, None, ep, tp, tokens)


def _expert_weight_spec(cfg: MoEConfig, mesh: Mesh, rules: sharding.Rules) -> PartitionSpec:
  """How the ExDxF expert weights split: experts over spec[0], their hidden dim over spec[2]."""
  return sharding.spec(("experts", None, "expert_mlp"), (cfg.num_experts, 1, cfg.expert_d_ff), mesh, rules)


def expert_group(cfg: MoEConfig, mesh: Mesh, rules: sharding.Rules) -> int:
  """Devices the experts are split over (1: every device holds them all)."""
  return math.prod(mesh.shape[a] for a in _axes(_expert_weight_spec(cfg, mesh, rules)[0]))


def receive_rows(cfg: MoEConfig, group: int, n_rows: int) -> tuple[int, int]:
  """ragged_all_to_all over `group` devices that each send `n_rows` rows (token-slots): (the rows
  each receives into, the worst case, every device's rows for its experts arriving at one)."""
  worst = group * (n_rows // cfg.top_k) * min(cfg.top_k, cfg.num_experts // group)
  if not cfg.ragged_buffer_factor:
    return worst, worst
  return min(worst, math.ceil(cfg.ragged_buffer_factor * n_rows)), worst


def _axes(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _names(axes) -> str:
  return f"the {' x '.join(axes)} mesh axis" + ("es" if len(axes) > 1 else "")


# ---- The layer ----------------------------------------------------------------------------


class MoE(nnx.Module):
  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    m = cfg.moe
    self.router = Router(cfg, rngs=rngs)
    self.experts = Experts(cfg, rngs=rngs)
    self.shared = nnx.data(None)
    if m.num_shared_experts:
      self.shared = MLP(
        cfg.d_model,
        m.num_shared_experts * m.expert_d_ff,
        rngs=rngs,
        std=cfg.init_std,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
      )
    self.cfg = m

  def __call__(self, x_BxLxD: jax.Array, valid_BxL: jax.Array) -> tuple[jax.Array, MoEAux]:
    m = self.cfg
    b, l, d = x_BxLxD.shape
    e, k = m.num_experts, m.top_k
    x_TxD = x_BxLxD.reshape(b * l, d)
    valid_T = valid_BxL.reshape(-1).astype(jnp.int32)
    gates_TxK, experts_TxK, scores_TxE, logits_TxE = self.router(x_TxD)

    active = sharding.active()
    plan = _plan(m, *active, (b, l)) if active else _Plan("gspmd")
    if plan.kind == "gspmd":
      w = self.experts.weights()

      def run_experts(rows, group_sizes_E):
        if group_sizes_E is not None:
          return swiglu_ragged(rows, w, group_sizes_E), None
        return swiglu_batched(sharding.constrain(rows, ("experts", None, "act_embed")), w), None

      y_TxD, dropped = _routed(m, x_TxD, experts_TxK, gates_TxK, valid_T, run_experts)
      y_BxLxD = y_TxD.reshape(b, l, d)
    else:
      routing = (experts_TxK.reshape(b, l, k), gates_TxK.reshape(b, l, k), valid_BxL)
      y_BxLxD, dropped = _expert_parallel(m, plan, active[0], self.experts.weights(), x_BxLxD, *routing)
    if self.shared is not None:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)

    chosen_TxE = jax.nn.one_hot(experts_TxK, e, dtype=jnp.float32).sum(1) * valid_T[:, None]
    aux = MoEAux(
      balance_loss=m.balance_loss_weight
      * sequence_balance_loss(chosen_TxE.reshape(b, l, e), scores_TxE.reshape(b, l, e), valid_BxL, k),
      z_loss=m.z_loss_weight * _masked_mean(jax.nn.logsumexp(logits_TxE, -1) ** 2, valid_T),
      load=chosen_TxE.sum(0),
      dropped=dropped,
    )
    return y_BxLxD, aux


def _routed(m: MoEConfig, x_TxD, experts_TxK, gates_TxK, valid_T, run_experts):
  """Gate-weighted sum of each token's routed experts, and the dropped token-slots.
  run_experts(rows sorted by expert, group_sizes_E) in dropless mode, run_experts(buffers
  ExCxD, None) in capacity mode: where the experts are computed is its business. It returns
  the experts' outputs and, in dropless mode, which rows it dropped (None: none), their
  outputs zero."""
  t, d = x_TxD.shape
  k = experts_TxK.shape[1]
  if m.mode == "dropless":
    flat = experts_TxK.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes_E = jnp.bincount(flat, length=m.num_experts).astype(jnp.int32)
    y_sorted, lost_N = run_experts(x_TxD[order // k], group_sizes_E)
    y_TxKxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted).reshape(t, k, d)
    dropped = jnp.zeros((), jnp.int32) if lost_N is None else jnp.sum(lost_N * valid_T[order // k])
  else:
    cap = capacity(m, t)
    slot_TxK, keep_TxK = dispatch_slots(experts_TxK, valid_T, m.num_experts, cap)
    slot_TxK = jnp.where(keep_TxK, slot_TxK, cap)  # out of range: dropped by the scatter
    buf_ExCxD = (
      jnp.zeros_like(x_TxD, shape=(m.num_experts, cap, d))
      .at[experts_TxK, slot_TxK]
      .set(jnp.broadcast_to(x_TxD[:, None], (t, k, d)), mode="drop")
    )
    y_TxKxD = run_experts(buf_ExCxD, None)[0].at[experts_TxK, slot_TxK].get(mode="fill", fill_value=0)
    dropped = jnp.sum(valid_T[:, None] * (1 - keep_TxK.astype(jnp.int32)))
  return jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype)), dropped


def _expert_parallel(m: MoEConfig, plan: _Plan, mesh: Mesh, w: Weights, x_BxLxD, experts_BxLxK, gates_BxLxK, valid_BxL):
  """(y_BxLxD, dropped) in a shard_map: each device sends its own tokens to the devices
  holding their experts (over plan.ep) and combines what comes back."""
  tok = plan.tokens
  tok_BxL = PartitionSpec(*tok[:2])
  ep, tp = plan.ep, plan.tp or None
  w_specs = (PartitionSpec(ep, None, tp), PartitionSpec(ep, None, tp), PartitionSpec(ep, tp, None))
  token_axes = tuple(a for entry in tok for a in _axes(entry))
  exchange = _all_to_all_experts if plan.kind == "all_to_all" else _ragged_all_to_all_experts

  def local(x_BxLxD, experts_BxLxK, gates_BxLxK, valid_BxL, w):
    b, l, d = x_BxLxD.shape
    k = experts_BxLxK.shape[-1]
    y_TxD, dropped = _routed(
      m,
      x_BxLxD.reshape(b * l, d),
      experts_BxLxK.reshape(b * l, k),
      gates_BxLxK.reshape(b * l, k),
      valid_BxL.reshape(-1).astype(jnp.int32),
      lambda rows, group_sizes_E: exchange(rows, group_sizes_E, w, plan.ep, plan.tp, m),
    )
    return y_TxD.reshape(b, l, d), jax.lax.psum(dropped, token_axes)

  sharded = jax.shard_map(
    local, mesh=mesh, in_specs=(tok, tok, tok, tok_BxL, w_specs), out_specs=(tok, PartitionSpec()), check_vma=True
  )
  return sharded(x_BxLxD, experts_BxLxK, gates_BxLxK, valid_BxL, w)


def _all_to_all_experts(buf_ExCxD, group_sizes_E, w: Weights, ep, tp, m: MoEConfig):
  """This device's capacity buffers for every expert -> (the experts' outputs for them, None)."""
  del group_sizes_E, m
  e, c, d = buf_ExCxD.shape
  e_loc = w[0].shape[0]
  n = e // e_loc  # devices in the all-to-all group, each holding e_loc consecutive experts
  recv_NxExCxD = jax.lax.all_to_all(buf_ExCxD.reshape(n, e_loc, c, d), ep, 0, 0)  # leading axis: source
  y_ExRxD = swiglu_batched(recv_NxExCxD.swapaxes(0, 1).reshape(e_loc, n * c, d), w)
  if tp:
    y_ExRxD = jax.lax.psum(y_ExRxD, tp)  # partial sums over the split hidden dim
  y_NxExCxD = y_ExRxD.reshape(e_loc, n, c, d).swapaxes(0, 1)
  return jax.lax.all_to_all(y_NxExCxD, ep, 0, 0).reshape(e, c, d), None


def _ragged_all_to_all_experts(x_NxD, group_sizes_E, w: Weights, ep, tp, m: MoEConfig):
  """This device's rows sorted by expert (group_sizes_E per expert) -> (the experts' outputs,
  the rows dropped for want of room where they were sent, or None when the buffer holds the
  worst case)."""
  n_rows, d = x_NxD.shape
  e = group_sizes_E.shape[0]
  e_loc = w[0].shape[0]
  p = e // e_loc  # devices in the group; device j holds experts [j e_loc, (j + 1) e_loc)
  send_PxE = group_sizes_E.reshape(p, e_loc)
  send_sizes_P = send_PxE.sum(1)
  send_offsets_P = jnp.cumsum(send_sizes_P) - send_sizes_P
  recv_PxE = jax.lax.all_to_all(send_PxE, ep, 0, 0)  # [source, local expert]: rows coming here
  rows, worst = receive_rows(m, p, n_rows)
  lost_N = None
  if rows < worst:
    # On overflow every source keeps the same share of what it sends here (floors of a cumulative
    # split, so the shares sum to at most `rows`), the head of its rows, which are in expert
    # order; it learns how many arrived.
    sizes_P = recv_PxE.sum(1)
    end_P, total = jnp.cumsum(sizes_P), sizes_P.sum()
    kept_end_P = jnp.minimum(jnp.floor(end_P * (rows / jnp.maximum(total, 1))), rows).astype(end_P.dtype)
    kept_end_P = jnp.where(total > rows, kept_end_P, end_P)
    quota_P = jnp.minimum(jnp.diff(kept_end_P, prepend=0), sizes_P)
    end_PxE = jnp.cumsum(recv_PxE, axis=1)
    recv_PxE = jnp.clip(quota_P[:, None] - (end_PxE - recv_PxE), 0, recv_PxE)
    send_sizes_P = jax.lax.all_to_all(recv_PxE.sum(1), ep, 0, 0, tiled=True)
    row_N = jnp.arange(n_rows, dtype=send_offsets_P.dtype)
    dest_N = jnp.searchsorted(send_offsets_P, row_N, side="right") - 1  # destination of each row
    lost_N = row_N - send_offsets_P[dest_N] >= send_sizes_P[dest_N]
  recv_sizes_P = recv_PxE.sum(1)
  recv_offsets_P = jnp.cumsum(recv_sizes_P) - recv_sizes_P  # source s's rows land here
  # ragged_all_to_all wants, per destination, where the rows land there: its recv_offsets[me].
  dest_offsets_P = jax.lax.all_to_all(recv_offsets_P, ep, 0, 0, tiled=True)
  recv_RxD = ragged_all_to_all(
    x_NxD,
    jnp.zeros_like(x_NxD, shape=(rows, d)),
    send_offsets_P,
    send_sizes_P,
    dest_offsets_P,
    recv_sizes_P,
    axis_name=ep,
  )
  # Arrived source-major, then by local expert; ragged_dot wants them expert-major.
  bounds = jnp.cumsum(recv_PxE.reshape(-1))
  segment_R = jnp.searchsorted(bounds, jnp.arange(rows, dtype=bounds.dtype), side="right")
  expert_R = jnp.where(segment_R < p * e_loc, segment_R % e_loc, e_loc)  # padding rows last
  order = jnp.argsort(expert_R, stable=True)
  y_sorted = swiglu_ragged(recv_RxD[order], w, recv_PxE.sum(0))
  if tp:
    y_sorted = jax.lax.psum(y_sorted, tp)  # partial sums over the split hidden dim
  y_RxD = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
  # Back the same way: each source's rows return to where it sent them from (dropped ones stay 0).
  y_NxD = ragged_all_to_all(
    y_RxD,
    jnp.zeros_like(y_RxD, shape=(n_rows, d)),
    recv_offsets_P,
    recv_sizes_P,
    jax.lax.all_to_all(send_offsets_P, ep, 0, 0, tiled=True),
    send_sizes_P,
    axis_name=ep,
  )
  return y_NxD, lost_N


def sequence_balance_loss(chosen_BxLxE, scores_BxLxE, valid_BxL, top_k: int) -> jax.Array:
  """Sum_i f_i P_i per sequence, averaged over sequences (DeepSeek-V3 eqs. 17-20):
  f_i = E / (K T) * tokens choosing i; P_i = mean normalised affinity of i."""
  e = scores_BxLxE.shape[-1]
  valid = valid_BxL.astype(jnp.float32)
  tokens_B = jnp.maximum(valid.sum(-1), 1.0)
  f_BxE = e / (top_k * tokens_B[:, None]) * chosen_BxLxE.sum(1)
  norm_BxLxE = scores_BxLxE / (scores_BxLxE.sum(-1, keepdims=True) + 1e-20)
  p_BxE = (norm_BxLxE * valid[..., None]).sum(1) / tokens_B[:, None]
  return jnp.mean(jnp.sum(f_BxE * p_BxE, -1))


def _masked_mean(x, valid):
  return jnp.sum(x * valid) / jnp.maximum(jnp.sum(valid), 1)
