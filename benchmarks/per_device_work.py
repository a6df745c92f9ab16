"""What one device computes: the partitioned train step's matmul FLOPs against its share.

  python benchmarks/per_device_work.py [--config configs/tiny.yaml] [--meshes data8,fsdp8,...] [key=value ...]

For each mesh and each expert mode (dropless, capacity) it compiles the train step on 8 fake CPU
devices and counts the matmul FLOPs one device runs, read from the compiled, partitioned program
(every loop body times its trip count). A one-device step on the whole batch is compiled the
same way; a device's share is an eighth of it. The ratio is what a device runs over its share:
1.0 when the mesh splits all the work, 8.0 when every device repeats it. The traced count
(before partitioning) is printed beside it: it cannot see the difference.
"""

from __future__ import annotations

import os
import re
import sys

DEVICES = 8
os.environ["XLA_FLAGS"] = (
  re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  + f" --xla_force_host_platform_device_count={DEVICES}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from mtp_jax.cli import command_parser, load_config  # noqa: E402
from mtp_jax.model.flops import compiled_matmul_flops, traced_matmul_flops  # noqa: E402
from mtp_jax.train.program import build  # noqa: E402

MESHES = {
  "data8": ["mesh.data=8"],
  "fsdp8": ["mesh.data=1", "mesh.fsdp=8"],
  "data2_fsdp4": ["mesh.data=2", "mesh.fsdp=4"],
  "data4_tensor2": ["mesh.data=4", "mesh.tensor=2"],
  "fsdp4_tensor2": ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"],
  "data2_fsdp2_tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
}
MODES = {"dropless": ["model.moe.mode=dropless"], "capacity": ["model.moe.mode=capacity"]}


def step_flops(cfg, devices) -> tuple[float, float, str]:
  """(partitioned matmul FLOPs per device, traced per device, the expert dispatch)."""
  program = build(cfg, devices)
  traced = program.step.trace(program.abstract_state, program.abstract_batch())
  compiled = compiled_matmul_flops(traced.lower().compile().as_text())
  assert not compiled.unknown_loops, "a loop without a known trip count"
  return compiled.flops, traced_matmul_flops(traced.jaxpr, len(devices)), program.expert_dispatch


def main(argv=None) -> int:
  parser = command_parser("per_device_work", __doc__.splitlines()[0], default_config="configs/tiny.yaml")
  parser.add_argument("--meshes", default=",".join(MESHES), help=f"comma-separated, of: {', '.join(MESHES)}")
  parser.add_argument("--modes", default="dropless,capacity")
  args = parser.parse_args(argv)
  meshes, modes = args.meshes.split(","), args.modes.split(",")
  if bad := [m for m in meshes if m not in MESHES] + [m for m in modes if m not in MODES]:
    print(f"per_device_work: unknown mesh or mode {bad[0]!r}", file=sys.stderr)
    return 2
  base = ["train.workdir=/tmp/per-device-work", *args.overrides]
  print(f"config {args.config} {' '.join(args.overrides)}".rstrip())
  print("| mesh | mode | dispatch | per device (partitioned) | share (one device / 8) | ratio | traced / share |")
  print("|---|---|---|---|---|---|---|")
  for mode in modes:
    one = load_config("per_device_work", args.config, [*base, *MODES[mode], "mesh.data=1"])
    whole, _, _ = step_flops(one, jax.devices()[:1])
    share = whole / DEVICES
    for mesh in meshes:
      cfg = load_config("per_device_work", args.config, [*base, *MODES[mode], *MESHES[mesh]])
      flops, traced, dispatch = step_flops(cfg, jax.devices())
      print(
        f"| {mesh} | {mode} | {dispatch} | {flops / 1e9:.3f} GFLOP | {share / 1e9:.3f} GFLOP | "
        f"{flops / share:.2f} | {traced / share:.2f} |",
        flush=True,
      )
  return 0


if __name__ == "__main__":
  sys.exit(main())
