"""The checksum a checkpoint reader computes on the host: numpy against the jitted device sum.

  JAX_PLATFORMS=cpu python benchmarks/checksum.py [--elements 67108864] [--repeats 3]

A save records one checksum per array, summed on the devices where the array lives
(`checkpoint.checksums`). mtp-export and mtp-import read arrays back to host memory and check
them there with `checkpoint.slice_checksum`, in numpy. This times both on the same host array,
float32 and bfloat16, and checks they agree. The jitted sum is timed after its first call (its
compile excluded), as a reader that met the same shape before.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import ml_dtypes
import numpy as np

from mtp_jax.train import checkpoint


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--elements", type=int, default=1 << 26)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()[0].platform}")
  jitted = jax.jit(checkpoint._array_checksum)
  x = np.random.default_rng(0).standard_normal(args.elements, dtype=np.float32)
  for array in (x, x.astype(ml_dtypes.bfloat16)):
    int(jitted(array))  # compiled for this shape and dtype
    host, device = [], []
    for _ in range(args.repeats):
      start = time.perf_counter()
      ours = checkpoint.slice_checksum(array)
      host.append(time.perf_counter() - start)
      start = time.perf_counter()
      theirs = int(jitted(array))
      device.append(time.perf_counter() - start)
      assert ours == theirs, (ours, theirs)
    print(
      f"{array.dtype} x {args.elements:,}: numpy {min(host):.3f}-{max(host):.3f} s, "
      f"jitted {min(device):.3f}-{max(device):.3f} s, ratio {np.median(device) / np.median(host):.2f}"
    )


if __name__ == "__main__":
  main()
