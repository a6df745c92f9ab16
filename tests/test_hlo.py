"""hlo.collectives: what each device sends, read from compiled programs on 8 CPU devices and
from lines as XLA:TPU and XLA:GPU print them; hlo.recomputed: the work XLA's own
rematerialisation repeats."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mtp_jax import compile as mtp_compile
from mtp_jax import hlo
from mtp_jax.model.flops import ChipWork, compiled_matmul_flops


@functools.cache
def _mesh():
  return jax.make_mesh((2, 4), ("a", "b"), devices=jax.devices()[:8])


def _sent(f, *shapes, trips: int = 1):
  """Compile `f` as a shard_map over a 2 x 4 mesh (each input split over both axes) inside a
  loop of `trips`, and read its collectives."""
  mesh = _mesh()
  body = jax.shard_map(f, mesh=mesh, in_specs=P(("a", "b")), out_specs=P(("a", "b")), check_vma=False)

  def looped(x):  # each turn depends on the last, so nothing leaves the loop
    return jax.lax.fori_loop(0, trips, lambda i, x: body(x) * 0.5, x)

  x = jax.ShapeDtypeStruct(shapes[0], jnp.float32, sharding=jax.NamedSharding(mesh, P(("a", "b"))))
  return hlo.collectives(jax.jit(looped).lower(x).compile().as_text())


def _one(c: hlo.Collectives, kind: str) -> hlo.Collective:
  found = [x for x in c.each if x.kind == kind]
  assert len(found) == 1, c.each
  return found[0]


# Each device holds 32 x 16 float32 (2 KiB) of a 256 x 16 array.
ROWS, ONE = (256, 16), 32 * 16 * 4


def test_an_all_gather_sends_its_share_to_the_rest_of_its_group_every_turn():
  # Gathered over b (4 devices): the result is 4 shares; a device sends 3/4 of it, 5 turns.
  c = _sent(lambda x: jax.lax.all_gather(x, "b", tiled=True)[:32], ROWS, trips=5)
  x = _one(c, "all-gather")
  assert x.calls == 5 and x.sent == pytest.approx(5 * 4 * ONE * 3 / 4) and x.shape == "f32[128,16]"


def test_an_all_reduce_sends_twice_its_data_less_a_share():
  # A sum over a (2 devices): a reduce-scatter then an all-gather, each (n-1)/n of the data.
  c = _sent(lambda x: jax.lax.psum(x, "a"), ROWS, trips=3)
  x = _one(c, "all-reduce")
  assert x.calls == 3 and x.sent == pytest.approx(3 * 2 * ONE * 1 / 2)


def test_an_all_to_all_keeps_one_share_and_sends_the_rest():
  c = _sent(lambda x: jax.lax.all_to_all(x, ("a", "b"), 0, 0, tiled=True), ROWS)
  x = _one(c, "all-to-all")
  assert x.calls == 1 and x.sent == pytest.approx(ONE * 7 / 8)


def test_a_permutation_sends_everything_and_names_its_operation():
  c = _sent(lambda x: jax.lax.ppermute(x, "b", [(i, (i + 1) % 4) for i in range(4)]), ROWS, trips=2)
  x = _one(c, "collective-permute")
  assert x.calls == 2 and x.sent == pytest.approx(2 * ONE) and "ppermute" in x.op
  assert c.by_kind() == {"collective-permute": (x.sent, 2)} and c.sent == x.sent


def test_a_program_without_collectives_has_none():
  c = _sent(lambda x: x + 1, ROWS, trips=2)
  assert c.each == [] and c.sent == 0


# Lines as XLA:TPU and XLA:GPU print them (from compiled programs, shortened): asynchronous
# starts whose tuple holds the operand before the result, and the three replica group spellings.
_TEXT = "\n".join(
  [
    "HloModule jit_step, num_partitions=8",
    "",
    "ENTRY %main (p: f32[4,128]) -> f32[4,128] {",
    "  %p = f32[4,128]{1,0} parameter(0)",
    "  %q = bf16[1,96,4,24]{3,2,0,1:T(4,128)(2,1)} parameter(1)",
    "  %ag = (bf16[1,96,4,24]{3,2,0,1:T(4,128)(2,1)}, bf16[1,192,4,24]{3,2,0,1}) all-gather-start(%q), channel_id=1, "
    "replica_groups=mesh['axis_0'=2,'axis_1'=1,'axis_2'=4] {'axis_0'}, dimensions={1}, "
    'metadata={op_name="jit(step)/jvp()/while/body/closed_call/bld,dhk->blhk/dot_general"}',
    "  %agd = bf16[1,192,4,24]{3,2,0,1} all-gather-done(%ag)",
    "  %cp = (f32[4,128]{1,0:T(4,128)}, f32[4,128]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%p), "
    "channel_id=2, source_target_pairs={{0,0},{1,2},{2,1},{3,3}}",
    "  %cpd = f32[4,128]{1,0} collective-permute-done(%cp)",
    "  %self = (f32[4,128]{1,0}, f32[4,128]{1,0}, u32[], u32[]) collective-permute-start(%p), channel_id=3, "
    "source_target_pairs={{0,0},{1,1}}",
    "  %ar = f32[4,128]{1,0} all-reduce-start(%p), channel_id=4, replica_groups=[2,4]<=[8], to_apply=%add",
    "  %ard = f32[4,128]{1,0} all-reduce-done(%ar)",
    "  %rs = f32[1,128]{1,0} reduce-scatter(%p), channel_id=5, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}",
    "  ROOT %all = f32[4,128]{1,0} all-reduce(%p), channel_id=6, replica_groups={}, to_apply=%add",
    "}",
  ]
)


def test_collectives_as_accelerators_print_them():
  c = {x.shape: x for x in hlo.collectives(_TEXT).each}
  gathered = 1 * 192 * 4 * 24 * 2
  # The start's tuple repeats its operand: the result is the second array, gathered over axis_0 (2).
  assert c["bf16[1,192,4,24]"].sent == gathered / 2 and c["bf16[1,192,4,24]"].op == "jvp()/bld,dhk->blhk/dot_general"
  data = 4 * 128 * 4
  by = hlo.collectives(_TEXT).by_kind()
  assert by["collective-permute"] == (data, 2)  # %self sends nothing: each device keeps its own
  assert by["all-reduce"] == (pytest.approx(2 * data * 3 / 4 + 2 * data * 7 / 8), 2)  # groups of 4; {}: all 8
  assert by["reduce-scatter"] == (pytest.approx(data * 3 / 4), 1)
  assert "all-gather" in by and len(by) == 4


# XLA:TPU's asynchronous token exchanges, as MaxText's 671B step prints them (shortened): the
# start's tuple holds its operands (send buffer, receive buffer, offsets and sizes), then its result.
_EXCHANGES = "\n".join(
  [
    "HloModule jit_step, num_partitions=8",
    "",
    "ENTRY %main (p: bf16[64,2,16]) -> bf16[80,2,16] {",
    "  %p = bf16[64,2,16]{2,1,0} parameter(0)",
    "  %r = bf16[80,2,16]{2,1,0} parameter(1)",
    "  %o = s32[4]{0} parameter(2)",
    "  %rs = ((bf16[64,2,16]{2,1,0:T(2,128)(2,1)}, bf16[80,2,16]{2,1,0}, s32[4]{0}, s32[4]{0}, s32[4]{0}, "
    "/*index=5*/s32[4]{0}), bf16[80,2,16]{2,1,0}, u32[]{:S(2)}, u32[]{:S(2)}) ragged-all-to-all-start(%p, %r, %o, "
    "%o, %o, /*index=5*/%o), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7}}, "
    'metadata={op_name="jit(step)/jvp()/shard_map/ragged_all_to_all"}',
    "  %rd = bf16[80,2,16]{2,1,0} ragged-all-to-all-done(%rs)",
    "  %as = ((bf16[64,2,16]{2,1,0}), bf16[64,2,16]{2,1,0}) all-to-all-start(%p), channel_id=2, "
    "replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}",
    "  %ad = bf16[64,2,16]{2,1,0} all-to-all-done(%as)",
    "  %x = bf16[64,2,16]{2,1,0} all-reduce-scatter-start(%p), channel_id=3, replica_groups={}",
    "  ROOT %y = bf16[80,2,16]{2,1,0} all-reduce-scatter-done(%x)",
    "}",
  ]
)


def test_asynchronous_exchanges_count_at_their_start_and_unknown_collectives_are_reported():
  c = hlo.collectives(_EXCHANGES)
  sent = 64 * 2 * 16 * 2
  # A ragged exchange counts its whole send buffer, the first operand, not the receive buffer.
  assert c.by_kind() == {"ragged-all-to-all": (sent * 3 / 4, 1), "all-to-all": (sent / 2, 1)}
  assert {x.kind: x.shape for x in c.each} == {"ragged-all-to-all": "bf16[80,2,16]", "all-to-all": "bf16[64,2,16]"}
  assert c.unread == {"all-reduce-scatter-start": 1} and c.loops_once == 0
  assert "does not know: all-reduce-scatter-start (1 calls)" in mtp_compile._collectives(c)[-1]


# XLA:TPU's reduce-scatter as it prints it (from 671B's compiled step, shortened): an all-reduce of
# the padded gradient and the device's slice of it, in a kCustom fusion named all-reduce-scatter.
_FUSED_SCATTER = "\n".join(
  [
    "HloModule jit_step, num_partitions=8",
    "",
    "%all-reduce-scatter.6.clone.1 (input.39: bf16[60,16]) -> bf16[8,16] {",
    "  %input.39 = bf16[60,16]{1,0:T(8,128)(2,1)} parameter(0)",
    "  %constant.1 = bf16[] constant(0)",
    "  %pad.1 = bf16[64,16]{1,0:T(8,128)(2,1)} pad(%input.39, %constant.1), padding=0_4x0_0",
    "  %all-reduce.308 = bf16[64,16]{1,0:T(8,128)(2,1)} all-reduce(%pad.1), channel_id=240, "
    "replica_groups={{0,2,4,6,8,10,12,14},{1,3,5,7,9,11,13,15}}, to_apply=%add",
    "  %partition-id.1 = u32[] partition-id()",
    "  ROOT %dynamic-slice.1 = bf16[8,16]{1,0:T(8,128)(2,1)} dynamic-slice(%all-reduce.308, %partition-id.1), "
    "dynamic_slice_sizes={8,16}",
    "}",
    "",
    "ENTRY %main (p: bf16[60,16]) -> bf16[8,16] {",
    "  %p = bf16[60,16]{1,0} parameter(0)",
    "  %whole = bf16[60,16]{1,0} all-reduce(%p), channel_id=1, replica_groups=[2,8]<=[16], to_apply=%add",
    "  ROOT %f = bf16[8,16]{1,0} fusion(%whole), kind=kCustom, calls=%all-reduce-scatter.6.clone.1",
    "}",
  ]
)


def test_xla_tpu_s_fused_reduce_scatter_reads_as_one():
  c = hlo.collectives(_FUSED_SCATTER)
  padded = 64 * 16 * 2
  # Inside the fusion: the reduce-scatter it implements, of the padded input, named by the slice it
  # returns. Outside: an all-reduce, both phases.
  assert {(x.kind, x.shape): x.sent for x in c.each} == {
    ("reduce-scatter", "bf16[8,16]"): pytest.approx(padded * 7 / 8),
    ("all-reduce", "bf16[60,16]"): pytest.approx(2 * 60 * 16 * 2 * 7 / 8),
  }


def test_sends_between_slices_count_their_buffer_by_the_collective_they_serve():
  """XLA:TPU's multi-slice programs hand what crosses DCN to its megascale runtime by `send`
  (from 671B's step on 4xv6e-256, shortened); a send to the host is not between slices."""
  text = "\n".join(
    [
      "HloModule jit_step, num_partitions=8",
      "",
      "ENTRY %main (p: bf16[1,448,64]) -> bf16[1,448,64] {",
      "  %p = bf16[1,448,64]{2,1,0} parameter(0)",
      "  %a = token[] after-all()",
      "  %s = (bf16[1,448,64]{2,1,0:T(8,128)(2,1)}, u32[]{:S(2)}, token[]) send(%p, %a), channel_id=16, "
      'is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",'
      '_xla_host_transfer_rendezvous="all-gather.486_0",_xla_megascale_target="{1,2,3,4}x{0:255}",'
      '_xla_megascale_transfer_type="REDUCE_SCATTER"}',
      "  %h = (bf16[1,448,64]{2,1,0}, u32[], token[]) send(%p, %a), channel_id=17, is_host_transfer=true",
      "  ROOT %r = bf16[1,448,64]{2,1,0} copy(%p)",
      "}",
    ]
  )
  c = hlo.collectives(text)
  assert [(x.kind, x.shape, x.sent, x.calls) for x in c.each] == [
    ("dcn reduce-scatter", "bf16[1,448,64]", 448 * 64 * 2, 1)
  ]
  assert "dcn: each buffer handed to the runtime that moves it between slices, once" in mtp_compile._collectives(c)[0]


def test_groups_of_one_device_send_nothing_and_are_left_out():
  one = "\n".join(
    [
      "HloModule jit_step, num_partitions=1",
      "",
      "ENTRY %main (p: f32[4]) -> f32[4] {",
      "  %p = f32[4]{0} parameter(0)",
      "  ROOT %ar = f32[4]{0} all-reduce(%p), channel_id=1, replica_groups={}, to_apply=%add",
      "}",
    ]
  )
  assert hlo.collectives(one).each == [] and hlo.collectives(one.replace("=1", "=2", 1)).sent == 2 * 16 / 2


@pytest.mark.parametrize(
  "groups, n",
  [
    ("replica_groups={{0,1},{2,3}}", 2),
    ("replica_groups=[4,2]<=[8]", 2),
    ("replica_groups=[2,4]<=[4,2]T(1,0)", 4),
    ("replica_groups=mesh['data'=2,'fsdp'=4] {'fsdp'}", 4),
    ("replica_groups=mesh['data'=2,'fsdp'=2,'expert'=2] {'data','expert'}", 4),
    ("replica_groups={}", 8),
    ("channel_id=1", 8),
  ],
)
def test_group_sizes_in_each_spelling(groups, n):
  assert hlo.group_size(f"%p), {groups}, dimensions={{0}}", 8) == n


def test_bytes_of_shapes():
  assert hlo.nbytes("bf16[2,3]{1,0:T(2,128)(2,1)}") == 12
  assert hlo.nbytes("(f32[4]{0}, s8[3], pred[], u32[]{:S(2)})") == 16 + 3 + 1 + 4
  assert hlo.nbytes("f8e4m3fn[10]") == 10 and hlo.nbytes("s4[4]") == 2
  assert np.isclose(hlo.nbytes("f32[]"), 4)


@pytest.mark.parametrize(
  "op_name, short",
  [
    ("jit(train_step)/jvp()/while/body/closed_call/bld,dhk->blhk/dot_general", "jvp()/bld,dhk->blhk/dot_general"),
    ("jit(train_step)/jvp()/while/body/closed_call/(gather:reduce_sum:reduce_sum)", "jvp()/gather, jvp()/reduce_sum"),
    (
      "jit(s)/transpose(jvp())/(a/dot_general:b/dot_general:reduce_sum:psum)",
      "transpose(jvp())/a/dot_general, transpose(jvp())/b/dot_general and 2 more",
    ),
    ("jit(s)/transpose(jvp(jit(_take)))/scatter-add", "transpose(jvp(jit(_take)))/scatter-add"),
  ],
)
def test_operation_names_are_shortened(op_name, short):
  assert hlo.short_op(op_name) == short


def test_a_combined_all_reduce_is_named_by_its_count_and_largest_array():
  shape = "(f32[2,24,96]{2,1,0}, f32[96]{0}, f32[8,96,96]{2,1,0}, /*index=3*/f32[96,8]{1,0})"
  ins = hlo.Instruction("ar", shape, "all-reduce", "%a, %b, %c, %d), replica_groups={}")
  assert hlo.result_shape(ins) == "4 arrays (the largest f32[8,96,96])"


# XLA's own rematerialisation as XLA:TPU prints it (from 671B's step on 2xv6e-256, shortened):
# in a loop of 3, an instruction and its clone both run (x, x.remat); a fusion whose original
# is gone was moved, not repeated (f.remat), but its second clone repeats it (f.remat2, calling
# a .clone of the fused computation); a gather is sent twice; the _compressed copies move layouts.
_RECOMPUTED = "\n".join(
  [
    "HloModule jit_step, num_partitions=8",
    "",
    "%fused (a: bf16[4,8], b: bf16[8,16]) -> bf16[4,16] {",
    "  %a = bf16[4,8]{1,0} parameter(0)",
    "  %b = bf16[8,16]{1,0} parameter(1)",
    "  ROOT %d = bf16[4,16]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, "
    'metadata={op_name="jit(step)/transpose(jvp())/ecf,efd->ecd/dot_general"}',
    "}",
    "",
    "%fused.clone (a.1: bf16[4,8], b.1: bf16[8,16]) -> bf16[4,16] {",
    "  %a.1 = bf16[4,8]{1,0} parameter(0)",
    "  %b.1 = bf16[8,16]{1,0} parameter(1)",
    "  ROOT %d.1 = bf16[4,16]{1,0} dot(%a.1, %b.1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, "
    'metadata={op_name="jit(step)/transpose(jvp())/ecf,efd->ecd/dot_general"}',
    "}",
    "",
    "%body (p: (bf16[4,8], bf16[8,16])) -> (bf16[4,8], bf16[8,16]) {",
    "  %p = (bf16[4,8]{1,0}, bf16[8,16]{1,0}) parameter(0)",
    "  %x0 = bf16[4,8]{1,0} get-tuple-element(%p), index=0",
    "  %w = bf16[8,16]{1,0} get-tuple-element(%p), index=1",
    "  %x = bf16[4,16]{1,0} dot(%x0, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, "
    'metadata={op_name="jit(step)/jvp()/bld,dr->blr/dot_general"}',
    "  %f.remat = bf16[4,16]{1,0} fusion(%x0, %w), kind=kOutput, calls=%fused",
    "  %g = bf16[8,8]{1,0} all-gather(%x0), channel_id=1, replica_groups={{0,1},{2,3},{4,5},{6,7}}, dimensions={0}",
    "  %x.remat = bf16[4,16]{1,0} dot(%x0, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, "
    'metadata={op_name="jit(step)/jvp()/bld,dr->blr/dot_general"}',
    "  %f.remat2 = bf16[4,16]{1,0} fusion(%x0, %w), kind=kOutput, calls=%fused.clone",
    "  %g.remat = bf16[8,8]{1,0} all-gather(%x0), channel_id=2, replica_groups={{0,1},{2,3},{4,5},{6,7}}, "
    "dimensions={0}",
    "  %g.remat_compressed = bf16[8,8]{0,1} copy(%g.remat)",
    "  ROOT %t = (bf16[4,8]{1,0}, bf16[8,16]{1,0}) tuple(%x0, %w)",
    "}",
    "",
    "%cond (c: (bf16[4,8], bf16[8,16])) -> pred[] {",
    "  %c = (bf16[4,8]{1,0}, bf16[8,16]{1,0}) parameter(0)",
    "  ROOT %k = pred[] constant(true)",
    "}",
    "",
    "ENTRY %main (q: (bf16[4,8], bf16[8,16])) -> (bf16[4,8], bf16[8,16]) {",
    "  %q = (bf16[4,8]{1,0}, bf16[8,16]{1,0}) parameter(0)",
    "  ROOT %l = (bf16[4,8]{1,0}, bf16[8,16]{1,0}) while(%q), condition=%cond, body=%body, "
    'backend_config={"known_trip_count":{"n":"3"}}',
    "}",
  ]
)


def test_work_xla_s_rematerialisation_repeats_is_counted_apart():
  module = hlo.parse(_RECOMPUTED)
  assert hlo.recomputed(module) == {"x.remat", "f.remat2", "g.remat"}  # not the layout copy
  one = 2 * 4 * 16 * 8  # FLOPs of one of the four products a turn
  f = compiled_matmul_flops(_RECOMPUTED)
  assert f.flops == 3 * 4 * one and f.by_einsum == {"bld,dr->blr": 3 * 2 * one, "ecf,efd->ecd": 3 * 2 * one}
  assert f.recomputed == {"bld,dr->blr": 3 * one, "ecf,efd->ecd": 3 * one}
  c = hlo.collectives(_RECOMPUTED)
  gathered = 8 * 8 * 2 / 2  # half of the gathered result, a group of 2
  assert c.sent == 3 * 2 * gathered and c.recomputed == 3 * gathered


def test_what_xla_recomputes_is_no_rule_s_fault():
  work = functools.partial(ChipWork, traced=1.0, worst="bld,dr->blr", worst_ratio=1.1, unknown_loops=0)
  assert work(partitioned=1.2, recomputed=0.0).warning().startswith("a chip runs 1.20x its share")
  assert work(partitioned=1.2, recomputed=0.1).warning() is None and work(partitioned=1.2, recomputed=0.1).ratio == 1.2


# Offloaded values as XLA:TPU compiles them (train.remat_offload): a loop of 3 whose body writes
# one row into a host buffer and reads one back, asynchronously, beside a row sliced from and
# written into a buffer in HBM; before the loop a copy to the host, after it one back. XLA's dump
# files print the asynchronous slices as async-start calling a computation that holds the slice;
# `compiled.as_text()` prints them as dynamic-update-slice-start and dynamic-slice-start.
_HOST = "{2,1,0:T(8,128)S(5)}"
_ASYNC = {
  "dump": [
    f"  %s = ((f32[3,4,8]{_HOST}, f32[1,4,8]{{2,1,0}}, s32[]), f32[3,4,8]{_HOST}, u32[]{{:S(2)}}) "
    "async-start(%h, %x, %i.1), calls=%to_host",
    f"  %h.1 = f32[3,4,8]{_HOST} async-done(%s)",
    f"  %s.1 = ((f32[3,4,8]{_HOST}, s32[]), f32[1,4,8]{{2,1,0}}, u32[]{{:S(2)}}) async-start(%h.1, %i.1), "
    "calls=%from_host",
    "  %y = f32[1,4,8]{2,1,0:T(8,128)} async-done(%s.1)",
  ],
  "as_text": [
    f"  %s = ((f32[3,4,8]{_HOST}, f32[1,4,8]{{2,1,0}}, s32[], s32[], s32[]), f32[3,4,8]{_HOST}, u32[]{{:S(2)}}) "
    "dynamic-update-slice-start(%h, %x, %i.1, %z.2, %z.2)",
    f"  %h.1 = f32[3,4,8]{_HOST} dynamic-update-slice-done(%s)",
    f"  %s.1 = ((f32[3,4,8]{_HOST}, s32[], s32[], s32[]), f32[1,4,8]{{2,1,0}}, u32[]{{:S(2)}}) "
    "dynamic-slice-start(%h.1, %i.1, %z.2, %z.2), dynamic_slice_sizes={1,4,8}",
    "  %y = f32[1,4,8]{2,1,0:T(8,128)} dynamic-slice-done(%s.1)",
  ],
}


def _offloaded(form: str) -> str:
  return "\n".join(
    [
      "HloModule jit_step, num_partitions=4",
      "",
      "%to_host (a: f32[3,4,8], u: f32[1,4,8], i: s32[]) -> f32[3,4,8] {",
      f"  %a = f32[3,4,8]{_HOST} parameter(0)",
      "  %u = f32[1,4,8]{2,1,0:T(8,128)} parameter(1)",
      "  %i = s32[]{:T(128)} parameter(2)",
      "  %z = s32[] constant(0)",
      f"  ROOT %put = f32[3,4,8]{_HOST} dynamic-update-slice(%a, %u, %i, %z, /*index=4*/%z)",
      "}",
      "",
      "%from_host (b: f32[3,4,8], j: s32[]) -> f32[1,4,8] {",
      f"  %b = f32[3,4,8]{_HOST} parameter(0)",
      "  %j = s32[] parameter(1)",
      "  %z.1 = s32[] constant(0)",
      "  ROOT %get = f32[1,4,8]{2,1,0:T(8,128)} dynamic-slice(%b, %j, %z.1, %z.1), dynamic_slice_sizes={1,4,8}",
      "}",
      "",
      "%body (p: (s32[], f32[3,4,8], f32[3,4,8])) -> (s32[], f32[3,4,8], f32[3,4,8]) {",
      f"  %p = (s32[], f32[3,4,8]{_HOST}, f32[3,4,8]{{2,1,0}}) parameter(0)",
      "  %i.1 = s32[] get-tuple-element(%p), index=0",
      f"  %h = f32[3,4,8]{_HOST} get-tuple-element(%p), index=1",
      "  %d = f32[3,4,8]{2,1,0} get-tuple-element(%p), index=2",
      "  %z.2 = s32[] constant(0)",
      "  %x = f32[1,4,8]{2,1,0} dynamic-slice(%d, %i.1, %z.2, %z.2), dynamic_slice_sizes={1,4,8}",
      *_ASYNC[form],
      "  %d.1 = f32[3,4,8]{2,1,0} dynamic-update-slice(%d, %y, %i.1, %z.2, %z.2)",
      "  %one = s32[] constant(1)",
      "  %i.2 = s32[] add(%i.1, %one)",
      f"  ROOT %t = (s32[], f32[3,4,8]{_HOST}, f32[3,4,8]{{2,1,0}}) tuple(%i.2, %h.1, %d.1)",
      "}",
      "",
      "%cond (c: (s32[], f32[3,4,8], f32[3,4,8])) -> pred[] {",
      f"  %c = (s32[], f32[3,4,8]{_HOST}, f32[3,4,8]{{2,1,0}}) parameter(0)",
      "  %k = s32[] get-tuple-element(%c), index=0",
      "  %n = s32[] constant(3)",
      "  ROOT %lt = pred[] compare(%k, %n), direction=LT",
      "}",
      "",
      "ENTRY %main (w: f32[3,4,8], v: f32[2,8]) -> (f32[3,4,8], f32[2,8]) {",
      "  %w = f32[3,4,8]{2,1,0} parameter(0)",
      "  %v = f32[2,8]{1,0} parameter(1)",
      "  %c0 = s32[] constant(0)",
      "  %cs = (f32[2,8]{1,0:S(5)}, f32[2,8]{1,0}, u32[]) copy-start(%v)",
      "  %hv = f32[2,8]{1,0:S(5)} copy-done(%cs)",
      f"  %hw = f32[3,4,8]{_HOST} copy(%w)",
      f"  %init = (s32[], f32[3,4,8]{_HOST}, f32[3,4,8]{{2,1,0}}) tuple(%c0, %hw, %w)",
      f"  %l = (s32[], f32[3,4,8]{_HOST}, f32[3,4,8]{{2,1,0}}) while(%init), condition=%cond, body=%body",
      f"  %dh = f32[3,4,8]{_HOST} get-tuple-element(%l), index=1",
      "  %back = f32[3,4,8]{2,1,0} copy(%dh)",
      "  ROOT %r = (f32[3,4,8]{2,1,0}, f32[2,8]{1,0:S(5)}) tuple(%back, %hv)",
      "}",
    ]
  )


@pytest.mark.parametrize("form", sorted(_ASYNC))
def test_what_a_device_moves_to_its_host_and_back_counts_every_turn(form):
  row, whole = 4 * 8 * 4, 3 * 4 * 8 * 4  # bytes of one row, of the buffer
  # To the host: a row a turn, the buffer once, and the 2x8 array's copy; back: a row a turn and
  # the buffer once. What stays in HBM moves nothing over the link.
  assert hlo.host_transfers(_offloaded(form)) == (3 * row + whole + 2 * 8 * 4, 3 * row + whole)
  assert hlo.host_transfers(_offloaded(form).replace("S(5)", "S(1)")) == (0, 0)


# A program as XLA:GPU prints one (shortened): a loop of 5 turns over a fusion that slices a
# stacked weight, one that reads a slice through a nested fusion, one that updates the stack in
# place and a library call; then a copy, and a reduction whose `add` is the reduce's own.
_KERNELS = """HloModule jit_step

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(%a, %b)
}

%fused_slice (param_0: f32[8,64,32], param_1: s32[]) -> f32[1,64,32] {
  %param_0 = f32[8,64,32]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[1,64,32]{2,1,0} dynamic-slice(%param_0, %param_1, %c, %c), dynamic_slice_sizes={1,64,32}
}

%sliced (p0: f32[8,64,32], p1: s32[]) -> f32[1,64,32] {
  %p0 = f32[8,64,32]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %bc = f32[8,64,32]{2,1,0} bitcast(%p0)
  ROOT %ds0 = f32[1,64,32]{2,1,0} dynamic-slice(%bc, %p1, %c0, %c0), dynamic_slice_sizes={1,64,32}
}

%fused_outer (param_0.1: f32[8,64,32], param_1.1: s32[], param_2: f32[16,64]) -> f32[16,32] {
  %param_0.1 = f32[8,64,32]{2,1,0} parameter(0)
  %param_1.1 = s32[] parameter(1)
  %inner = f32[1,64,32]{2,1,0} fusion(%param_0.1, %param_1.1), kind=kLoop, calls=%sliced
  %b64 = f32[64,32]{1,0} bitcast(%inner)
  %param_2 = f32[16,64]{1,0} parameter(2)
  ROOT %dot = f32[16,32]{1,0} dot(%param_2, %b64), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_update (param_0.2: f32[8,64,32], param_1.2: f32[1,64,32], param_2.2: s32[]) -> f32[8,64,32] {
  %param_0.2 = f32[8,64,32]{2,1,0} parameter(0)
  %param_1.2 = f32[1,64,32]{2,1,0} parameter(1)
  %neg = f32[1,64,32]{2,1,0} negate(%param_1.2)
  %param_2.2 = s32[] parameter(2)
  %c1 = s32[] constant(0)
  ROOT %dus = f32[8,64,32]{2,1,0} dynamic-update-slice(%param_0.2, %neg, %param_2.2, %c1, %c1)
}

%body (t: (s32[], f32[8,64,32], f32[16,64])) -> (s32[], f32[8,64,32], f32[16,64]) {
  %t = (s32[], f32[8,64,32]{2,1,0}, f32[16,64]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %w = f32[8,64,32]{2,1,0} get-tuple-element(%t), index=1
  %x = f32[16,64]{1,0} get-tuple-element(%t), index=2
  %s = f32[1,64,32]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %o = f32[16,32]{1,0} fusion(%w, %i, %x), kind=kOutput, calls=%fused_outer
  %u = f32[8,64,32]{2,1,0} fusion(%w, %s, %i), kind=kLoop, calls=%fused_update
  %g = (f32[16,32]{1,0}, s8[1024]{0}) custom-call(%x, %o), custom_call_target="__cublas$gemm"
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %t2 = (s32[], f32[8,64,32]{2,1,0}, f32[16,64]{1,0}) tuple(%next, %u, %x)
}

%cond (t.1: (s32[], f32[8,64,32], f32[16,64])) -> pred[] {
  %t.1 = (s32[], f32[8,64,32]{2,1,0}, f32[16,64]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%t.1), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (w.1: f32[8,64,32], x.1: f32[16,64]) -> (f32[8,64,32], f32[]) {
  %w.1 = f32[8,64,32]{2,1,0} parameter(0)
  %x.1 = f32[16,64]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,64,32]{2,1,0}, f32[16,64]{1,0}) tuple(%zero, %w.1, %x.1)
  %loop = (s32[], f32[8,64,32]{2,1,0}, f32[16,64]{1,0}) while(%init), condition=%cond, body=%body, backend_config=TRIP
  %out = f32[8,64,32]{2,1,0} get-tuple-element(%loop), index=1
  %cp = f32[8,64,32]{2,1,0} copy(%out)
  %zf = f32[] constant(0)
  %red = f32[] reduce(%x.1, %zf), dimensions={0,1}, to_apply=%add
  ROOT %res = (f32[8,64,32]{2,1,0}, f32[]) tuple(%cp, %red)
}
""".replace("TRIP", '{"known_trip_count":{"n":"5"}}')


def _kernel_bytes() -> tuple[int, int]:
  """(a turn of _KERNELS's loop, what runs after it): the bytes its kernels move."""
  layer = 64 * 32 * 4  # one slice of the stack
  turn = sum(
    [
      2 * layer,  # the slice fusion reads its slice and writes it
      layer + (16 * 64 + 16 * 32) * 4,  # the nested slice (through a bitcast) and the rows; the product
      2 * layer,  # the in-place update reads its update and writes that part of the stack
      (16 * 64 + 2 * 16 * 32) * 4 + 1024,  # the library call: its operands; its result and workspace
      3 * 4,  # the counter's add
      3 * 4,  # the three fusions' index
    ]
  )
  after = 2 * 8 * layer + (16 * 64 * 4 + 4) + 4  # the copy; the reduction (its `add` runs inside it)
  return turn, after


def test_kernels_read_their_operands_and_write_their_results_loops_counted_out():
  turn, after = _kernel_bytes()
  layer = 64 * 32 * 4  # one slice of the stack
  traffic = hlo.kernel_traffic(_KERNELS, largest=3)
  assert (traffic.bytes, traffic.loops_once) == (5 * turn + after, 0)
  # The busiest: the copy of the whole stack (once), then the slice and the update (5 times each,
  # a slice and an index); none names an operation.
  assert traffic.largest[0] == ("cp", "", 2 * 8 * layer)
  assert sorted(traffic.largest[1:]) == [("s", "", 5 * (2 * layer + 4)), ("u", "", 5 * (2 * layer + 4))]


def test_a_loop_that_may_stop_before_its_count_is_counted_once():
  """Without XLA's known trip count, a loop whose condition is `counter < 5` runs 5 times;
  one whose condition is `counter < 5 and flag` (a decoding loop's) may stop sooner: counted
  once, and said so."""
  turn, after = _kernel_bytes()
  plain = _KERNELS.replace(', backend_config={"known_trip_count":{"n":"5"}}', "")
  root = "  ROOT %lt = pred[] compare(%i.1, %n), direction=LT"
  flag = (
    "  %lt = pred[] compare(%i.1, %n), direction=LT\n  %go = pred[] constant(true)\n  ROOT %and = pred[] and(%lt, %go)"
  )
  assert plain != _KERNELS and root in plain
  counted, once = hlo.kernel_traffic(plain), hlo.kernel_traffic(plain.replace(root, flag))
  assert (counted.bytes, counted.loops_once) == (5 * turn + after, 0)
  assert (once.bytes, once.loops_once) == (turn + after, 1)


def test_kernel_traffic_is_xla_s_own_count_where_xla_gives_one():
  """On the CPU, XLA's cost analysis counts each kernel's bytes by the same rule."""
  w, x = jnp.ones((8, 256, 512)), jnp.ones((64, 256))
  programs = [
    (lambda w, x: jax.nn.gelu(x @ w[3]), (w, x)),  # a matmul reading a slice of a stack, its activation fused
    (lambda w, x, i: jax.lax.dynamic_update_index_in_dim(w, (x @ w[i]).T[:256, :], i, 0), (w, x, 5)),
    (lambda x: jax.nn.softmax(x, axis=-1), (x,)),
  ]
  for f, args in programs:
    compiled = jax.jit(f).lower(*args).compile()
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list | tuple) else analysis
    traffic = hlo.kernel_traffic(compiled.as_text())
    assert (traffic.bytes, traffic.loops_once) == (analysis["bytes accessed"], 0)
