"""The MTP depths as drafters, measured at each evaluation: greedy self-speculative decoding of
a few fixed held-out prompts with the current parameters.

Every process runs the same jitted program on the same prompts (gathered from all processes'
rows) with the global, sharded parameters, so this works unchanged in a multi-process job.
Greedy decoding makes the numbers a deterministic function of the parameters. (K: drafts per
round, as in generate/speculative.py.)
"""

from __future__ import annotations

import numpy as np
from jax.experimental import multihost_utils

from mtp_jax.generate import speculative
from mtp_jax.model import Transformer


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
