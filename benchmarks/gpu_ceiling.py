"""The device's two ceilings, measured: a large bfloat16 matrix product (FLOP/s) and a
device-to-device copy (bytes read plus written per second), each the median of timed repeats
after a warm-up, on random data. MFU against the datasheet peak says how far a step is from the
vendor's figure; against these, how far from what this device really does."""

from __future__ import annotations

import statistics
import sys
import time

import jax
import jax.numpy as jnp


def _median_s(fn, *args, repeats: int = 10) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main() -> int:
  gpu = jax.devices()[0].platform == "gpu"
  n = 8192 if gpu else 512
  a, b = (jax.random.normal(k, (n, n), jnp.bfloat16) for k in jax.random.split(jax.random.key(0)))
  matmul = _median_s(jax.jit(jnp.matmul), a, b)
  words = (2**30 if gpu else 2**24) // 4  # 4 GiB (64 MiB here) of float32
  x = jax.random.normal(jax.random.key(1), (words,), jnp.float32)
  copy = _median_s(jax.jit(lambda v: v + 1.0), x)  # one read and one write of each element
  print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(f"bf16 matmul {n}x{n}x{n}: {2 * n**3 / matmul / 1e12:.1f} TFLOP/s")
  print(f"copy {words * 4 / 2**30:.2f} GiB: {2 * words * 4 / copy / 1e12:.2f} TB/s (read + written)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
