"""`mtp-generate --checkpoint runs/tiny --prompt "def main(" [--max-new-tokens 64] [--json]`

Parses the command line, loads the run (`load.py`) and calls the decoding library; the text
goes to stdout, the statistics to stderr (or everything as one JSON object with --json).
Settings and prompts are checked before anything is compiled.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys

from mtp_jax.cli import EXIT_RUN, Parser
from mtp_jax.cli import run as run_command
from mtp_jax.errors import InputError

DEFAULT_NEW_TOKENS = 64  # when --max-new-tokens is not given; fewer where the context leaves less room


def _parser() -> argparse.ArgumentParser:
  parser = Parser(
    prog="mtp-generate",
    description="Generate text from a trained checkpoint, drafting with its MTP modules (self-speculative decoding).",
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    metavar="PATH",
    help="a run's workdir (its latest step), its checkpoints/ or one step; local or gs://",
  )
  prompts = parser.add_mutually_exclusive_group(required=True)
  prompts.add_argument(
    "--prompt", action="append", metavar="TEXT", help="a prompt; give it several times for a batch of prompts"
  )
  prompts.add_argument(
    "--prompt-file", metavar="FILE", help="one prompt per line, a batch (blank lines skipped; '-': stdin)"
  )
  parser.add_argument(
    "--max-new-tokens",
    type=int,
    metavar="N",
    help=f"per prompt (default {DEFAULT_NEW_TOKENS}, or what the context leaves); prompt + N <= data.seq_len",
  )
  parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (the default): greedy")
  parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling, in (0, 1] (default 1)")
  parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
  parser.add_argument(
    "--speculative",
    action=argparse.BooleanOptionalAction,
    help="draft with the MTP modules, verify with the main model (default: on when the model has MTP modules)",
  )
  parser.add_argument("--draft-tokens", type=int, metavar="K", help="drafts per round (default: the MTP depth)")
  parser.add_argument(
    "--reuse", action="store_true", help="allow --draft-tokens above the MTP depth: reuse the modules in turn"
  )
  parser.add_argument("--ignore-eos", action="store_true", help="do not stop a prompt at the end-of-document token")
  parser.add_argument("--json", action="store_true", help="print one JSON object: ids, text, statistics, settings")
  return parser


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # XLA's C++ warnings; set before JAX is imported
  return run_command("mtp-generate", lambda: _generate(args))


def _generate(args) -> int:
  report = _run(args)
  try:
    if args.json:
      print(json.dumps(report, ensure_ascii=False))
    else:
      _print_text(report["outputs"])
      print(_summary(report), file=sys.stderr)
    sys.stdout.flush()
  except BrokenPipeError:  # a reader such as `head` stopped early; Python's own report would be a traceback
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_RUN
  return 0


def _run(args) -> dict:
  """The --json report; every setting and prompt is checked before anything is compiled."""
  _check_numbers(args)
  texts = _prompts(args)
  from mtp_jax.generate import speculative
  from mtp_jax.generate.load import load

  run = load(args.checkpoint)
  prompts, max_new_tokens = _encode(run, texts, args.max_new_tokens)
  draft_tokens = _drafts(run, args)

  eos_id = None if args.ignore_eos else run.config.model.eos_id
  settings = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, eos_id=eos_id)
  if draft_tokens:
    tokens, stats = speculative.speculative_generate(
      run.model, prompts, max_new_tokens, draft_tokens=draft_tokens, reuse=args.reuse, **settings
    )
  else:
    tokens, stats = speculative.plain_generate_with_stats(run.model, prompts, max_new_tokens, **settings)
  settings.update(max_new_tokens=max_new_tokens, speculative=bool(draft_tokens), draft_tokens=draft_tokens or None)
  settings.update(reuse=args.reuse, context=run.context)
  outputs = [
    dict(prompt=text, prompt_ids=p, ids=t, text=run.tokenizer.decode(t), eos=eos_id is not None and t[-1] == eos_id)
    for (_, text), p, t in zip(texts, prompts, tokens, strict=True)
  ]
  return dict(checkpoint=str(run.step_dir), step=run.step, settings=settings, outputs=outputs, stats=_stats(stats))


def _check_numbers(args) -> None:
  if not (math.isfinite(args.temperature) and args.temperature >= 0):
    raise InputError(f"--temperature {args.temperature}: must be a finite number, 0 (greedy) or more")
  if not 0 < args.top_p <= 1:
    raise InputError(f"--top-p {args.top_p}: must be in (0, 1]")
  if args.max_new_tokens is not None and args.max_new_tokens < 1:
    raise InputError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
  if args.draft_tokens is not None and args.draft_tokens < 1:
    raise InputError(f"--draft-tokens {args.draft_tokens}: must be at least 1")
  if args.speculative is False and (args.draft_tokens is not None or args.reuse):
    flag = "--reuse" if args.draft_tokens is None else f"--draft-tokens {args.draft_tokens}"
    raise InputError(f"{flag}: applies to speculative decoding, and --no-speculative turns it off")


def _prompts(args) -> list[tuple[str, str]]:
  """(label for errors, text) per prompt, in order."""
  if args.prompt is not None:
    labels = ["--prompt"] if len(args.prompt) == 1 else [f"--prompt {i}" for i in range(1, len(args.prompt) + 1)]
    for label, text in zip(labels, args.prompt, strict=True):
      if not text:
        raise InputError(f"{label}: empty; give the text to continue")
    return list(zip(labels, args.prompt, strict=True))
  name = args.prompt_file
  try:
    text = sys.stdin.read() if name == "-" else pathlib.Path(name).read_text(encoding="utf-8")
  except FileNotFoundError:
    raise InputError(f"--prompt-file {name}: no such file") from None
  except UnicodeDecodeError:
    raise InputError(f"--prompt-file {name}: not UTF-8 text") from None
  except OSError as err:
    raise InputError(f"--prompt-file {name}: {err.strerror or err}") from None
  prompts = [(f"--prompt-file {name} line {i}", line) for i, line in enumerate(text.splitlines(), 1) if line.strip()]
  if not prompts:
    raise InputError(f"--prompt-file {name}: holds no prompt (one prompt per line)")
  return prompts


def _encode(run, texts: list[tuple[str, str]], max_new_tokens: int | None) -> tuple[list[list[int]], int]:
  """Token ids per prompt and the new tokens per prompt, once everything fits the context."""
  prompts = [[int(i) for i in run.tokenizer.encode(text)] for _, text in texts]
  for (label, _), ids in zip(texts, prompts, strict=True):
    if not ids:
      raise InputError(f"{label}: encodes to no tokens")
    if len(ids) >= run.context:
      raise InputError(
        f"{label}: {_tokens(len(ids))}, and the model's context is {run.context} (data.seq_len of its run), "
        "which leaves no room for a new token"
      )
  room = run.context - max(map(len, prompts))
  if max_new_tokens is None:
    return prompts, min(DEFAULT_NEW_TOKENS, room)
  if max_new_tokens > room:
    (label, _), ids = max(zip(texts, prompts, strict=True), key=lambda pair: len(pair[1]))
    raise InputError(
      f"--max-new-tokens {max_new_tokens}: {label} ({_tokens(len(ids))}) plus {max_new_tokens} new tokens exceeds "
      f"the model's context of {run.context} (data.seq_len of its run); at most {room} here"
    )
  return prompts, max_new_tokens


def _tokens(n: int) -> str:
  return f"{n} token{'' if n == 1 else 's'}"


def _drafts(run, args) -> int:
  """Drafts per round, 0 for plain decoding."""
  from mtp_jax.generate import speculative

  depth = run.model.mtp_depth
  asked = args.speculative or args.draft_tokens is not None or args.reuse
  if args.speculative is False or not (depth or asked):
    return 0
  if depth == 0:
    flag = "--speculative" if args.speculative else "--draft-tokens" if args.draft_tokens is not None else "--reuse"
    raise InputError(
      f"{flag}: {run.step_dir} was trained with model.mtp.depth=0, so it has no MTP modules to draft with "
      "(it decodes plainly without this flag)"
    )
  k = depth if args.draft_tokens is None else args.draft_tokens
  if k > depth and not args.reuse:
    raise InputError(
      f"--draft-tokens {k}: more than the checkpoint's MTP depth {depth}; add --reuse to draft with its modules in turn"
    )
  try:
    return speculative.check(run.model, k, args.reuse)
  except ValueError as err:
    raise InputError(f"--draft-tokens {k}: {err}") from None


def _stats(stats) -> dict:
  """SpecStats as JSON: its fields, its rates, and the accepted length (see `_summary`)."""
  out = {key: getattr(stats, key) for key in stats.__dataclass_fields__}
  out.update(acceptance=list(stats.acceptance), passes_per_token=stats.passes_per_token)
  out.update(tokens_per_s=stats.tokens_per_s if math.isfinite(stats.tokens_per_s) else None)
  out.update(accepted_length=1.0 + stats.mean_accepted)
  return out


def _print_text(outputs: list[dict]) -> None:
  """Each prompt's new text; with several prompts, a header line naming each first."""
  for i, out in enumerate(outputs, 1):
    if len(outputs) > 1:
      shown = out["prompt"] if len(out["prompt"]) <= 60 else out["prompt"][:57] + "..."
      print(f"=== {i}/{len(outputs)}: {shown} ===")
    end = "" if out["text"].endswith("\n") else "\n"
    print(out["text"], end=end)


def _summary(report: dict) -> str:
  """The statistics, one per line. Forward passes count the main model's batched calls once per
  prompt taking part, the prefill left out (so plain decoding reads 1.00 per token); accepted
  length is tokens committed per prompt per verification pass: the accepted drafts + the one
  token the main model adds (DeepSeek-V3's and vLLM's sense)."""
  settings, s = report["settings"], report["stats"]
  if settings["temperature"] == 0:
    how = "greedy"
  else:
    how = f"sampled at temperature {settings['temperature']:g}, top-p {settings['top_p']:g}, seed {settings['seed']}"
  k = settings["draft_tokens"]
  mode = f"speculative, {k} draft{'s' if k > 1 else ''} per round" if k else "plain (one token per forward pass)"
  lines = [
    f"checkpoint      {report['checkpoint']} (step {report['step']})",
    f"decoding        {mode}; {how}",
    f"speed           {s['new_tokens']} new tokens in {s['wall_s']:.3f} s: {s['tokens_per_s'] or 0:,.0f} tokens/s"
    " (compilation excluded)",
    f"forward passes  {s['passes_per_token']:.2f} per token ({s['forward_passes']} main-model passes for the "
    f"{s['decoded_tokens']} tokens after the prefill)",
  ]
  if k:
    rates = "  ".join(f"draft {j}: {a:.0%}" for j, a in enumerate(s["acceptance"], 1))
    lines.append(f"acceptance      {rates}")
    lines.append(
      f"accepted length {s['accepted_length']:.2f} tokens per pass ({s['mean_accepted']:.2f} drafts accepted "
      "+ 1 from the main model)"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
