"""`mtp-export --checkpoint runs/tiny --output hf/tiny [--format deepseek_v3] [--dtype bf16] [--overwrite]`

Parses the command line and calls `export()`; every expected failure is one line on stderr and
exit status 2, never a traceback.
"""

from __future__ import annotations

import os
import sys

from mtp_jax.cli import _Parser


def main(argv: list[str] | None = None) -> int:
  parser = _Parser(prog="mtp-export", description="Write a checkpoint in a layout other runtimes load.")
  parser.add_argument(
    "--checkpoint",
    required=True,
    metavar="PATH",
    help="a run's workdir (its latest step), its checkpoints/ or one step",
  )
  parser.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write")
  parser.add_argument(
    "--format", default="deepseek_v3", choices=["deepseek_v3", "qwen3_moe"], help="target layout (default deepseek_v3)"
  )
  parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weight dtype written (default bf16)")
  parser.add_argument("--overwrite", action="store_true", help="replace DIR when it already holds something")
  args = parser.parse_args(argv)

  # Export reads arrays on the host; it never needs (or should hold) an accelerator a run may be using.
  os.environ["JAX_PLATFORMS"] = "cpu"
  from mtp_jax.export import ExportError
  from mtp_jax.export.exporter import export

  try:
    result = export(
      args.checkpoint,
      args.output,
      format=args.format,
      dtype=args.dtype,
      overwrite=args.overwrite,
      progress=sys.stderr.isatty(),
    )
  except ExportError as err:
    print(f"mtp-export: {err}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("mtp-export: interrupted; nothing was written", file=sys.stderr)
    return 130
  for note in result.notes:
    print(f"mtp-export: note: {note}", file=sys.stderr)
  from tqdm import tqdm

  mtp = f"; MTP at {', '.join(result.mtp_layers)}" if result.mtp_layers else ""
  print(
    f"wrote {result.output} ({args.format}, {args.dtype}) from {result.step_dir}: {result.tensors} tensors in "
    f"{result.shards} shard(s), {tqdm.format_sizeof(result.bytes, 'B')}{mtp}"
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
