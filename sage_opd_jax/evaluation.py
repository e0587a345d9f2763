"""The metrics of a set of episodes (docs/method.md), per split and per task type."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def episode_metrics(
    *,
    won_B: np.ndarray,
    num_turns_B: np.ndarray,
    valid_BxT: np.ndarray,
    repeated_BxT: np.ndarray,
    task_types: Sequence[str],
    cut_B: np.ndarray,
    prefix: str = "",
) -> dict[str, float]:
  """Success, mean turns, invalid- and repeated-action rates, overall and per task type.

  Rates are over turns that happened (column t < num_turns[b]), pooled over episodes, so
  a long failing episode weighs more than a short winning one, as docs/method.md defines them.
  `cut_B` flags episodes the context budget ended before the turn limit; their
  fraction is `context_cut_rate`, which says when `train.max_seq_len`, not the policy, set
  how long a losing episode searched.
  """
  won_B = np.asarray(won_B, bool)
  num_turns_B = np.asarray(num_turns_B, np.int64)
  B, T = np.shape(valid_BxT)
  cut_B = np.asarray(cut_B, bool)
  if len(task_types) != B or won_B.shape != (B,) or num_turns_B.shape != (B,) or cut_B.shape != (B,):
    raise ValueError(
        f"episode_metrics: {B} episodes in valid_BxT but won {won_B.shape}, num_turns "
        f"{num_turns_B.shape}, cut {cut_B.shape} and {len(task_types)} task types."
    )
  happened_BxT = np.arange(T)[None, :] < num_turns_B[:, None]

  def summarise(rows: np.ndarray) -> dict[str, float]:
    turns = happened_BxT[rows].sum()
    return {
        "success": float(won_B[rows].mean()),
        "mean_turns": float(num_turns_B[rows].mean()),
        "invalid_rate": float((happened_BxT[rows] & ~np.asarray(valid_BxT, bool)[rows]).sum() / max(turns, 1)),
        "repeated_rate": float((happened_BxT[rows] & np.asarray(repeated_BxT, bool)[rows]).sum() / max(turns, 1)),
        "context_cut_rate": float(cut_B[rows].mean()),
        "episodes": float(rows.sum()),
    }

  metrics = {f"{prefix}{k}": v for k, v in summarise(np.ones(B, bool)).items()}
  types = np.asarray(task_types)
  for task_type in sorted(set(task_types)):
    for k, v in summarise(types == task_type).items():
      metrics[f"{prefix}{task_type}/{k}"] = v
  return metrics


def mean_and_std(runs: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
  """Per key, the mean and (population) std over runs, e.g. over seeds; keys must agree."""
  keys = set(runs[0])
  for i, run in enumerate(runs):
    if set(run) != keys:
      raise ValueError(f"mean_and_std: run {i} has keys {sorted(set(run) ^ keys)} that run 0 does not share.")
  return {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))) for k in sorted(keys)}
