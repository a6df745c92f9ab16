"""Parameter counts and model FLOPs per token from the config alone (for MFU and sizing), and
the matmul FLOPs of a traced program."""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import re

import jax.numpy as jnp
import numpy as np

from mtp_jax import hlo
from mtp_jax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Cost:
  total_params: int  # every parameter, MTP modules included
  active_params: int  # parameters one token's forward pass multiplies through (embedding lookup excluded)
  train_flops_per_token: float  # forward + backward (3x forward), attention and MTP included
  mtp_train_flops_per_token: float  # the share of the above spent in MTP depths (training everything)


def _attention(cfg: ModelConfig) -> tuple[int, int, int]:
  """(parameters, q/k dim per head, v dim per head) of one attention layer."""
  a, d = cfg.attention, cfg.d_model
  if a.kind == "gqa":
    params = d * a.num_heads * a.head_dim * 2 + 2 * d * a.num_kv_heads * a.head_dim
    params += 2 * a.head_dim if a.qk_norm else 0  # the q and k norm scales
    params += (a.num_heads + 2 * a.num_kv_heads) * a.head_dim if a.qkv_bias else 0
    return params, a.head_dim, a.head_dim
  qk = a.qk_nope_head_dim + a.qk_rope_head_dim
  q = d * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * a.num_heads * qk if a.q_lora_rank else d * a.num_heads * qk
  kv = (
    d * (a.kv_lora_rank + a.qk_rope_head_dim)
    + a.kv_lora_rank
    + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
  )
  return q + kv + a.num_heads * a.v_head_dim * d, qk, a.v_head_dim


def _ffn(cfg: ModelConfig, moe: bool) -> tuple[int, int]:
  """(total, active) parameters of one FFN."""
  d, m = cfg.d_model, cfg.moe
  if not moe:
    return 3 * d * cfg.d_ff, 3 * d * cfg.d_ff
  expert = 3 * d * m.expert_d_ff
  shared = m.num_shared_experts * expert
  router = d * m.num_experts
  return router + m.num_experts * expert + shared, router + m.top_k * expert + shared


def cost(cfg: ModelConfig, seq_len: int, trainable: str = "all") -> Cost:
  """With `trainable` "mtp" (train.trainable) the trunk and the main head run forward only and
  each depth's backward computes no weight gradient for the frozen head. (Every input gradient
  inside a depth is still needed: its first projections read a norm with a trained scale.)"""
  d, v = cfg.d_model, cfg.vocab_size
  attn_params, qk_dim, v_dim = _attention(cfg)
  # Causal attention: on average a token attends to (L + 1) / 2 keys; QK^T and PV each
  # cost 2 FLOPs per multiply-add.
  attn_scores = 2 * cfg.attention.num_heads * (qk_dim + v_dim) * (seq_len + 1) / 2
  norms = 2 * d
  has_moe = cfg.moe.num_experts > 0

  def block(moe: bool) -> tuple[int, int]:
    total, active = _ffn(cfg, moe)
    return attn_params + norms + total, attn_params + active

  head = d * v
  embed = v * d
  total = embed + d + (0 if cfg.tie_embeddings else head)
  active = head
  trunk_blocks = [block(has_moe and i >= cfg.first_k_dense) for i in range(cfg.num_layers)]
  total += sum(t for t, _ in trunk_blocks)
  active += sum(a for _, a in trunk_blocks)

  mtp_total = mtp_active = 0
  for k in range(cfg.mtp.depth):
    t, a = block(has_moe and cfg.mtp.use_moe)
    if cfg.mtp.kind == "sequential":  # enorm, hnorm, 2D -> D projection, own final norm
      t, a = t + 2 * d * d + 3 * d, a + 2 * d * d
    mtp_total += t if k < cfg.mtp.modules else 0  # a module shared by the depths is stored once
    mtp_active += a + head  # every depth projects through the shared head
  total += mtp_total
  n_attn = cfg.num_layers + cfg.mtp.depth
  fwd = 2 * (active + mtp_active) + n_attn * attn_scores
  mtp_fwd = 2 * mtp_active + cfg.mtp.depth * attn_scores
  train = 3 * fwd
  if trainable == "mtp":
    train = fwd + 2 * mtp_fwd - 2 * cfg.mtp.depth * head
  return Cost(
    total_params=total,
    active_params=active + mtp_active,
    train_flops_per_token=train,
    mtp_train_flops_per_token=3 * mtp_fwd,
  )


def traced_matmul_flops(jaxpr, devices: int) -> float:
  """Matmul FLOPs per device of a traced program (`jax.jit(f).trace(...).jaxpr`): every
  `dot_general` and `ragged_dot_general` the program runs, rematerialised forwards included,
  each loop body as many times as the loop runs. XLA's cost analysis counts a loop body once,
  which in a step with scanned layers, query blocks and microbatches is most of the work.
  Outside `shard_map` shapes are global, so their FLOPs are split evenly over `devices`;
  inside, shapes are per shard of its manual axes and split evenly over the rest (per device,
  capacity padding included, where all are manual)."""
  return sum(traced_matmul_groups(jaxpr, devices).values())


def traced_matmul_groups(jaxpr, devices: int) -> collections.Counter:
  """`traced_matmul_flops` by einsum (`einsum_of`): what a device's share of each is."""

  def dot(eqn) -> float:
    """2 FLOPs per multiply-add: each output element sums over the contracted dimensions."""
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      groups = 1
    else:  # ragged_dot_general
      numbers = eqn.params["ragged_dot_dimension_numbers"]
      (contracting, _), _ = numbers.dot_dimension_numbers
      # With no group dimension in rhs the ragged dimension is contracted (the weight gradient,
      # G x K x N): each group's outputs sum over that group's rows only.
      groups = 1 if numbers.rhs_group_dimensions else eqn.invars[2].aval.shape[-1]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting) / groups

  def subjaxprs(value):
    if hasattr(value, "jaxpr") and hasattr(value, "consts"):  # ClosedJaxpr
      yield value.jaxpr
    elif hasattr(value, "eqns"):  # Jaxpr
      yield value
    elif isinstance(value, tuple | list):
      for v in value:
        yield from subjaxprs(v)

  def walk(jx, share: float) -> collections.Counter:
    total = collections.Counter()
    for eqn in jx.eqns:
      name = eqn.primitive.name
      if name in ("dot_general", "ragged_dot_general"):
        total[einsum_of(f"{eqn.source_info.name_stack}/{name}")] += dot(eqn) * share
      elif name in ("pallas_call", "mpmd_map") or (m := _CUDNN_TRACED.fullmatch(name)):  # by estimate or shapes
        floats = [v.aval.shape for v in eqn.invars if jnp.issubdtype(v.aval.dtype, jnp.floating)]  # bf16 too
        estimate = eqn.params.get("cost_estimate")
        if estimate:  # megablox's grouped matmuls
          flops = estimate.flops
        elif name == "pallas_call":  # splash
          flops = splash_flops(str(eqn.params.get("name", "")), floats)
        elif name == "mpmd_map":  # a Pallas Mosaic GPU kernel: the experts' grouped matmuls
          flops = grouped_matmul_flops(floats, eqn.outvars[0].aval.shape)
        else:  # cuDNN's fused attention, in JAX's BTNH layout (0)
          causal = "CAUSAL" in str(eqn.params.get("mask_type"))
          flops = cudnn_attention_flops(m[1], floats, causal) if str(eqn.params.get("layout")) == "0" else 0.0
        total[einsum_of(f"{eqn.source_info.name_stack}/{name}")] += flops * share
      elif name == "shard_map":  # shapes inside are per shard of the axes it makes manual
        manual = eqn.params["newly_manual_axes"]
        total.update(walk(eqn.params["jaxpr"], share * math.prod(eqn.params["mesh"].shape[a] for a in manual)))
      elif name == "scan":
        total.update(hlo.times(walk(eqn.params["jaxpr"].jaxpr, share), eqn.params["length"]))
      elif name == "cond":
        total.update(max((walk(b.jaxpr, share) for b in eqn.params["branches"]), key=lambda c: sum(c.values())))
      else:  # pjit, remat, custom_vjp, ...: their bodies once (a while_loop's too: no trip count)
        for v in eqn.params.values():
          for j in subjaxprs(v):
            total.update(walk(j, share))
    return total

  return walk(getattr(jaxpr, "jaxpr", jaxpr), 1.0 / devices)


_SPLASH = re.compile(r"splash_mha_(fwd|dq|dkv)")


def splash_flops(kernel: str, float_operands: list) -> float:
  """Matmul FLOPs of one pass of splash attention (`kernel`: the forward, dq or dkv kernel's
  name, else 0) as `attention.fused` runs it: causal, in square blocks, those above the
  diagonal skipped. Its first float operands are q (... x H x L x K), k and v (... x G x S x V).
  Per pair of query and key blocks: the scores (K), then forward: P V (V); dq: dP = dO V^T (V)
  and dQ = dS K (K); dkv: dP (V), dV = P^T dO (V) and dK = dS^T Q (K)."""
  from mtp_jax.model.attention import splash_block

  kind = _SPLASH.search(kernel)
  if not kind or len(float_operands) < 3 or len(float_operands[0]) < 3:
    return 0.0
  *batch, heads, length, k_dim = float_operands[0]
  v_dim = float_operands[2][-1]
  block = splash_block(length)
  n = length // block
  per_pair = {"fwd": k_dim + v_dim, "dq": 2 * k_dim + v_dim, "dkv": 2 * k_dim + 2 * v_dim}[kind[1]]
  return 2.0 * block * block * per_pair * math.prod(batch) * heads * n * (n + 1) // 2


# jax.nn.dot_product_attention(implementation="cudnn")'s primitives, and what XLA:GPU calls.
_CUDNN_TRACED = re.compile(r"dot_product_attention_(fwd|bwd)_wrapper")
_CUDNN_CALL = re.compile(r'custom_call_target="__cudnn\$fmha\w*?(Backward)?"')


def cudnn_attention_flops(kind: str, float_operands: list, causal: bool) -> float:
  """Matmul FLOPs of one call of cuDNN's fused attention (`kind`: "fwd" or "bwd"), whose first
  float operands are q (B x T x N x H), k (B x S x N x H) and v (B x S x N x Hv): JAX's BTNH
  layout. Per query and key pair: forward the scores (H) and P V (Hv); backward the scores again
  (H), dP = dO V^T (Hv), dV = P^T dO (Hv), dQ = dS K (H) and dK = dS^T Q (H). Causal: the pairs
  on and below the diagonal, as its flash kernels skip the tiles above."""
  if len(float_operands) < 3 or any(len(x) != 4 for x in float_operands[:3]):
    return 0.0
  (b, t, n, h), s, hv = float_operands[0], float_operands[1][1], float_operands[2][3]
  pairs = t * (t + 1) // 2 if causal and t == s else t * s
  return 2.0 * b * n * pairs * (h + hv if kind == "fwd" else 3 * h + 2 * hv)


def grouped_matmul_flops(float_operands: list, out: tuple[int, ...]) -> float:
  """Matmul FLOPs of a grouped-matmul kernel from its shapes (the Mosaic GPU experts, which carry
  no estimate): rows M x K against their group's weights G x K x N into M x N (ragged_dot), or
  rows M x K against M x N into each group's K x N (its weight gradient); 2 M K N either way,
  each row once. 0 for other shapes."""
  if len(float_operands) != 2 or len(float_operands[0]) != 2:
    return 0.0
  (m, k), b = float_operands
  if len(b) == 3 and b[1] == k and tuple(out) == (m, b[2]):
    return 2.0 * m * k * b[2]
  if len(b) == 2 and b[0] == m and len(out) == 3 and tuple(out[1:]) == (k, b[1]):
    return 2.0 * m * k * b[1]
  return 0.0


_EINSUM = re.compile(r"[A-Za-z]+(?:,[A-Za-z]+)*->[A-Za-z]*")


def einsum_of(name: str) -> str:
  """The innermost einsum named in a JAX name stack or an XLA op_name, else "ragged_dot",
  "pallas_call", "mpmd_map" (a Mosaic GPU kernel) or "dot_product_attention" for those, else "":
  the key that matches a traced matmul with the compiled instructions it became (where XLA keeps
  their names)."""
  found = _EINSUM.findall(name)
  kernels = ("ragged_dot", "pallas_call", "mpmd_map", "dot_product_attention")
  return found[-1] if found else next((k for k in kernels if k in name), "")


# ---- Matmul FLOPs of a compiled, partitioned program ------------------------------------

_GEMMS = ("__cublas$gemm", "__cublas$lt$matmul")  # XLA:GPU's matmul custom-calls


@dataclasses.dataclass(frozen=True)
class CompiledFlops:
  flops: float  # matmul FLOPs one device runs per call of the program
  by_einsum: dict[str, float]  # the same by `einsum_of` their op_name
  unknown_loops: int  # while loops with matmuls but no known trip count, each counted as running once
  recomputed: dict[str, float]  # the part of by_einsum that XLA's own rematerialisation repeats


def compiled_matmul_flops(hlo_text: str) -> CompiledFlops:
  """Matmul FLOPs per device of a compiled program (`jit(f).lower(...).compile().as_text()`):
  after partitioning, so each shape is what one device holds. Counts `dot`, `convolution`,
  `ragged-dot`, XLA:GPU's cuBLAS calls and Mosaic kernels by their cost estimate (XLA:TPU's
  ragged dot), inside fusions and calls, a while loop's body times the trip count XLA annotated,
  a conditional's costliest branch (hlo.walk), and apart the part XLA's own rematerialisation
  repeats to fit memory (hlo.recomputed). cuDNN's fused attention and the Mosaic GPU grouped
  matmuls count by their shapes (`cudnn_attention_flops`, `grouped_matmul_flops`)."""

  def measure(ins: hlo.Instruction, module: hlo.Module) -> collections.Counter | None:
    own = _instruction_flops(ins.shape, ins.opcode, ins.rest, module.shapes, ins.name)
    if not own:
      return None
    op_name = re.search(r'op_name="([^"]*)"', ins.rest)
    # XLA:TPU names no op for splash's kernels: their key is the traced one, "pallas_call".
    return collections.Counter(
      {einsum_of(op_name[1] if op_name else "pallas_call" if _SPLASH.match(ins.name) else ""): own}
    )

  module = hlo.parse(hlo_text)
  groups, unknown = hlo.walk(module, measure)
  again, _ = hlo.walk(module, measure, within=hlo.recomputed(module))
  return CompiledFlops(sum(groups.values()), dict(groups), unknown, dict(again))


def _convolution_flops(shape: str, rest: str, lhs: tuple[int, ...], rhs: tuple[int, ...]) -> float:
  """2 FLOPs per multiply-add of the window taps that read input. XLA:TPU writes batched and
  small matmuls as convolutions whose batch or head dim is a spatial dim, windowed over padding
  or base-dilated holes so that one tap per output reads input; counting every tap would count
  those matmuls several times over."""
  labels = re.search(r"dim_labels=([^_]+)_([^-]+)->(\S+?)[,\s]", rest + " ")
  out = hlo.dims(shape)
  if not labels or (len(labels[1]), len(labels[2]), len(labels[3])) != (len(lhs), len(rhs), len(out)):
    return 0.0
  lhs_labels, rhs_labels, out_labels = labels[1], labels[2], labels[3]
  spatial = sorted(c for c in rhs_labels if c.isdigit())
  window = rest.partition("window={")[2].partition("}")[0]
  fields = dict(re.findall(r"\b(size|stride|pad|lhs_dilate|rhs_dilate)=(\S+)", window))

  def per_dim(key: str, default):
    return fields[key].split("x") if key in fields else [default] * len(spatial)

  taps = 1.0
  for d, k, stride, pad, lhs_dilate, rhs_dilate in zip(
    spatial,
    per_dim("size", "1"),
    per_dim("stride", "1"),
    per_dim("pad", "0_0"),
    per_dim("lhs_dilate", "1"),
    per_dim("rhs_dilate", "1"),
    strict=True,
  ):
    low, high = (int(v) for v in pad.split("_"))
    taps *= _reading_taps(lhs[lhs_labels.index(d)], int(k), int(stride), low, high, int(lhs_dilate), int(rhs_dilate))
  rest_of_out = math.prod(n for n, label in zip(out, out_labels, strict=True) if not label.isdigit())
  features = math.prod(n for n, label in zip(rhs, rhs_labels, strict=True) if label == "i")
  return 2.0 * rest_of_out * features * taps


@functools.cache
def _reading_taps(n: int, k: int, stride: int, low: int, high: int, lhs_dilate: int, rhs_dilate: int) -> int:
  """Over all outputs along one spatial dim, the window taps that land on input, not on padding
  or a dilation hole."""
  extent = (n - 1) * lhs_dilate + 1
  outputs = (extent + low + high - ((k - 1) * rhs_dilate + 1)) // stride + 1
  if outputs <= 0:
    return 0
  p = np.arange(outputs)[:, None] * stride - low + np.arange(k)[None] * rhs_dilate
  return int(np.count_nonzero((p >= 0) & (p < extent) & (p % lhs_dilate == 0)))


def _instruction_flops(shape: str, opcode: str, rest: str, shapes: dict[str, str], name: str = "") -> float:
  """2 FLOPs per multiply-add of one dot-like instruction (`name`: the instruction's)."""
  if opcode not in ("dot", "convolution", "ragged-dot", "custom-call"):
    return 0.0
  out = math.prod(hlo.dims(shape))
  ops = hlo.operands(rest)
  if opcode == "dot":
    lhs = hlo.dims(shapes.get(ops[0], ""))
    return 2.0 * out * math.prod(lhs[d] for d in hlo.attr(rest, "lhs_contracting_dims"))
  if opcode == "ragged-dot":
    lhs, groups = hlo.dims(shapes.get(ops[0], "")), hlo.dims(shapes.get(ops[2], ""))
    contracting = hlo.attr(rest, "lhs_contracting_dims")
    # Ragged rows contracted (the weight gradient): each group's outputs sum over its own rows.
    share = groups[-1] if set(hlo.attr(rest, "lhs_ragged_dims")) & set(contracting) else 1
    return 2.0 * out * math.prod(lhs[d] for d in contracting) / share
  if opcode == "convolution":
    return _convolution_flops(shape, rest, hlo.dims(shapes.get(ops[0], "")), hlo.dims(shapes.get(ops[1], "")))
  if 'custom_call_target="tpu_custom_call"' in rest:  # a Mosaic kernel (ragged_dot on TPU): its own estimate
    estimate = re.search(r'"cost_estimate":\{"flops":"(\d+)"', rest)
    if estimate:
      return float(estimate[1])
    return splash_flops(name, _float_operands(rest))
  if 'custom_call_target="mosaic_gpu_v2"' in rest:  # a Pallas Mosaic GPU kernel: the experts' grouped matmuls
    return grouped_matmul_flops(_float_operands(rest), hlo.dims(shape))
  if m := _CUDNN_CALL.search(rest):  # XLA:GPU's cuDNN attention: its q, k and v are its first operands
    return cudnn_attention_flops("bwd" if m[1] else "fwd", _float_operands(rest), '"mask_type": "CAUSAL"' in rest)
  if any(f'custom_call_target="{g}"' in rest for g in _GEMMS):
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', rest)
    lhs = hlo.dims(shapes.get(ops[0], ""))
    dims = [int(d.strip('"')) for d in contracting[1].split(",") if d.strip()] if contracting else []
    return 2.0 * out * math.prod(lhs[d] for d in dims)
  return 0.0


def _float_operands(rest: str) -> list[tuple[int, ...]]:
  """The float operands' shapes of a custom-call, from its operand layout constraints."""
  operands = rest.partition("operand_layout_constraints={")[2].partition("=")[0]
  return [hlo.dims(a) for a in re.findall(r"\b(?:bf16|f16|f32)\[[0-9,]*\]", operands)]


REPEATED = 1.15  # a chip running more than this times its share of the traced matmuls is flagged


@dataclasses.dataclass(frozen=True)
class ChipWork:
  """Matmul FLOPs one chip runs per step, against its share of the program before partitioning."""

  traced: float  # per chip: the traced program's, global shapes split evenly (`traced_matmul_flops`)
  partitioned: float  # per chip: the compiled, partitioned program's (`compiled_matmul_flops`)
  recomputed: float  # of partitioned: what XLA's own rematerialisation runs again to fit memory
  worst: str  # the einsum whose matmuls a chip repeats most, XLA's recomputation apart ("": none named)
  worst_ratio: float  # their partitioned FLOPs, less XLA's recomputation, over their traced share
  unknown_loops: int
  devices: int = 1

  @property
  def ratio(self) -> float:
    return self.partitioned / self.traced if self.traced else 1.0

  def warning(self) -> str | None:
    """One line naming the likely cause when a chip runs more than REPEATED x its share, not
    counting what XLA recomputes to fit memory (no rule would split that)."""
    split = (self.partitioned - self.recomputed) / self.traced if self.traced else 1.0
    if split <= REPEATED:
      return None
    what = f"einsum {self.worst!r}" if self.worst else "matmuls no einsum names (or whose names XLA dropped)"
    if self.worst == "ragged_dot":  # the compiler's lowering, not the partitioning (experts.NATIVE)
      cause = (
        "XLA runs lax.ragged_dot on these devices as every row times every expert, masked; "
        "model.moe.kernel=auto picks a kernel that does not"
      )
    elif self.devices == 1:
      cause = "work the compiler adds to the traced program"
    else:
      cause = "work every chip repeats because the rules do not split it"
    return (
      f"a chip runs {split:.2f}x its share of the step's matmuls, most of the excess in {what} "
      f"({self.worst_ratio:.2f}x its share): {cause}"
    )


def chip_work(jaxpr, compiled_text: str, devices: int) -> ChipWork:
  traced = traced_matmul_groups(jaxpr, devices)
  compiled = compiled_matmul_flops(compiled_text)
  split = {k: v - compiled.recomputed.get(k, 0.0) for k, v in compiled.by_einsum.items()}
  excess = {k: v - traced.get(k, 0.0) for k, v in split.items()}
  worst = max(excess, key=excess.get, default="")
  share = traced.get(worst, 0.0)
  return ChipWork(
    traced=sum(traced.values()),
    partitioned=compiled.flops,
    recomputed=sum(compiled.recomputed.values()),
    worst=worst,
    worst_ratio=split.get(worst, 0.0) / share if share else math.inf,
    unknown_loops=compiled.unknown_loops,
    devices=devices,
  )
