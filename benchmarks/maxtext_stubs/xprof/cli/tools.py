"""The one name tokamax imports from xprof; MaxText's training never calls it."""


def get_kernel_stats_tool(*args, **kwargs):
  raise RuntimeError("xprof is not installed: benchmarks/maxtext_stubs stands in for its import only")
