"""The trunk, its blocks and the MTP depths wired together."""

from __future__ import annotations

from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mtp_jax import sharding
from mtp_jax.config import ModelConfig
from mtp_jax.model import accumulate, attention
from mtp_jax.model.layers import ACT, MLP, Embed, RMSNorm, weight
from mtp_jax.model.moe import MoE, MoEAux
from mtp_jax.model.mtp import SequentialModule, shift_left

# What a rematerialised block keeps for its backward pass; the rest it recomputes. The names
# are checkpoint names in attention.py (`attn_qkv`: the kernel's q, k, v; `attn_context`: its
# output, and splash's log-sum-exp) and experts.py (`moe_in`, `moe_out`: the rows each expert
# kernel runs on and its outputs, after the dispatch exchange and before the return one).
_ATTN, _MOE = ("attn_qkv", "attn_context"), ("moe_in", "moe_out")
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  "save_attn": jax.checkpoint_policies.save_only_these_names(*_ATTN),
  "save_moe": jax.checkpoint_policies.save_only_these_names(*_MOE),
  "save_attn_moe": jax.checkpoint_policies.save_only_these_names(*_ATTN, *_MOE),
}


def remat_policy(remat: str, save: Sequence[str] = (), offload: Sequence[str] = ()):
  """The jax.checkpoint policy of a `train.remat` preset that also keeps the checkpoint names
  in `save` (`train.remat_save`) and moves those in `offload` (`train.remat_offload`) to host
  memory until the backward pass reads them, or None for blocks not rematerialised. E.g. `full`
  keeping `moe_in` keeps only the rows the dispatch exchange brought, so the recompute runs no
  exchange (docs/scaling.md, "Where the experts run"); offloading `layer_in` takes a scanned
  stack's saved layer inputs out of HBM."""
  base = REMAT_POLICIES[remat]
  if base is None:
    return None
  if save:
    base = jax.checkpoint_policies.save_from_both_policies(base, jax.checkpoint_policies.save_only_these_names(*save))
  if not offload:
    return base
  to_host = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=(), names_which_can_be_offloaded=offload, offload_src="device", offload_dst="pinned_host"
  )

  def policy(prim, *args, **params):  # a named value in `offload` goes to host; the rest as `base` says
    if prim.name == "name" and params.get("name") in offload:
      return to_host(prim, *args, **params)
    return base(prim, *args, **params)

  return policy


@chex.dataclass
class ModelOutput:
  hidden: list  # per depth (0 = next token), BxLxD, normed and ready for the output head
  aux: dict  # MoE layer name -> MoEAux


class Block(nnx.Module):
  """Pre-norm transformer block: attention, then a dense or MoE SwiGLU FFN."""

  def __init__(self, cfg: ModelConfig, *, moe: bool, rngs: nnx.Rngs, attention_chunk_len: int = 0):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.attn = attention.make(cfg, rngs=rngs, chunk_len=attention_chunk_len)
    self.ffn_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    if moe:
      self.ffn = MoE(cfg, rngs=rngs)
    else:
      self.ffn = MLP(cfg.d_model, cfg.d_ff, rngs=rngs, std=cfg.init_std, dtype=dt, param_dtype=pdt)

  def __call__(self, x_BxLxD, visible, positions_BxL, valid_BxL) -> tuple[jax.Array, MoEAux | None]:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), visible, positions_BxL)
    return self._ffn(x_BxLxD, valid_BxL)

  def empty_cache(self, batch: int, max_len: int) -> attention.GQACache | attention.MLACache:
    """This block's attention cache for `batch` rows of up to `max_len` positions."""
    return self.attn.empty_cache(batch, max_len)

  def decode(self, x_BxLxD, mask_BxLxS, positions_BxL, cache):
    """(x, cache): the block over new tokens at `positions_BxL`, attending over its cache
    (mask_BxLxS covers the cache's S slots; see `attention.cached_mask`)."""
    a_BxLxD, cache = self.attn(self.attn_norm(x_BxLxD), mask_BxLxS, positions_BxL, cache)
    x_BxLxD, _ = self._ffn(x_BxLxD + a_BxLxD, jnp.ones(x_BxLxD.shape[:2], bool))
    return x_BxLxD, cache

  def _ffn(self, x_BxLxD, valid_BxL) -> tuple[jax.Array, MoEAux | None]:
    h = self.ffn_norm(x_BxLxD)
    y, aux = self.ffn(h, valid_BxL) if isinstance(self.ffn, MoE) else (self.ffn(h), None)
    return sharding.constrain(x_BxLxD + y, ACT), aux


def _remat(policy):
  """Rematerialises a block: a pure function of its state, so plain jax.checkpoint applies
  (blocks never mutate their variables in the forward pass)."""

  def run(block: Block, *args):
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a), policy=policy)(state, *args)

  return run


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _axes(v: nnx.Variable) -> tuple:
  return tuple(v.get_metadata().get("axes") or (None,) * v.get_value().ndim)


def stack(blocks: list[Block]) -> Block:
  """Blocks of one structure as one block whose every variable has a leading `layers` axis,
  block i at index i: the layout the scan runs over and the state stores (as MaxText's), so no
  step stacks (and holds a stacked copy of) the weights it scans."""
  states = [nnx.state(b) for b in blocks]
  stacked = jax.tree.map(
    lambda *vs: vs[0].replace(jnp.stack([v.get_value() for v in vs]), axes=("layers", *_axes(vs[0]))),
    *states,
    is_leaf=_is_variable,
  )
  return nnx.merge(nnx.graphdef(blocks[0]), stacked)


def layer(stacked: Block, j: int, keep: bool = False) -> Block:
  """Block j of a stack, as its own (sliced) block; with `keep`, as a stack of that one block."""

  def one(v: nnx.Variable) -> nnx.Variable:
    x = v.get_value()
    return v.replace(x[j : j + 1], axes=_axes(v)) if keep else v.replace(x[j], axes=_axes(v)[1:])

  graphdef, state = nnx.split(stacked)
  return nnx.merge(graphdef, jax.tree.map(one, state, is_leaf=_is_variable))


def _scan(stacked: Block, policy, x_BxLxD, *args, acc=None) -> tuple[jax.Array, MoEAux | None]:
  """Runs a stack's blocks in turn as one `lax.scan` over its variables: the same function as
  calling them one by one, but XLA sees one layer. It compiles it once, and gathers a layer's
  sharded weights inside the loop, when that layer runs: unrolled, XLA can hoist every layer's
  gathers out of the microbatch loop and hold all the gathered weights at once. Returns the
  blocks' aux stacked, block i at index i. `policy`: the blocks' checkpoint policy, None for no remat.
  `acc`: a gradient accumulator for the stack's parameters (`accumulate`), or None: with one,
  the backward loop adds each layer's gradient into its row and the parameters get none."""
  graphdef, params, rest = nnx.split(stacked, nnx.Param, ...)

  def body(carry, xs):
    params, rest, i = xs
    x, acc = carry
    x = checkpoint_name(x, "layer_in")  # what the scan saves of each layer for its backward pass
    if acc is not None:
      params, acc = accumulate.into_row(params, acc, i.astype(jnp.int32))
    # XLA moves a layer's cast to the compute dtype up through the loop's slice of the stack and
    # then out of every loop (XLA:TPU does, 0.95 GiB a chip on the small step): a compute-dtype
    # copy of the whole stack, held through the step. A zero made from the loop index (i * 0 is
    # not folded for floats) keeps each layer's cast in the loop; adding it changes no weight.
    zero = i * 0.0
    params, rest = jax.tree.map(
      lambda w: w + zero.astype(w.dtype) if jnp.issubdtype(w.dtype, jnp.floating) else w, (params, rest)
    )
    x, aux = nnx.merge(graphdef, params, rest)(x, *args)
    return (x, acc), aux

  if policy is not None:
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
  n = jax.tree.leaves(params)[0].shape[0]
  (x, acc_out), aux = jax.lax.scan(body, (x_BxLxD, acc), (params, rest, jnp.arange(n, dtype=jnp.float32)))
  if acc is not None:
    x = accumulate.start(x, acc_out, acc)
  return x, aux


def stacks(cfg: ModelConfig) -> tuple[tuple[int, int], ...]:
  """(start, stop) of each stack of trunk blocks (see `stack`): consecutive blocks of one
  structure (the dense first layers, then the MoE ones); the parallel kind's last block, its
  next-token head, alone. Stack r is stored as `layers.r`."""
  moe = [cfg.moe.num_experts > 0 and i >= cfg.first_k_dense for i in range(cfg.num_layers)]
  n_trunk = cfg.num_layers - (1 if cfg.mtp.kind == "parallel" else 0)
  runs: list[list[int]] = []
  for i in range(cfg.num_layers):
    if runs and i < n_trunk and moe[i] == moe[runs[-1][0]]:
      runs[-1][1] = i + 1
    else:
      runs.append([i, i + 1])
  return tuple((a, b) for a, b in runs)


def scanned(cfg: ModelConfig, scan_layers: bool) -> tuple[int, ...]:
  """The stacks (their index r, as `layers.r`) that the forward pass runs as one scan: with
  `train.scan_layers`, each trunk stack of more than one block (the parallel kind's last
  block, its next-token head, runs alone)."""
  runs = stacks(cfg)
  trunk = runs[:-1] if cfg.mtp.kind == "parallel" else runs
  return tuple(r for r, (a, b) in enumerate(trunk) if scan_layers and b - a > 1)


def stack_of(cfg: ModelConfig, i: int) -> tuple[int, int]:
  """(r, j): trunk block i is block j of stack r."""
  return _find(stacks(cfg), i)


def _find(runs: tuple[tuple[int, int], ...], i: int) -> tuple[int, int]:
  return next((r, i - a) for r, (a, b) in enumerate(runs) if a <= i < b)


class Transformer(nnx.Module):
  def __init__(
    self,
    cfg: ModelConfig,
    *,
    rngs: nnx.Rngs,
    remat: str = "none",
    remat_save: Sequence[str] = (),
    remat_offload: Sequence[str] = (),
    attention_chunk_len: int = 0,
    scan_layers: bool = False,
  ):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    has_moe = cfg.moe.num_experts > 0
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, std=cfg.init_std, dtype=dt, param_dtype=pdt)
    blocks = [
      Block(cfg, moe=has_moe and i >= cfg.first_k_dense, rngs=rngs, attention_chunk_len=attention_chunk_len)
      for i in range(cfg.num_layers)
    ]
    # The trunk is stored as stacks (see `stack`): `layers[r]` holds blocks runs[r][0]..runs[r][1]-1.
    self.runs = stacks(cfg)
    self.layers = nnx.List([stack(blocks[a:b]) for a, b in self.runs])
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.head = nnx.data(None)
    if not cfg.tie_embeddings:
      self.head = weight(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)
    mtp_moe = has_moe and cfg.mtp.use_moe
    chunk = attention_chunk_len
    extra = [Block(cfg, moe=mtp_moe, rngs=rngs, attention_chunk_len=chunk) for _ in range(cfg.mtp.modules)]
    if cfg.mtp.kind == "sequential":
      extra = [SequentialModule(cfg, block, rngs=rngs) for block in extra]
    self.mtp = nnx.List(extra)  # one per depth, or one applied at every depth (model.mtp.share_weights)
    self.mtp_depth = cfg.mtp.depth
    self.mtp_kind, self.dtype, self.scanned = cfg.mtp.kind, dt, scanned(cfg, scan_layers)
    self.remat, self.remat_save, self.remat_offload = remat, tuple(remat_save), tuple(remat_offload)

  def mtp_module(self, k: int):
    """The MTP module of depth k (1-based)."""
    return self.mtp[(k - 1) % len(self.mtp)]

  def head_matrix(self) -> jax.Array:
    """The output head, DxV, in the compute dtype (shared by every depth)."""
    w = self.embed.table[...].T if self.head is None else self.head[...]
    return w.astype(self.dtype)

  def logits(self, h_BxLxD: jax.Array) -> jax.Array:
    logits = jnp.einsum("bld,dv->blv", h_BxLxD, self.head_matrix())
    return sharding.constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def block(self, i: int) -> Block:
    """Trunk block i as its own block (its variables sliced out of its stack)."""
    r, j = _find(self.runs, i)
    return layer(self.layers[r], j)

  def moe_layers(self) -> list[tuple[list[str], MoE]]:
    """Every MoE FFN with the names its layers' aux terms are reported under: a trunk stack's
    one module holds its layers' variables stacked (names in layer order), an MTP module the
    depths it serves (every depth's, when they share it)."""
    out = [([f"layer_{i}" for i in range(a, b)], s.ffn) for (a, b), s in zip(self.runs, self.layers, strict=True)]
    depths = [[f"mtp_{k}" for k in range(1, self.mtp_depth + 1) if self.mtp_module(k) is m] for m in self.mtp]
    out += [(names, getattr(m, "block", m).ffn) for names, m in zip(depths, self.mtp, strict=True)]
    return [(names, ffn) for names, ffn in out if isinstance(ffn, MoE)]

  def empty_cache(self, batch: int, max_len: int) -> list:
    """An empty attention cache per trunk block, for `batch` rows of up to `max_len` positions."""
    runs = zip(self.runs, self.layers, strict=True)
    return [s.empty_cache(batch, max_len) for (a, b), s in runs for _ in range(a, b)]

  def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL, accs: dict | None = None) -> ModelOutput:
    """`accs`: gradient accumulators for the scanned stacks' parameters (`accumulate`), by stack
    index; a stack given one hands its gradient there (see `_scan`)."""
    accs = accs or {}
    assert set(accs) <= set(self.scanned), f"accumulators for stacks {sorted(accs)}, scanned {self.scanned}"
    visible = attention.Causal(segment_ids_BxL)
    valid_BxL = segment_ids_BxL != 0
    aux: dict[str, MoEAux] = {}
    policy = remat_policy(self.remat, self.remat_save, self.remat_offload)
    block_fn = Block.__call__ if policy is None else _remat(policy)

    def run(name, block, x):
      x, a = block_fn(block, x, visible, positions_BxL, valid_BxL)
      if a is not None:
        aux[name] = a
      return x

    x = self.embed(tokens_BxL)
    trunk = self.runs[:-1] if self.mtp_kind == "parallel" else self.runs  # the parallel head: below
    for r, ((a, b), stacked) in enumerate(zip(trunk, self.layers, strict=False)):
      if r not in self.scanned:
        for i in range(a, b):
          x = run(f"layer_{i}", layer(stacked, i - a), x)
        continue
      x, stacked_aux = _scan(stacked, policy, x, visible, positions_BxL, valid_BxL, acc=accs.get(r))
      if stacked_aux is not None:
        aux.update({f"layer_{i}": jax.tree.map(lambda v, j=i - a: v[j], stacked_aux) for i in range(a, b)})
    hidden = []
    if self.mtp_kind == "parallel":
      # Gloeckle et al.: the last trunk block is the next-token head; the extra heads
      # branch from the same shared trunk state and share the final norm and unembedding.
      last = self.runs[-1][0]
      hidden.append(self.final_norm(run(f"layer_{last}", layer(self.layers[-1], 0), x)))
      for k, head in enumerate(self.mtp, start=1):
        hidden.append(self.final_norm(run(f"mtp_{k}", head, x)))
    else:
      hidden.append(self.final_norm(x))
      h_prev = hidden[0]  # depth 1 sees the final-normed state, as vLLM / SGLang / Megatron feed it
      for k in range(1, self.mtp_depth + 1):
        module = self.mtp_module(k)
        emb = self.embed(shift_left(tokens_BxL, k))
        h_prev = run(f"mtp_{k}", module.block, module.mix(emb, h_prev))
        hidden.append(module.norm(h_prev))
    return ModelOutput(hidden=hidden, aux=aux)

  def trunk_blocks(self) -> list[Block]:
    """Every trunk block as its own block, in order, sliced out of its stack (`block`)."""
    return [self.block(i) for i in range(self.runs[-1][1])]

  def unstack(self) -> Transformer:
    """A copy storing its trunk a block at a time: stack i holds block i alone (`runs` of one),
    its variables sliced out of their stacks once. It computes as the model does, unrolled; a
    decoding loop reads each block's weights where they lie, where XLA:GPU would slice them out
    of the stacks again at every step (`decode.for_steps`). Traced, the slices are a second copy
    of the trunk's weights while they live; `generate.load` fills a model of this form from the
    stacks as it reads them. The model itself when every stack already holds one block."""
    if all(b - a == 1 for a, b in self.runs):
      return self
    model = nnx.merge(*nnx.split(self))
    runs = zip(self.runs, self.layers, strict=True)
    model.layers = nnx.List([layer(s, j, keep=True) for (a, b), s in runs for j in range(b - a)])
    model.runs = tuple((i, i + 1) for i in range(self.runs[-1][1]))
    model.scanned = ()
    return model

  def decode(self, tokens_BxL, positions_BxL, caches: list) -> tuple[jax.Array, list, jax.Array]:
    """(h, caches, branch): the next-token state of new tokens at `positions_BxL` (final-normed,
    BxLxD, what `logits` reads), every block attending over its cache in `caches` (one per trunk
    block, as `empty_cache` makes them) and writing the new keys there. A query
    at position p sees cache slots 0..p. `branch` is the state entering the last block, where
    the parallel kind's extra heads branch off (speculative drafting runs them); the MTP depths
    themselves are not run."""
    mask_BxLxS = attention.cached_mask(positions_BxL, _cache_len(caches[0]))
    x = self.embed(tokens_BxL)
    new, branch = [], x
    for block, cache in zip(self.trunk_blocks(), caches, strict=True):
      branch = x
      x, cache = block.decode(x, mask_BxLxS, positions_BxL, cache)
      new.append(cache)
    # The parallel kind's last block is its next-token head, so in both kinds every block runs.
    return self.final_norm(x), new, branch


def _cache_len(cache) -> int:
  return jax.tree.leaves(cache)[0].shape[1]
