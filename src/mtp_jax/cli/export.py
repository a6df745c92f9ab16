"""`mtp-export --checkpoint runs/tiny --output hf/tiny [--format deepseek_v3] [--dtype bf16] [--overwrite]`
`mtp-import hf/model --output runs/model [--config FILE] [--overwrite] [section.key=value ...]`

Parse the command line and call `export()` / `import_()`, printing their notes and a summary.
"""

from __future__ import annotations

import os
import sys

from mtp_jax.cli import Parser, run


def main(argv: list[str] | None = None) -> int:
  parser = Parser(prog="mtp-export", description="Write a checkpoint in a layout other runtimes load.")
  parser.add_argument(
    "--checkpoint",
    required=True,
    metavar="PATH",
    help="a run's workdir (its latest step), its checkpoints/ or one step; local or gs://",
  )
  parser.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to write")
  parser.add_argument(
    "--format",
    default="deepseek_v3",
    choices=["deepseek_v3", "qwen3_moe", "glm4_moe"],
    help="target layout (default deepseek_v3)",
  )
  parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="weight dtype written (default bf16)")
  parser.add_argument("--overwrite", action="store_true", help="replace DIR when it already holds something")
  args = parser.parse_args(argv)

  # Export reads arrays on the host; it never needs (or should hold) an accelerator a run may be using.
  os.environ["JAX_PLATFORMS"] = "cpu"
  return run(parser.prog, lambda: _export(parser.prog, args), interrupted="interrupted; nothing was written")


def _export(prog: str, args) -> None:
  from tqdm import tqdm

  from mtp_jax.export.exporter import export

  result = export(
    args.checkpoint,
    args.output,
    format=args.format,
    dtype=args.dtype,
    overwrite=args.overwrite,
    progress=sys.stderr.isatty(),
  )
  _notes(prog, result.notes)
  mtp = f"; MTP at {', '.join(result.mtp_layers)}" if result.mtp_layers else ""
  print(
    f"wrote {result.output} ({args.format}, {args.dtype}) from {result.step_dir}: {result.tensors} tensors in "
    f"{result.shards} shard(s), {tqdm.format_sizeof(result.bytes, 'B')}{mtp}"
  )


def import_main(argv: list[str] | None = None) -> int:
  parser = Parser(
    prog="mtp-import",
    description="Turn a Hugging Face DeepSeek-V3, GLM-4.5 or Qwen3-MoE directory into a run to continue training.",
  )
  parser.add_argument("hf_dir", metavar="HF_DIR", help="a Hugging Face model directory: config.json and safetensors")
  parser.add_argument("--output", "-o", required=True, metavar="DIR", help="the run directory to write")
  parser.add_argument("--config", metavar="FILE", help="YAML config for all but the model settings (default: defaults)")
  parser.add_argument("--overwrite", action="store_true", help="replace DIR when it already holds something")
  parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="dotted config overrides")
  args = parser.parse_intermixed_args(argv)

  # On one host the state passes through host memory on its way to the files, so CPU is right and
  # leaves the accelerators to a run; set JAX_PLATFORMS to build the arrays on those devices instead.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  return run(parser.prog, lambda: _import(parser.prog, args), interrupted="interrupted; nothing was written")


def _import(prog: str, args) -> None:
  from tqdm import tqdm

  from mtp_jax.export.importer import import_

  result = import_(
    args.hf_dir,
    args.output,
    base_config=args.config,
    overrides=args.overrides,
    overwrite=args.overwrite,
    progress=sys.stderr.isatty(),
  )
  _notes(prog, result.notes)
  print(
    f"wrote {result.output} from {args.hf_dir} ({result.format}): {result.tensors} tensors, "
    f"{tqdm.format_sizeof(result.bytes, 'B')}, as config.yaml and checkpoints/0 (step 0, fresh optimizer state); "
    f"continue training with: mtp-train --config {result.output / 'config.yaml'}"
  )


def _notes(prog: str, notes: list[str]) -> None:
  for note in notes:
    print(f"{prog}: {note}" if note.startswith("warning: ") else f"{prog}: note: {note}", file=sys.stderr)


if __name__ == "__main__":
  sys.exit(main())
