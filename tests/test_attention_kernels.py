"""`model.attention.impl`: Pallas splash attention (in interpret mode on these CPU devices)
against the xla reference, alone, under a mesh and in a train step; which kernel `auto` picks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import STEP_KEYS, run_steps
from jax.sharding import Mesh, PartitionSpec

from mtp_jax import sharding
from mtp_jax.config import ConfigError, MeshConfig
from mtp_jax.model import attention
from mtp_jax.model.flops import compiled_matmul_flops, cudnn_attention_flops, splash_flops

L = 128  # splash's smallest sequence: one 128-wide block
# Row 0 packs three documents and ends in padding (segment 0); row 1 is one document.
SEGMENTS = np.array([[1] * 50 + [2] * 40 + [3] * 30 + [0] * 8, [5] * L], np.int32)
SHAPES = {  # (query heads, key/value heads, query/key dim, value dim)
  "gqa": (4, 2, 16, 16),
  "mla": (4, 4, 24, 16),  # MLA: 16 + 8 query/key dims (no RoPE / RoPE), narrower values
  "mqa": (4, 1, 16, 16),
}


def _inputs(kind: str, batch: int = 2):
  h, g, k_dim, v_dim = SHAPES[kind]
  keys = jax.random.split(jax.random.key(0), 4)
  q = jax.random.normal(keys[0], (batch, L, h, k_dim), jnp.float32)
  k = jax.random.normal(keys[1], (batch, L, g, k_dim), jnp.float32)
  v = jax.random.normal(keys[2], (batch, L, g, v_dim), jnp.float32)
  weights = jax.random.normal(keys[3], (batch, L, h, v_dim), jnp.float32)  # a loss that reads every output
  return q, k, v, weights, jnp.asarray(np.tile(SEGMENTS, (batch // 2, 1)))


def _loss(impl: str, q, k, v, weights, segments):
  out = attention.attend(q, k, v, attention.Causal(segments), q.shape[-1] ** -0.5, impl=impl)
  return jnp.sum(out * weights), out


# float32 throughout: the two differ only in the order of their sums (splash adds up 128-key
# blocks with a running maximum), about 1e-6 relative per output here.
@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_splash_equals_xla_within_packed_documents_values_and_gradients(kind):
  q, k, v, weights, segments = _inputs(kind)
  grad = jax.jit(jax.grad(_loss, argnums=(1, 2, 3), has_aux=True), static_argnums=0)
  (dq, dk, dv), out = grad("splash", q, k, v, weights, segments)
  (rq, rk, rv), ref = grad("xla", q, k, v, weights, segments)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
  for name, a, b in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
  # The documents really are kept apart: a key in document 1 moves no output of document 2.
  moved = _loss("splash", q, k.at[0, 10].add(3.0), v, weights, segments)[1]
  assert not np.allclose(moved[0, 10:50], out[0, 10:50])
  np.testing.assert_array_equal(moved[0, 50:], out[0, 50:])


@pytest.mark.parametrize("kind", ["gqa", "mqa"])
def test_splash_under_a_mesh_runs_on_each_devices_rows_and_heads(kind):
  """data 2 x fsdp 2 x tensor 2: rows over data and fsdp, query heads over tensor; the MQA
  case has one key/value head, which the mesh cannot split, so it is repeated per query head."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 1, 1, 2), ("data", "fsdp", "sequence", "expert", "tensor"))
  rules = MeshConfig().rules
  q, k, v, weights, segments = _inputs(kind, batch=4)

  def run(impl):
    with sharding.activate(mesh, rules):
      return jax.jit(lambda *a: _loss(impl, *a)[1])(q, k, v, weights, segments)

  np.testing.assert_allclose(run("splash"), run("xla"), rtol=1e-5, atol=1e-5)
  # The kernel sees one device's block: B/4 rows, H/2 heads (read from the traced program).
  with sharding.activate(mesh, rules):
    jaxpr = jax.make_jaxpr(lambda *a: _loss("splash", *a)[1])(q, k, v, weights, segments)
  (inner,) = [e for e in jaxpr.eqns if e.primitive.name == "shard_map"]
  local = [(v.aval.shape, spec) for v, spec in zip(inner.params["jaxpr"].invars, inner.params["in_specs"], strict=True)]
  q_local, k_local = [(shape, spec) for shape, spec in local if len(shape) == 4][:2]
  assert q_local == ((1, L, 2, SHAPES[kind][2]), PartitionSpec(("data", "fsdp"), None, "tensor", None))
  # GQA: its share of the 2 key/value heads; MQA: the one head repeated to the 4 query heads, then split
  assert k_local[0][2] == {"gqa": 1, "mqa": 2}[kind]
  assert (1, L) in [shape for shape, _ in local]  # the segment ids: its rows


def test_a_train_step_with_splash_equals_the_xla_step(tiny):
  """The whole step (MLA, MTP depth 1, packed data, bfloat16 off): splash in Pallas interpret
  mode against the einsum reference, which `mtp-train model.attention.impl=splash` runs on CPU."""
  overrides = ["data.seq_len=128", "model.attention.kind=mla", "train.batch_size=2", "model.dtype=float32"]
  one = jax.devices()[:1]
  xla, _ = run_steps(tiny(*overrides, "model.attention.impl=xla"), steps=2, devices=one)
  splash, _ = run_steps(tiny(*overrides, "model.attention.impl=splash"), steps=2, devices=one)
  for a, b in zip(xla, splash, strict=True):
    for key in (*STEP_KEYS[:3], "grad_norm"):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)


def test_auto_picks_splash_on_tpu_cudnn_on_gpu_and_xla_elsewhere():
  hopper = {"capability": 9.0, "qk_dim": 192}  # MLA's 128 + 64 query/key dims
  assert attention.choose("auto", "tpu", 4096) == ("splash", "auto on TPU")
  assert attention.choose("auto", "gpu", 4096, **hopper) == ("cudnn", "auto on GPU")
  assert attention.choose("auto", "cpu", 4096) == ("xla", "auto on cpu")
  # Where the platform's kernel cannot serve the step, auto says why and keeps xla.
  for platform, seq_len, extra, why in [
    ("tpu", 100, {}, "multiple of 128"),
    ("tpu", 4096, {"sequence_split": True}, "does not split the sequence"),
    ("gpu", 4096, {"capability": 8.0, "qk_dim": 192}, "at most 128 dims"),
    ("gpu", 4096, {**hopper, "dtype": "float32"}, "needs model.dtype bfloat16"),
  ]:
    impl, said = attention.choose("auto", platform, seq_len, **extra)
    assert impl == "xla" and why in said, said
  assert attention.choose("splash", "cpu", 256) == ("splash", "asked for; off TPU in Pallas interpret mode, slow")
  assert attention.choose("xla", "tpu", 4096) == ("xla", "asked for")


@pytest.mark.parametrize(
  "impl, platform, seq_len, extra, message",
  [
    ("splash", "gpu", 256, {}, "is a TPU kernel"),
    ("splash", "tpu", 200, {}, "data.seq_len a multiple of 128 (it is 200)"),
    ("splash", "tpu", 256, {"sequence_split": True}, "does not split the sequence"),
    ("cudnn", "cpu", 256, {}, "needs a GPU (these devices are cpu)"),
    ("cudnn", "gpu", 256, {"qk_dim": 192, "capability": 8.0}, "at most 128 dims"),
    ("cudnn", "gpu", 256, {"dtype": "float32"}, "needs model.dtype bfloat16 or float16 (it is float32)"),
  ],
)
def test_asking_for_a_kernel_that_cannot_serve_the_step_is_a_one_line_config_error(
  impl, platform, seq_len, extra, message
):
  with pytest.raises(ConfigError, match=rf"model\.attention\.impl={impl}") as err:
    attention.choose(impl, platform, seq_len, **extra)
  assert message in str(err.value) and "\n" not in str(err.value)


def test_mtp_train_refuses_cudnn_on_cpu_in_one_line(tiny):
  from mtp_jax.train.program import build

  with pytest.raises(ConfigError, match="needs a GPU"):
    build(tiny("model.attention.impl=cudnn"), jax.devices()[:1])


@pytest.mark.parametrize("kind", ["gqa", "mla"])
def test_the_cudnn_call_keeps_documents_apart_and_pads_mla_values_exactly(kind):
  """The call the cudnn kernel makes (mask, causal flag, scale, MLA's zero-padded values), run
  through XLA's implementation of the same function: equal to the xla kernel. (cuDNN itself
  needs a GPU; this checks everything around it.)"""
  q, k, v, _, segments = _inputs(kind)
  scale = q.shape[-1] ** -0.5
  out = attention._cudnn_local(q, k, v, segments, scale=scale, implementation="xla")
  ref = attention.attend(q, k, v, attention.Causal(segments), scale)
  np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_splash_flops_count_the_causal_blocks_of_each_pass():
  # One row, one head, 1024 positions in 512-wide blocks: 3 of the 4 block pairs run.
  q, k, v = (1, 1, 1024, 192), (1, 1, 1024, 192), (1, 1, 1024, 128)
  pairs = 3 * 512 * 512
  assert splash_flops("splash_mha_fwd_segmented_residuals", [q, k, v]) == 2 * pairs * (192 + 128)
  assert splash_flops("splash_mha_dq_segmented_no_residuals", [q, k, v]) == 2 * pairs * (2 * 192 + 128)
  assert splash_flops("splash_mha_dkv_segmented_no_residuals", [q, k, v]) == 2 * pairs * 2 * (192 + 128)
  assert splash_flops("gmm", [q, k, v]) == 0.0


# XLA:GPU's cuDNN attention calls as jax 0.11.2 compiles them for an H200 (trimmed): the forward
# and backward of 2 rows of 8 positions, 4 heads, MLA's 192-wide queries and keys and its values
# padded to 192; causal.
_CUDNN_HLO = """HloModule jit_f, entry_computation_layout={(bf16[2,8,4,192]{3,2,1,0})->bf16[2,4,8,192]{3,1,2,0}}

ENTRY %main.1 (q.1: bf16[2,8,4,192]) -> bf16[2,4,8,192] {
  %q.1 = bf16[2,8,4,192]{3,2,1,0} parameter(0)
  %fwd.1 = (bf16[2,4,8,192]{3,1,2,0}, f32[2,4,8]{2,1,0}, u8[0]{0}) custom-call(%q.1, %q.1, %q.1), \
custom_call_target="__cudnn$fmhaScaleBiasSoftmax", operand_layout_constraints={bf16[2,8,4,192]{3,2,1,0}, \
bf16[2,8,4,192]{3,2,1,0}, bf16[2,8,4,192]{3,2,1,0}}, metadata={op_name="jit(f)/jvp()/dot_product_attention_fwd"}, \
backend_config={"cudnn_fmha_backend_config": {"is_flash_attention": true, "mask_type": "CAUSAL"}}
  %o.1 = bf16[2,4,8,192]{3,1,2,0} get-tuple-element(%fwd.1), index=0
  %bwd.1 = (bf16[2,8,4,192]{3,2,1,0}, bf16[2,8,4,192]{3,2,1,0}, bf16[2,8,4,192]{3,2,1,0}, u8[0]{0}) \
custom-call(%q.1, %q.1, %q.1, %o.1), custom_call_target="__cudnn$fmhaScaleBiasSoftmaxBackward", \
operand_layout_constraints={bf16[2,8,4,192]{3,2,1,0}, bf16[2,8,4,192]{3,2,1,0}, bf16[2,8,4,192]{3,2,1,0}, \
bf16[2,4,8,192]{3,1,2,0}}, metadata={op_name="jit(f)/transpose(jvp())/dot_product_attention_bwd"}, \
backend_config={"cudnn_fmha_backend_config": {"is_flash_attention": true, "mask_type": "CAUSAL"}}
  ROOT %dq.1 = bf16[2,8,4,192]{3,2,1,0} get-tuple-element(%bwd.1), index=0
}
"""


def test_cudnn_flops_count_the_causal_pairs_of_each_pass():
  """Forward: scores and P V; backward: the scores again, dP, dV, dQ and dK. Causal: the pairs
  on and below the diagonal. The same from the traced shapes and from XLA:GPU's calls."""
  q, k, v = (2, 8, 4, 192), (2, 8, 4, 192), (2, 8, 4, 128)
  pairs = 2 * 4 * (8 * 9 // 2)  # rows x heads x causal pairs
  assert cudnn_attention_flops("fwd", [q, k, v], causal=True) == 2 * pairs * (192 + 128)
  assert cudnn_attention_flops("bwd", [q, k, v], causal=True) == 2 * pairs * (3 * 192 + 2 * 128)
  assert cudnn_attention_flops("fwd", [q, k, v], causal=False) == 2 * 2 * 4 * 64 * (192 + 128)
  counted = compiled_matmul_flops(_CUDNN_HLO)
  both = 2 * pairs * (192 + 192) + 2 * pairs * (3 * 192 + 2 * 192)
  assert counted.flops == both and counted.by_einsum == {"dot_product_attention": both}, counted
