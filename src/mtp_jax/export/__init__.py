"""Checkpoints other runtimes load: `mtp-export` writes a run's weights in a Hugging Face layout.

source.py       which checkpoint step, the run's config and tokenizer; reads one array at a time
layout.py       how one of our arrays becomes one target tensor, and back (`Tensor`, `Layout`)
deepseek_v3.py  the DeepSeek-V3 layout: what it cannot express, config.json, the tensor table
writer.py       the output directory: sharded safetensors + index, JSON files, tokenizer
exporter.py     `export()`: the above in order, with progress
cli.py          `mtp-export`: parses the command line, one-line errors
"""


class ExportError(ValueError):
  """An export that cannot be done, reported to the user as one line."""
