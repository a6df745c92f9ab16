"""Eight fake CPU devices (set before JAX is imported) so sharded code runs in CI."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")  # catch silent broadcasting bugs

from mtp_jax import config  # noqa: E402

# A tiny model shared by the unit tests: small enough that each compile takes seconds.
TINY = [
  "model.vocab_size=320",
  "model.d_model=32",
  "model.num_layers=2",
  "model.first_k_dense=1",
  "model.d_ff=64",
  "model.attention.num_heads=4",
  "model.attention.num_kv_heads=2",
  "model.attention.head_dim=8",
  "model.attention.kv_lora_rank=16",
  "model.attention.qk_nope_head_dim=8",
  "model.attention.qk_rope_head_dim=4",
  "model.attention.v_head_dim=8",
  "model.moe.num_experts=8",
  "model.moe.top_k=2",
  "model.moe.expert_d_ff=16",
  "data.seq_len=16",
  "train.batch_size=8",
  "train.progress_bar=false",
]


def tiny_config(*overrides: str) -> config.Config:
  return config.load(None, [*TINY, *overrides])


@pytest.fixture
def tiny():
  return tiny_config
