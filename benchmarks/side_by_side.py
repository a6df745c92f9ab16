"""The table of benchmarks/gpu.sh's `maxtext` stage: our tokens/s (bench.py's JSON) against
MaxText's (its log's per-step lines) for each turn of A B A B, and their ratio.

  python benchmarks/side_by_side.py OUT_DIR [--settings "MaxText's settings"] [--ours "our settings"]

MaxText's figure per run is the median of its logged steps after the first two (the compile and
a warm-up), as bench.py times its steps after two warm-ups; both train on synthetic batches.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import statistics
import sys

_STEP = re.compile(r"completed step: (\d+), seconds: ([\d.]+), TFLOP/s/device: ([\d.]+), Tokens/s/device: ([\d.]+)")


def maxtext_run(log: pathlib.Path) -> dict:
  steps = [(int(m[1]), float(m[2]), float(m[3]), float(m[4])) for m in _STEP.finditer(log.read_text())]
  timed = [s for s in steps if s[0] >= 2]
  if not timed:
    tail = log.read_text().strip().splitlines()[-3:]
    raise ValueError(f"{log}: no timed MaxText step logged; it ended with: {' / '.join(tail)}")
  return {
    "tokens_per_sec": statistics.median(s[3] for s in timed),
    "step_time": statistics.median(s[1] for s in timed),
    "tflops_per_sec": statistics.median(s[2] for s in timed),
    "steps": len(timed),
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="side_by_side", description=__doc__.splitlines()[0])
  parser.add_argument("out", type=pathlib.Path)
  parser.add_argument("--settings", default="?", help="the attention and MoE settings MaxText ran with")
  parser.add_argument("--ours", default="", help="the settings ours ran with, beyond the shared shapes")
  args = parser.parse_args(argv)
  rows = []
  try:
    for turn in (1, 2):
      ours = json.loads((args.out / f"ours-{turn}.json").read_text())["rows"][0]
      theirs = maxtext_run(args.out / f"maxtext-{turn}.txt")
      rows.append({"turn": turn, "ours": ours, "maxtext": theirs})
  except (OSError, ValueError, KeyError, IndexError) as err:
    print(f"side_by_side: {err}", file=sys.stderr)
    return 1
  print(f"# MaxText with {args.settings}; ours with {args.ours or 'the shared shapes alone'}; tokens/s of one device")
  print("| turn | ours tok/s | ours step (s) | MaxText tok/s | MaxText step (s) | MaxText's TFLOP/s | ours / MaxText |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    o, m = r["ours"], r["maxtext"]
    r["ratio"] = o["tokens_per_sec"] / m["tokens_per_sec"]
    print(
      f"| {r['turn']} | {o['tokens_per_sec']:,.0f} | {o['step_time']:.3f} | {m['tokens_per_sec']:,.0f} | "
      f"{m['step_time']:.3f} | {m['tflops_per_sec']:.1f} | {r['ratio']:.3f} |"
    )
  print(f"ours / MaxText, turn 2 (both compiles read back from the cache): {rows[-1]['ratio']:.3f}")
  (args.out / "side_by_side.json").write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
