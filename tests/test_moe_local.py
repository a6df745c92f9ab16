"""MoE layers on meshes with no expert axis: each device routes, dispatches and computes its own
tokens (the local plan), read from the compiled, partitioned program."""

import functools
import re

import jax
import pytest
from conftest import tiny_config
from moe_layer import B, L, assert_same, compiled

from mtp_jax import hlo, sharding
from mtp_jax.model import dispatch
from mtp_jax.model.flops import compiled_matmul_flops

ROOMY = "model.moe.capacity_factor=4"  # = E / K: every device's buffers hold all its tokens
MESHES = {
  "data8": ["mesh.data=8"],
  "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
  "data2_fsdp4": ["mesh.data=2", "mesh.fsdp=4"],
  "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}
MODES = {"dropless": [], "capacity": ["model.moe.mode=capacity", ROOMY]}


@functools.cache
def _one_device(mode):
  fn, args = compiled(tiny_config(*MODES[mode]))
  (_, (y, aux)), grads = fn(*args)
  return fn.as_text(), jax.device_get((y, aux, grads))


def _flops(hlo_text: str) -> float:
  return compiled_matmul_flops(hlo_text).flops


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mesh", MESHES)
def test_each_device_computes_its_own_tokens(mesh, mode):
  cfg = tiny_config(*MODES[mode], *MESHES[mesh])
  devices = sharding.make_mesh(cfg.mesh, jax.devices())
  assert dispatch.dispatch_plan(cfg.model.moe, devices, cfg.mesh.rules, (B, L)) == ("local", None)
  fn, args = compiled(cfg, devices)
  (_, (y, aux)), grads = fn(*args)

  # The layer equals the one-device layer: dropless always, capacity with room for every token.
  text_one, (y1, aux1, grads1) = _one_device(mode)
  assert int(aux.dropped) == int(aux1.dropped) == 0
  assert_same((y1, aux1, grads1), (y, aux, grads))

  # Each device's matmuls are its share of the one-device layer's: its tokens (and its half of
  # the hidden dims under tensor=2), not the batch's. (Dropless on CPU pads each expert's rows
  # to whole blocks, relatively less for fewer rows.)
  text = fn.as_text()
  ratio = _flops(text) * devices.size / _flops(text_one)
  assert 0.5 < ratio <= 1.15, ratio
  if mode == "capacity":  # buffers of C = E / K x local tokens x K / E rows: the device's tokens
    tokens = B * L // (devices.size // devices.shape["tensor"])
    f = cfg.model.moe.expert_d_ff // devices.shape["tensor"]
    shapes = set(re.findall(r"= f32\[(\d+,\d+,\d+)\]\S* dot\(", text))
    assert f"8,{tokens},{f}" in shapes and not any(s.split(",")[1] == str(B * L) for s in shapes), shapes
  # The expert weights come in as stored, D split over fsdp, and their gradient leaves by a
  # reduce-scatter to those rows: no all-reduce sums a whole weight stack over the devices.
  if devices.shape["fsdp"] > 1:
    e, d, f = cfg.model.moe.num_experts, cfg.model.d_model, cfg.model.moe.expert_d_ff // devices.shape["tensor"]
    stacks = {f"{e},{d},{f}", f"{e},{f},{d}"}
    summed = {
      dims
      for computation in hlo.parse(text).computations.values()
      for ins in computation
      if ins.opcode in ("all-reduce", "all-reduce-start")
      for dims in re.findall(r"f32\[([0-9,]+)\]", ins.shape)
    }
    assert not stacks & summed, summed
    assert "reduce-scatter" in hlo.collectives(text).by_kind()
  # Routing runs on the device's tokens too (top-k over local rows, never the batch's).
  assert "TopK" in text and f"f32[{B * L},8]" not in "".join(line for line in text.splitlines() if "TopK" in line), (
    "top-k over the whole batch"
  )


def test_explicit_gspmd_is_the_whole_microbatch_on_every_device():
  """dispatch=gspmd keeps the old program (the compiler places the work): with no expert axis
  every device computes the experts of every token, which the local plan avoids."""
  cfg = tiny_config("model.moe.mode=capacity", ROOMY, "model.moe.dispatch=gspmd", *MESHES["data8"])
  mesh = sharding.make_mesh(cfg.mesh, jax.devices())
  kind, note = dispatch.dispatch_plan(cfg.model.moe, mesh, cfg.mesh.rules, (B, L))
  assert kind == "gspmd" and "whole microbatch" in note
  fn, _ = compiled(cfg, mesh)
  ratio = _flops(fn.as_text()) * mesh.size / _flops(_one_device("capacity")[0])
  assert ratio > 4, ratio
