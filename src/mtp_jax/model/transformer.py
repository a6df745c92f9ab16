"""The trunk, its blocks and the MTP depths wired together."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from mtp_jax import sharding
from mtp_jax.config import ModelConfig
from mtp_jax.model import attention
from mtp_jax.model.layers import MLP, Embed, RMSNorm, weight
from mtp_jax.model.moe import MoE, MoEAux
from mtp_jax.model.mtp import SequentialModule, shift_left

_ACT = ("act_batch", "act_length", "act_embed")

REMAT_POLICIES = {
  "full": None,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


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

  def __call__(self, x_BxLxD, mask_BxLxS, positions_BxL, valid_BxL) -> tuple[jax.Array, MoEAux | None]:
    x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), mask_BxLxS, positions_BxL)
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
    return sharding.constrain(x_BxLxD + y, _ACT), aux


def _remat(policy):
  """Rematerialises a block: a pure function of its state, so plain jax.checkpoint applies
  (blocks never mutate their variables in the forward pass)."""

  def run(block: Block, *args):
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda st, *a: nnx.merge(graphdef, st)(*a), policy=policy)(state, *args)

  return run


def _scan(blocks: list[Block], remat: str, x_BxLxD, *args) -> tuple[jax.Array, MoEAux | None]:
  """Runs blocks of one structure in turn as one `lax.scan` over their stacked variables: the
  same function as calling them one by one, but XLA sees one layer. It compiles it once, and
  gathers a layer's sharded weights inside the loop, when that layer runs: unrolled, XLA can
  hoist every layer's gathers out of the microbatch loop and hold all the gathered weights
  at once. Returns the blocks' aux stacked, block i at index i."""
  graphdef = nnx.graphdef(blocks[0])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
  stacked = jax.tree.map(_pin_stacked, stacked, is_leaf=lambda v: isinstance(v, nnx.Variable))

  def body(x, state):
    return nnx.merge(graphdef, state)(x, *args)

  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(body, x_BxLxD, stacked)


def _pin_stacked(v: nnx.Variable) -> nnx.Variable:
  """A stacked variable laid out as each layer's is, the new leading (layer) axis whole."""
  names = v.get_metadata().get("axes") or (None,) * (v.ndim - 1)
  return v.replace(sharding.constrain(v.get_value(), (None, *names)))


def _runs(blocks) -> list[range]:
  """Consecutive blocks of one structure (the dense first layers, then the MoE ones)."""
  runs: list[range] = []
  for i, block in enumerate(blocks):
    if runs and nnx.graphdef(block) == nnx.graphdef(blocks[runs[-1].start]):
      runs[-1] = range(runs[-1].start, i + 1)
    else:
      runs.append(range(i, i + 1))
  return runs


class Transformer(nnx.Module):
  def __init__(
    self,
    cfg: ModelConfig,
    *,
    rngs: nnx.Rngs,
    remat: str = "none",
    attention_chunk_len: int = 0,
    scan_layers: bool = False,
  ):
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    has_moe = cfg.moe.num_experts > 0
    self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, std=cfg.init_std, dtype=dt, param_dtype=pdt)
    self.blocks = nnx.List(
      [
        Block(cfg, moe=has_moe and i >= cfg.first_k_dense, rngs=rngs, attention_chunk_len=attention_chunk_len)
        for i in range(cfg.num_layers)
      ]
    )
    self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.head = nnx.data(None)
    if not cfg.tie_embeddings:
      self.head = weight(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)
    mtp_moe = has_moe and cfg.mtp.use_moe
    extra = [Block(cfg, moe=mtp_moe, rngs=rngs, attention_chunk_len=attention_chunk_len) for _ in range(cfg.mtp.depth)]
    if cfg.mtp.kind == "sequential":
      extra = [SequentialModule(cfg, block, rngs=rngs) for block in extra]
    self.mtp = nnx.List(extra)
    self.mtp_kind, self.dtype, self.remat, self.scan_layers = cfg.mtp.kind, dt, remat, scan_layers

  def head_matrix(self) -> jax.Array:
    """The output head, DxV, in the compute dtype (shared by every depth)."""
    w = self.embed.table[...].T if self.head is None else self.head[...]
    return w.astype(self.dtype)

  def logits(self, h_BxLxD: jax.Array) -> jax.Array:
    logits = jnp.einsum("bld,dv->blv", h_BxLxD, self.head_matrix())
    return sharding.constrain(logits, ("act_batch", "act_length", "act_vocab"))

  def moe_layers(self) -> dict[str, MoE]:
    """Every MoE FFN by the name its aux terms are reported under."""
    blocks = {f"layer_{i}": b for i, b in enumerate(self.blocks)}
    blocks.update({f"mtp_{k + 1}": getattr(m, "block", m) for k, m in enumerate(self.mtp)})
    return {name: b.ffn for name, b in blocks.items() if isinstance(b.ffn, MoE)}

  def __call__(self, tokens_BxL, segment_ids_BxL, positions_BxL) -> ModelOutput:
    mask_BxLxS = attention.mask(segment_ids_BxL)
    valid_BxL = segment_ids_BxL != 0
    aux: dict[str, MoEAux] = {}
    block_fn = Block.__call__ if self.remat == "none" else _remat(REMAT_POLICIES[self.remat])

    def run(name, block, x):
      x, a = block_fn(block, x, mask_BxLxS, positions_BxL, valid_BxL)
      if a is not None:
        aux[name] = a
      return x

    x = self.embed(tokens_BxL)
    n_trunk = len(self.blocks) - (1 if self.mtp_kind == "parallel" else 0)
    trunk = list(self.blocks)[:n_trunk]
    for layers in _runs(trunk) if self.scan_layers else [range(i, i + 1) for i in range(n_trunk)]:
      if len(layers) == 1:
        x = run(f"layer_{layers.start}", trunk[layers.start], x)
        continue
      x, a = _scan(trunk[layers.start : layers.stop], self.remat, x, mask_BxLxS, positions_BxL, valid_BxL)
      if a is not None:
        aux.update({f"layer_{i}": jax.tree.map(lambda v, j=j: v[j], a) for j, i in enumerate(layers)})
    hidden = []
    if self.mtp_kind == "parallel":
      # Gloeckle et al.: the last trunk block is the next-token head; the extra heads
      # branch from the same shared trunk state and share the final norm and unembedding.
      last = len(self.blocks) - 1
      hidden.append(self.final_norm(run(f"layer_{last}", self.blocks[last], x)))
      for k, head in enumerate(self.mtp, start=1):
        hidden.append(self.final_norm(run(f"mtp_{k}", head, x)))
    else:
      hidden.append(self.final_norm(x))
      h_prev = hidden[0]  # depth 1 sees the final-normed state, as vLLM / SGLang / Megatron feed it
      for k, module in enumerate(self.mtp, start=1):
        emb = self.embed(shift_left(tokens_BxL, k))
        h_prev = run(f"mtp_{k}", module.block, module.mix(emb, h_prev))
        hidden.append(module.norm(h_prev))
    return ModelOutput(hidden=hidden, aux=aux)

  def decode(self, tokens_BxL, positions_BxL, caches: list) -> tuple[jax.Array, list, jax.Array]:
    """(h, caches, branch): the next-token state of new tokens at `positions_BxL` (final-normed,
    BxLxD, what `logits` reads), every block attending over its cache in `caches` (one per block
    of `self.blocks`, as `Block.empty_cache` makes them) and writing the new keys there. A query
    at position p sees cache slots 0..p. `branch` is the state entering the last block, where
    the parallel kind's extra heads branch off (speculative drafting runs them); the MTP depths
    themselves are not run."""
    mask_BxLxS = attention.cached_mask(positions_BxL, _cache_len(caches[0]))
    x = self.embed(tokens_BxL)
    new, branch = [], x
    for block, cache in zip(self.blocks, caches, strict=True):
      branch = x
      x, cache = block.decode(x, mask_BxLxS, positions_BxL, cache)
      new.append(cache)
    # The parallel kind's last block is its next-token head, so in both kinds every block runs.
    return self.final_norm(x), new, branch


def _cache_len(cache) -> int:
  return jax.tree.leaves(cache)[0].shape[1]
