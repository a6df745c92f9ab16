"""Causal, segment-aware attention: grouped-query (GQA) and Multi-head Latent (MLA).

Training and prefill attend within packed documents (`Causal`, from the segment ids); the kernel
is `model.attention.impl` as `choose` resolves it: `xla` (einsums, the reference), `splash`
(Pallas splash attention: fused, the blocks above the diagonal skipped; in Pallas interpret mode
off TPU, for tests) or `cudnn` (cuDNN's flash attention through `jax.nn.dot_product_attention`).
Decoding passes an explicit mask instead.

Both take an optional per-layer cache for decoding (`GQACache`, `MLACache`): the new keys are
written at their positions, the query attends over the whole cache through the caller's mask,
and the updated cache is returned beside the output. Which cached positions are valid is the
caller's business (`mtp_jax.generate.cache`), so rolling back a draft costs nothing here.

Shape letters beyond the package legend (model/__init__.py): K per-head dimension · Q query heads
per key/value head (GQA) · R latent rank (MLA) · N query blocks · W queries per block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from mtp_jax import sharding
from mtp_jax.config import AttentionConfig, ConfigError, ModelConfig
from mtp_jax.model.layers import ACT, RMSNorm, Rope, bias, softmax_mscale, weight

SPLASH_BLOCK = 128  # splash's tiles hold whole 128-lane blocks of the sequence


def choose(
  impl: str,
  platform: str,
  seq_len: int,
  *,
  sequence_split: bool = False,
  qk_dim: int = 128,
  dtype: str = "bfloat16",
  capability: float | None = None,
) -> tuple[str, str]:
  """(kernel, why): the kernel `model.attention.impl` names for this step on devices of
  `platform` (`capability`: a GPU's compute capability). 'auto': splash on TPU, cuDNN on GPU,
  xla elsewhere or where the platform's kernel cannot serve the step. A kernel asked for by
  name that cannot serve it is a ConfigError."""

  def cannot(kernel: str) -> str | None:
    if kernel == "cudnn" and platform != "gpu":
      return f"needs a GPU (these devices are {platform})"
    if kernel == "splash" and platform == "gpu":
      return "is a TPU kernel; on GPU use auto, cudnn or xla"
    if sequence_split:
      return "does not split the sequence; set mesh.sequence=1 or use xla"
    if kernel == "splash" and seq_len % SPLASH_BLOCK:
      return f"needs data.seq_len a multiple of {SPLASH_BLOCK} (it is {seq_len})"
    if kernel == "cudnn":
      widest = 256 if (capability or 0) >= 9 else 128  # cuDNN's flash attention: Hopper takes 256
      if dtype not in ("bfloat16", "float16"):
        return f"needs model.dtype bfloat16 or float16 (it is {dtype})"
      if qk_dim % 8 or qk_dim > widest:
        return f"takes query/key heads of at most {widest} dims, a multiple of 8 (these have {qk_dim})"
      if seq_len % 2:
        return f"needs an even data.seq_len (it is {seq_len})"
    return None

  native = {"tpu": "splash", "gpu": "cudnn"}.get(platform)
  if impl == "auto":
    if native and (no := cannot(native)) is None:
      return native, f"auto on {platform.upper()}"
    return "xla", f"auto on {platform}" + (f"; {native} {no}" if native else "")
  if impl != "xla" and (no := cannot(impl)):
    raise ConfigError(f"model.attention.impl={impl}", no)
  interpreted = impl == "splash" and platform != "tpu"
  return impl, "asked for" + ("; off TPU in Pallas interpret mode, slow" if interpreted else "")


@struct.dataclass
class Causal:
  """Who sees whom in training and prefill: query l sees key s iff s <= l and both lie in the
  same packed document (segment ids, BxL; documents are contiguous, 0 is padding)."""

  segment_ids_BxL: jax.Array

  def mask(self) -> jax.Array:
    """BxLxS, materialised: what the xla kernel applies."""
    return mask(self.segment_ids_BxL)


def mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """BxLxS: key s is visible from query l iff s <= l and both lie in the same document.
  Packed documents are contiguous, so this never lets a token see across a boundary."""
  length = segment_ids_BxL.shape[1]
  causal_LxS = jnp.tril(jnp.ones((length, length), bool))
  same_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal_LxS[None] & same_BxLxS


def attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, visible, scale: float, chunk_len: int = 0, impl: str = "xla"):
  """Softmax attention in float32; query heads are grouped over the G key/value heads.
  `visible` is `Causal` or a BxLxS mask (decoding); the fused kernels serve only `Causal`.

  With `impl` xla and `chunk_len`, queries go through in blocks of that many, each
  rematerialised, so the float32 scores exist for one block at a time (H x chunk_len x S, not
  H x L x S), forward and backward. Every block sees all keys, so the result is the same softmax, not an approximation.
  Block j holds queries j, j + n, j + 2n, ... (n blocks): strided rather than contiguous, so a
  sequence axis that shards L keeps sharding every block instead of being gathered."""
  q_BxLxHxK, k_BxSxGxK, v_BxSxGxV = checkpoint_name((q_BxLxHxK, k_BxSxGxK, v_BxSxGxV), "attn_qkv")
  if isinstance(visible, Causal):
    if impl in ("splash", "cudnn"):  # fused: no scores in memory, so no query blocks either
      out = fused(impl, q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, visible.segment_ids_BxL, scale)
      return checkpoint_name(out, "attn_context")
    visible = visible.mask()
  mask_BxLxS = visible
  b, length = q_BxLxHxK.shape[:2]
  if not chunk_len or chunk_len >= length:
    return checkpoint_name(_attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, mask_BxLxS, scale), "attn_context")
  n = length // chunk_len

  def blocks(x):  # BxLx... -> NxBxWx..., block j = positions j, j + n, ...
    return jnp.moveaxis(x.reshape(b, chunk_len, n, *x.shape[2:]), 2, 0)

  one = jax.checkpoint(lambda qm: _attend(qm[0], k_BxSxGxK, v_BxSxGxV, qm[1], scale))
  out_NxBxWxHxV = jax.lax.map(one, (blocks(q_BxLxHxK), blocks(mask_BxLxS)))
  out = jnp.moveaxis(out_NxBxWxHxV, 0, 2).reshape(b, length, *out_NxBxWxHxV.shape[3:])
  return checkpoint_name(out, "attn_context")


def _attend(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, mask_BxLxS, scale: float) -> jax.Array:
  b, l, h, kdim = q_BxLxHxK.shape
  g = k_BxSxGxK.shape[2]
  q_BxLxGxQxK = q_BxLxHxK.reshape(b, l, g, h // g, kdim)
  s = jnp.einsum("blgqk,bsgk->bgqls", q_BxLxGxQxK, k_BxSxGxK, preferred_element_type=jnp.float32)
  s = jnp.where(mask_BxLxS[:, None, None], s * scale, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v_BxSxGxV.dtype)
  out = jnp.einsum("bgqls,bsgv->blgqv", p, v_BxSxGxV)
  return out.reshape(b, l, h, v_BxSxGxV.shape[-1])


def fused(kernel: str, q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, segment_ids_BxL, scale: float) -> jax.Array:
  """Causal attention within documents by a fused kernel: `splash` (Pallas splash attention) or
  `cudnn` (cuDNN's flash attention). On a mesh it runs in a shard_map, each device over its rows
  and heads (key/value heads repeated to the query heads where the mesh splits those and not
  these); the sequence stays whole on each device."""
  active = sharding.active()
  if kernel == "splash":
    run = functools.partial(_splash_local, scale=scale, interpret=sharding.platform() != "tpu")
  else:
    run = functools.partial(_cudnn_local, scale=scale)
  if active is None:
    return run(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, segment_ids_BxL)
  mesh, rules = active
  h, g = q_BxLxHxK.shape[2], k_BxSxGxK.shape[2]
  rows, _, heads, _ = sharding.spec(_ACT_HEADS, q_BxLxHxK.shape, mesh, rules)
  if heads is not None and sharding.spec(_ACT_HEADS, k_BxSxGxK.shape, mesh, rules)[2] != heads:
    k_BxSxGxK, v_BxSxGxV = (jnp.repeat(x, h // g, axis=2) for x in (k_BxSxGxK, v_BxSxGxV))
  qkv = PartitionSpec(rows, None, heads, None)
  return jax.shard_map(
    run, mesh=mesh, in_specs=(qkv, qkv, qkv, PartitionSpec(rows, None)), out_specs=qkv, check_vma=False
  )(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, segment_ids_BxL)


def _cudnn_local(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, segment_ids_BxL, *, scale: float, implementation: str = "cudnn"):
  """`jax.nn.dot_product_attention`'s cuDNN flash attention: causal, the documents kept apart
  by a mask (which cuDNN applies as an additive bias, B x 1 x L x S). MLA's values are narrower
  than its keys, which that function does not take: they are zero-padded to the key width and
  the padding's outputs (zeros) cut off, which changes no number. (`implementation` is for the
  tests, which run the same call through XLA.) In `fused`'s shard_map, B, H and G are this
  device's share of the rows and heads, L, S and K whole."""
  v_dim, k_dim = v_BxSxGxV.shape[-1], k_BxSxGxK.shape[-1]
  if v_dim < k_dim:
    v_BxSxGxV = jnp.pad(v_BxSxGxV, ((0, 0), (0, 0), (0, 0), (0, k_dim - v_dim)))
  same_Bx1xLxS = (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])[:, None]
  out = jax.nn.dot_product_attention(
    q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, mask=same_Bx1xLxS, scale=scale, is_causal=True, implementation=implementation
  )
  return out[..., :v_dim]


def _splash_local(q_BxLxHxK, k_BxSxGxK, v_BxSxGxV, segment_ids_BxL, *, scale: float, interpret: bool):
  """Splash attention over the rows and heads at hand: in `fused`'s shard_map, B, H and G are
  this device's share of the rows and heads, L, S and K whole."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib

  kernel = _splash_kernel(q_BxLxHxK.shape[2], q_BxLxHxK.shape[1], interpret)
  q_BxHxLxK = jnp.swapaxes(q_BxLxHxK * jnp.asarray(scale, q_BxLxHxK.dtype), 1, 2)
  k_BxGxSxK, v_BxGxSxV = jnp.swapaxes(k_BxSxGxK, 1, 2), jnp.swapaxes(v_BxSxGxV, 1, 2)

  def one(q, k, v, seg):
    return kernel(q, k, v, segment_ids=splash_lib.SegmentIds(q=seg, kv=seg))

  return jnp.swapaxes(jax.vmap(one)(q_BxHxLxK, k_BxGxSxK, v_BxGxSxV, segment_ids_BxL), 1, 2)


def splash_block(length: int) -> int:
  """The square tile `splash` runs over: the largest of 512, 256, 128 that divides the length."""
  return max(b for b in (512, 256, 128) if length % b == 0)


@functools.cache
def _splash_kernel(heads: int, length: int, interpret: bool):
  """The kernel for `heads` query heads over `length` positions: a causal mask per head (its
  fully masked blocks are skipped), documents separated by the segment ids it is called with."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_lib
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

  block = splash_block(length)
  tiles = ("q", "kv", "kv_compute", "q_dkv", "kv_dkv", "kv_dkv_compute", "q_dq", "kv_dq")  # forward, dK/dV, dQ
  sizes = splash_lib.BlockSizes(**{f"block_{t}": block for t in tiles})
  causal = mask_lib.MultiHeadMask([mask_lib.CausalMask((length, length)) for _ in range(heads)])
  with jax.ensure_compile_time_eval():  # called while tracing: its tables must still be concrete
    kernel = splash_lib.make_splash_mha(
      causal,
      block_sizes=sizes,
      head_shards=1,
      q_seq_shards=1,
      residual_checkpoint_name="attn_context",  # its output and log-sum-exp, kept by the save_attn policies
      interpret=interpret,
    )
  # Its block tables as numpy, so a traced step embeds them as constants: as jax arrays they
  # become the compiled step's hidden arguments, which an ahead-of-time compiled step is not given.
  return jax.tree.map(np.asarray, kernel)


_ACT_HEADS = ("act_batch", "act_length", "act_heads", None)
_LATENT = ("act_batch", "act_length", None)  # MLA's compressed query or key/value
# The projections' axes, all multiplied by `sharding.fsdp_einsum`: D x H x K, D x R, R x H x K, H x V x D.
_WQ, _WKV, _DOWN = ("embed", "heads", None), ("embed", "kv_heads", None), ("embed", None)
_WQ_B, _WKV_B, _WO = ("q_lora", "heads", None), ("kv_lora", "heads", None), ("heads", None, "embed")


@struct.dataclass
class GQACache:
  """One GQA layer's keys (after RoPE) and values, slot s holding position s."""

  k_BxSxGxK: jax.Array
  v_BxSxGxK: jax.Array


@struct.dataclass
class MLACache:
  """One MLA layer's normed key/value latent and decoupled RoPE key, slot s holding position s:
  what DeepSeek-V3 caches (§2.1.1), (R + rope dim) numbers per token instead of 2 H K."""

  ckv_BxSxR: jax.Array
  k_rope_BxSxK: jax.Array


def cached_mask(positions_BxL: jax.Array, max_len: int) -> jax.Array:
  """BxLxS: a query at position p sees cache slots 0..p. Slots past p may hold stale entries
  of a rolled-back draft; they stay invisible until overwritten."""
  return jnp.arange(max_len)[None, None, :] <= positions_BxL[:, :, None]


def write_rows(buf_BxSx_, new_BxLx_, positions_BxL):
  """buf with new[b, l] at slot positions[b, l] (each row at its own positions); positions past
  the buffer are dropped."""
  rows_Bx1 = jnp.arange(buf_BxSx_.shape[0])[:, None]
  return buf_BxSx_.at[rows_Bx1, positions_BxL].set(new_BxLx_.astype(buf_BxSx_.dtype), mode="drop")


def absorbed_attend(q_BxLxHxK, cache: MLACache, wkv_b_RxHxK, mask_BxLxS, scale: float) -> jax.Array:
  """BxLxHxV: MLA's attention over the cached latent itself (DeepSeek-V2 §2.1.2: W_UK absorbed
  into the query side, W_UV into the output; DeepSeek-V3, vLLM and SGLang decode this way).
  Head h's key at slot s is [W_uk c_s; k_rope_s] and its value W_uv c_s, so
  q . k_s = (q_nope W_uk) . c_s + q_rope . k_rope_s and sum_s p_s v_s = W_uv (sum_s p_s c_s):
  one (R + rope)-wide key and R-wide value shared by all H query heads, and the cache is never
  up-projected. Per new token that costs about 2 H S (2 R + rope) FLOPs where up-projecting
  costs 2 S R H (nope + v). The softmax is the up-projected path's: float32, the same `scale`;
  only the order of the float sums differs."""
  dt, f32 = q_BxLxHxK.dtype, jnp.float32
  nope = q_BxLxHxK.shape[-1] - cache.k_rope_BxSxK.shape[-1]
  w_uk_RxHxK, w_uv_RxHxV = wkv_b_RxHxK[..., :nope], wkv_b_RxHxK[..., nope:]
  q_lat_BxLxHxR = sharding.constrain(jnp.einsum("blhk,rhk->blhr", q_BxLxHxK[..., :nope], w_uk_RxHxK), _ACT_HEADS)
  s = jnp.einsum("blhr,bsr->bhls", q_lat_BxLxHxR, cache.ckv_BxSxR, preferred_element_type=f32)
  s = s + jnp.einsum("blhk,bsk->bhls", q_BxLxHxK[..., nope:], cache.k_rope_BxSxK, preferred_element_type=f32)
  s = jnp.where(mask_BxLxS[:, None], s * scale, jnp.finfo(f32).min)
  p = jax.nn.softmax(s, axis=-1).astype(dt)
  out_lat_BxLxHxR = jnp.einsum("bhls,bsr->blhr", p, cache.ckv_BxSxR)
  return jnp.einsum("blhr,rhv->blhv", out_lat_BxLxHxR, w_uv_RxHxV)


class GQA(nnx.Module):
  """Grouped-query attention; with `qk_norm`, each query and key head is RMS-normed over its
  head_dim before RoPE (Qwen3), which bounds the attention logits."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, chunk_len: int = 0):
    a: AttentionConfig = cfg.attention
    d, std, pdt, dt = cfg.d_model, cfg.init_std, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    self.wq = weight(rngs, (d, a.num_heads, a.head_dim), _WQ, std, pdt)
    self.wk = weight(rngs, (d, a.num_kv_heads, a.head_dim), _WKV, std, pdt)
    self.wv = weight(rngs, (d, a.num_kv_heads, a.head_dim), _WKV, std, pdt)
    self.wo = weight(rngs, (a.num_heads, a.head_dim, d), _WO, std, pdt)
    if a.qk_norm:
      self.q_norm = RMSNorm(a.head_dim, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
      self.k_norm = RMSNorm(a.head_dim, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.bias = nnx.data(None)
    if a.qkv_bias:  # zero at the start, never weight-decayed
      self.bias = nnx.Dict(
        q=bias((a.num_heads, a.head_dim), ("heads", None), pdt),
        k=bias((a.num_kv_heads, a.head_dim), ("kv_heads", None), pdt),
        v=bias((a.num_kv_heads, a.head_dim), ("kv_heads", None), pdt),
      )
    self.qk_norm, self.dtype, self.chunk_len = a.qk_norm, dt, chunk_len
    self.rotary = int(a.head_dim * a.partial_rotary_factor)  # RoPE turns the first `rotary` dims
    self.rope = Rope(self.rotary, a.rope_theta, a.rope_scaling)
    self.kv_shape, self.impl = (a.num_kv_heads, a.head_dim), a.impl

  def empty_cache(self, batch: int, max_len: int) -> GQACache:
    zeros = jnp.zeros((batch, max_len, *self.kv_shape), self.dtype)
    return GQACache(k_BxSxGxK=zeros, v_BxSxGxK=zeros)

  def __call__(self, x_BxLxD, visible, positions_BxL, cache: GQACache | None = None):
    """The output, or (output, cache) given a cache: then `visible` is a mask over its S slots
    (`cached_mask`); otherwise `Causal`."""
    dt = self.dtype
    q = sharding.fsdp_einsum("bld,dhk->blhk", x_BxLxD, ACT, self.wq[...].astype(dt), _WQ)
    k = sharding.fsdp_einsum("bld,dgk->blgk", x_BxLxD, ACT, self.wk[...].astype(dt), _WKV)
    v = sharding.fsdp_einsum("bld,dgk->blgk", x_BxLxD, ACT, self.wv[...].astype(dt), _WKV)
    if self.bias is not None:
      q, k, v = (x + self.bias[n][...].astype(dt)[None, None] for n, x in (("q", q), ("k", k), ("v", v)))
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    q, k = self._rope(q, positions_BxL), self._rope(k, positions_BxL)
    q = sharding.constrain(q, _ACT_HEADS)
    chunk_len = self.chunk_len
    if cache is not None:  # a few new queries over the whole cache: no chunking
      cache = GQACache(
        k_BxSxGxK=write_rows(cache.k_BxSxGxK, k, positions_BxL), v_BxSxGxK=write_rows(cache.v_BxSxGxK, v, positions_BxL)
      )
      k, v, chunk_len = cache.k_BxSxGxK, cache.v_BxSxGxK, 0
    out_BxLxHxK = attend(q, k, v, visible, q.shape[-1] ** -0.5, chunk_len, self.impl)
    out = sharding.fsdp_einsum("blhk,hkd->bld", out_BxLxHxK, _ACT_HEADS, self.wo[...].astype(dt), _WO)
    return out if cache is None else (out, cache)

  def _rope(self, x_BxLxHxK, positions_BxL):
    if self.rotary == x_BxLxHxK.shape[-1]:
      return self.rope(x_BxLxHxK, positions_BxL)
    turned = self.rope(x_BxLxHxK[..., : self.rotary], positions_BxL)
    return jnp.concatenate([turned, x_BxLxHxK[..., self.rotary :]], axis=-1)


class MLA(nnx.Module):
  """Multi-head Latent Attention (DeepSeek-V3 §2.1.1): low-rank query and key/value
  projections, each latent RMS-normed; a decoupled RoPE key shared by all heads. With `absorb`
  (`model.attention.absorb`, the default), calls with a cache attend over the cached latent
  itself (`absorbed_attend`); `generate.decode.absorbing(model, False)` turns it off, as the
  prefill does."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, chunk_len: int = 0):
    a: AttentionConfig = cfg.attention
    d, std, pdt, dt = cfg.d_model, cfg.init_std, jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
    h, nope, rdim = a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim
    if a.q_lora_rank:
      self.wq_a = weight(rngs, (d, a.q_lora_rank), _DOWN, std, pdt)
      self.q_norm = RMSNorm(a.q_lora_rank, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
      self.wq_b = weight(rngs, (a.q_lora_rank, h, nope + rdim), _WQ_B, std, pdt)
    else:
      self.wq = weight(rngs, (d, h, nope + rdim), _WQ, std, pdt)
    self.wkv_a = weight(rngs, (d, a.kv_lora_rank + rdim), _DOWN, std, pdt)
    self.kv_norm = RMSNorm(a.kv_lora_rank, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
    self.wkv_b = weight(rngs, (a.kv_lora_rank, h, nope + a.v_head_dim), _WKV_B, std, pdt)
    self.wo = weight(rngs, (h, a.v_head_dim, d), _WO, std, pdt)
    self.q_lora_rank, self.kv_lora_rank, self.nope = a.q_lora_rank, a.kv_lora_rank, nope
    self.rope = Rope(rdim, a.rope_theta, a.rope_scaling)
    # (nope + rope)^-1/2, and under YaRN DeepSeek-V3's correction of it
    self.scale = (nope + rdim) ** -0.5 * softmax_mscale(a.rope_scaling)
    self.dtype, self.chunk_len = dt, chunk_len
    self.rope_dim, self.impl = rdim, a.impl
    self.absorb = a.absorb

  def empty_cache(self, batch: int, max_len: int) -> MLACache:
    return MLACache(
      ckv_BxSxR=jnp.zeros((batch, max_len, self.kv_lora_rank), self.dtype),
      k_rope_BxSxK=jnp.zeros((batch, max_len, self.rope_dim), self.dtype),
    )

  def __call__(self, x_BxLxD, visible, positions_BxL, cache: MLACache | None = None):
    """The output, or (output, cache) given a cache: then `visible` is a mask over its S slots
    (`cached_mask`); otherwise `Causal`.
    With a cache and `absorb`, the queries attend over the cached latent with W_uk folded into
    them and W_uv into the output (`absorbed_attend`): the same attention as up-projecting the
    whole cache with W_kv_b (what training and, without `absorb`, every cached call do), its
    float sums in another order."""
    dt, nope = self.dtype, self.nope
    if self.q_lora_rank:
      cq_BxLxR = self.q_norm(sharding.fsdp_einsum("bld,dr->blr", x_BxLxD, ACT, self.wq_a[...].astype(dt), _DOWN))
      q = sharding.fsdp_einsum("blr,rhk->blhk", cq_BxLxR, _LATENT, self.wq_b[...].astype(dt), _WQ_B)
    else:
      q = sharding.fsdp_einsum("bld,dhk->blhk", x_BxLxD, ACT, self.wq[...].astype(dt), _WQ)
    q = jnp.concatenate([q[..., :nope], self.rope(q[..., nope:], positions_BxL)], axis=-1)
    kv_a = sharding.fsdp_einsum("bld,dr->blr", x_BxLxD, ACT, self.wkv_a[...].astype(dt), _DOWN)
    ckv_BxLxR = self.kv_norm(kv_a[..., : self.kv_lora_rank])
    k_rope_BxLx1xK = self.rope(kv_a[..., None, self.kv_lora_rank :], positions_BxL)
    chunk_len = self.chunk_len
    if cache is not None:  # a few new queries over the whole cache: no chunking
      cache = MLACache(
        ckv_BxSxR=write_rows(cache.ckv_BxSxR, ckv_BxLxR, positions_BxL),
        k_rope_BxSxK=write_rows(cache.k_rope_BxSxK, k_rope_BxLx1xK[:, :, 0], positions_BxL),
      )
      if self.absorb:
        q = sharding.constrain(q, _ACT_HEADS)
        out_BxLxHxV = absorbed_attend(q, cache, self.wkv_b[...].astype(dt), visible, self.scale)
        return jnp.einsum("blhv,hvd->bld", out_BxLxHxV, self.wo[...].astype(dt)), cache
      ckv_BxLxR, k_rope_BxLx1xK, chunk_len = cache.ckv_BxSxR, cache.k_rope_BxSxK[:, :, None], 0
    kv = sharding.fsdp_einsum("blr,rhk->blhk", ckv_BxLxR, _LATENT, self.wkv_b[...].astype(dt), _WKV_B)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope_BxLx1xK, (*k_nope.shape[:3], k_rope_BxLx1xK.shape[-1]))], -1)
    q = sharding.constrain(q, _ACT_HEADS)
    out_BxLxHxV = attend(q, k, v, visible, self.scale, chunk_len, self.impl)
    out = sharding.fsdp_einsum("blhv,hvd->bld", out_BxLxHxV, _ACT_HEADS, self.wo[...].astype(dt), _WO)
    return out if cache is None else (out, cache)


def make(cfg: ModelConfig, *, rngs: nnx.Rngs, chunk_len: int = 0) -> GQA | MLA:
  return {"gqa": GQA, "mla": MLA}[cfg.attention.kind](cfg, rngs=rngs, chunk_len=chunk_len)
