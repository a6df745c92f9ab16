"""Checkpoints other runtimes load: `mtp-export` writes a run's weights in a Hugging Face layout,
`mtp-import` turns such a directory back into a run.

source.py       which checkpoint step, the run's config and tokenizer; reads one array at a time
layout.py       how one of our arrays becomes one target tensor, and back (`Tensor`, `Layout`)
deepseek_v3.py  the DeepSeek-V3 layout: what it cannot express, config.json, the tensor table
qwen3_moe.py    the Qwen3-MoE layout, the same parts; MTP modules in an extra mtp.safetensors
writer.py       the output directory: sharded safetensors + index, extra files, JSON files, tokenizer
exporter.py     `export()`: the above in order, with progress
importer.py     `import_()`: a directory's config.json and tensors -> config.yaml and checkpoints/0, by the same tables
cli.py          `mtp-export`, `mtp-import`: parse the command line, one-line errors
"""


class ExportError(ValueError):
  """An export that cannot be done, reported to the user as one line."""
