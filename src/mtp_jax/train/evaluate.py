"""The evaluation a run does every train.eval_every steps: eval metrics per MTP depth over the
first train.eval_batches held-out batches, and the MTP depths as drafters, greedy
self-speculative decoding of a few fixed held-out prompts with the current parameters.

Its programs compile ahead of the first evaluation (`Evaluator.compile_ahead`): in a thread
while the first train steps run, so the first evaluation does not stall a pod for minutes of
compiling, and a program that cannot compile (too big for a chip) stops the run at its start,
not at step train.eval_every. Not on GPUs: XLA:GPU times its kernel choices on the GPU as it
compiles, which the train steps running beside it would disturb; there they compile before the
first step.

Every process runs the same jitted programs on the same prompts (gathered from all processes'
rows) with the global, sharded parameters, so this works unchanged in a multi-process job.
Greedy decoding makes the numbers a deterministic function of the parameters. (K: drafts per
round, as in generate/speculative.py.)
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from mtp_jax.config import spec_prompt_len
from mtp_jax.errors import RunError, first_line
from mtp_jax.generate import decode, speculative
from mtp_jax.model import Transformer
from mtp_jax.train import step
from mtp_jax.train.program import memory

# Where the programs compile before the first step instead of beside the steps (module docstring).
COMPILE_FIRST_ON = ("gpu",)


class EvaluationError(RunError):
  """An evaluation program the compiler refuses for these devices, as one line."""


def lowered(program, prompts_BxP=None, lengths_B=None) -> list[tuple[str, Any]]:
  """[(name, program lowered)] for what an evaluation runs on `program`'s devices: the eval step
  on a batch and, given right-padded prompts (arrays or ShapeDtypeStructs), their speculative
  decoding as `speculative_acceptance` runs it. Compiled, these are what the evaluation's calls
  find in JAX's caches; mtp-compile compiles them to judge their memory."""
  cfg, t = program.cfg, program.cfg.train
  out = [("eval step", program.eval_step.lower(program.abstract_state, program.abstract_batch()))]
  if prompts_BxP is not None:
    s = program.abstract_state
    model = nnx.merge(step.graphdef_of(cfg), s.params, s.router_bias)
    key = jax.eval_shape(lambda: jax.random.key(0))
    spec = speculative.lower(model, prompts_BxP, lengths_B, key, t.eval_spec_tokens, model.mtp_depth, cfg.model.eos_id)
    out.append((f"speculative decoding of {prompts_BxP.shape[0]} prompts (train.eval_spec_prompts)", spec[0]))
  return out


class Evaluator:
  """`evaluator(state)` -> the eval metrics of `state`'s parameters (`step.eval_metrics`, and
  `speculative_acceptance` where train.eval_spec_prompts and the MTP depths draft)."""

  def __init__(self, program, eval_data):
    cfg, t = program.cfg, program.cfg.train
    self.program, self.eval_data = program, eval_data
    self.prompts = None
    if t.eval_spec_prompts and cfg.model.mtp.depth:
      it = iter(eval_data)
      try:
        first = next(it)
      finally:
        it.close()
      self.prompts = held_out_prompts(first, t.eval_spec_prompts, spec_prompt_len(t, cfg.data), cfg.model.eos_id)
    self._compiled: concurrent.futures.Future | None = None
    self._told = False
    self._waited = 0.0  # what the first evaluation waited for the compiles

  def compile_ahead(self) -> None:
    """Starts compiling the evaluation's programs; on GPUs, compiles them before returning."""
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mtp-eval-compile")
    self._compiled = pool.submit(self._compile)
    pool.shutdown(wait=False)  # the thread ends with the compile
    if self.program.mesh.devices.flat[0].platform in COMPILE_FIRST_ON:
      self._compiled.result()

  def _compile(self) -> tuple[float, list[tuple[str, int]]]:
    """(seconds, [(program, bytes per device)]); an EvaluationError where XLA refuses one."""
    start, sizes = time.perf_counter(), []
    prompts = decode.pad_prompts(self.prompts, self.program.cfg.train.eval_spec_tokens) if self.prompts else ()
    for name, program in lowered(self.program, *prompts):
      try:
        mem = memory(program.compile())
      except jax.errors.JaxRuntimeError as err:
        raise EvaluationError(
          f"evaluation (train.eval_every={self.program.cfg.train.eval_every}): XLA refuses the {name} "
          f"on these devices: {first_line(err)}"
        ) from None
      sizes.append((name, (mem["peak"] or mem["total"]) if mem else None))
    return time.perf_counter() - start, sizes

  def still_compiling(self) -> str | None:
    """Where the run stops (a preemption, Ctrl-C) while the programs still compile: the line that
    says why the process does not end yet. Python waits for the compile thread at exit, and XLA
    cannot stop a compile midway."""
    if self._compiled is None or self._compiled.done():
      return None
    return "the evaluation's programs are still compiling: the process ends once XLA has finished them"

  def ready(self) -> str | None:
    """Without waiting: the line to log once the programs have compiled (once), else None; the
    EvaluationError where one did not."""
    if self._told or self._compiled is None or not self._compiled.done():
      return None
    self._told = True
    seconds, sizes = self._compiled.result()
    each = ", ".join(f"{name} {size / 2**20:,.1f} MiB" if size else name for name, size in sizes)
    waited = f", the first evaluation waiting {self._waited:.1f} s of it" if self._waited else ""
    return f"evaluation compiled in {seconds:.1f} s{waited}; per device: {each}"

  def __call__(self, state) -> dict[str, float]:
    if self._compiled is not None and not self._compiled.done():
      began = time.perf_counter()
      self._compiled.result()  # and its errors
      self._waited = time.perf_counter() - began
    program, it, sums = self.program, iter(self.eval_data), None
    cfg = program.cfg
    try:
      for _ in range(cfg.train.eval_batches):
        out = program.eval_step(state, program.global_batch(next(it)))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    finally:
      it.close()
    values = step.eval_metrics(jax.device_get(sums))
    if self.prompts:
      model = nnx.merge(step.graphdef_of(cfg), state.params, state.router_bias)
      values.update(speculative_acceptance(model, self.prompts, cfg.train.eval_spec_tokens, cfg.model.eos_id))
    return values


def held_out_prompts(batch: dict[str, np.ndarray], count: int, max_len: int, eos_id: int) -> list[list[int]]:
  """The first `count` rows of a held-out batch (every process's rows, process 0's first), each
  cut to at most `max_len` tokens of the row's first document, its eos left out (at least one
  token): prompts the model was trained to continue."""
  tokens_BxL, segment_ids_BxL = (_everywhere(batch[k]) for k in ("tokens", "segment_ids"))
  prompts = []
  for tokens_L, seg_L in zip(tokens_BxL[:count], segment_ids_BxL[:count], strict=True):
    same = seg_L[:max_len] == seg_L[0]
    n = len(same) if same.all() else int(np.argmin(same))
    row = tokens_L[:n].tolist()
    prompts.append(row[: row.index(eos_id, 1)] if eos_id in row[1:] else row)
  return prompts


def _everywhere(x) -> np.ndarray:
  """On every process, as numpy: a host-local array's rows from all processes (process 0's
  first), or a global array (a jitted computation's output) whole."""
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def speculative_acceptance(
  model: Transformer, prompts: list[list[int]], new_tokens: int, eos_id: int
) -> dict[str, float]:
  """Greedy decoding drafted by every MTP depth -> eval/spec_accept_j (of the drafts at position
  j, the share accepted), eval/spec_accepted_len (1 + drafts accepted per round: tokens per
  verifying pass before rows hit max tokens or eos) and eval/spec_passes_per_token (measured),
  as `speculative.SpecStats` counts them."""
  out, _ = speculative.run(model, prompts, new_tokens, draft_tokens=model.mtp_depth, eos_id=eos_id)
  row_rounds, accepted_K, count_B = (_everywhere(x) for x in (out.row_rounds, out.accepted_K, out.count_B))
  rounds = max(int(row_rounds), 1)
  values = {f"eval/spec_accept_{j}": float(a) / rounds for j, a in enumerate(accepted_K, start=1)}
  values["eval/spec_accepted_len"] = 1.0 + float(accepted_K.sum()) / rounds
  values["eval/spec_passes_per_token"] = int(row_rounds) / max(int(count_B.sum()) - len(prompts), 1)
  return values


def summary(values: dict[str, float]) -> str:
  """The eval line: losses, then each depth's agreement and draft acceptance, compactly."""
  parts = [f"{k.removeprefix('eval/')} {v:.4f}" for k, v in values.items() if "loss" in k]
  agree = [v for k, v in values.items() if k.startswith("eval/mtp_agree_")]
  if agree:
    parts.append("agree " + "/".join(f"{v:.3f}" for v in agree))
  accept = [v for k, v in values.items() if k.startswith("eval/spec_accept_")]
  if accept:
    length = values["eval/spec_accepted_len"]
    parts.append("spec accept " + "/".join(f"{v:.3f}" for v in accept) + f" (accepted length {length:.2f})")
  return ", ".join(parts)
