"""Host-side outputs of a run: TensorBoard events, a JSONL metrics log, transcripts, plots.

In a run of several processes only process 0 writes (`_is_writer`); the others' writes are no-ops,
so every process can call the same code with the same (gathered) values.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Iterable, Mapping

import numpy as np
import tensorboardX


def _is_writer() -> bool:
  import jax  # pylint: disable=g-import-not-at-top  # Only here: reading metrics needs no device.

  return jax.process_index() == 0


def _scalar(value: Any) -> float:
  return float(np.asarray(value))


class MetricWriter:
  """Writes scalar metrics to `<workdir>/tensorboard` and `<workdir>/metrics.jsonl`.

  Keys are slash-separated (`train/loss`, `eval/valid_unseen/success`) so TensorBoard
  groups them. Re-opening a workdir appends: a resumed run continues the same files. Only
  process 0 of a multi-process run opens them.
  """

  def __init__(self, workdir: str | pathlib.Path):
    self.workdir = pathlib.Path(workdir)
    self.enabled = _is_writer()
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self._tb = tensorboardX.SummaryWriter(str(self.workdir / "tensorboard"))
    self._jsonl = open(self.workdir / "metrics.jsonl", "a", encoding="utf-8")

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
    for key, value in metrics.items():
      value = _scalar(value)
      row[key] = value if math.isfinite(value) else str(value)
      self._tb.add_scalar(key, value, global_step=int(step))
    self._jsonl.write(json.dumps(row, sort_keys=True) + "\n")
    self._jsonl.flush()
    self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._tb.close()
    self._jsonl.close()


def export_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """Where a run writes its final model as a Hugging Face checkpoint (the `export` stage too)."""
  return pathlib.Path(workdir) / "hf"


def exported(workdir: str | pathlib.Path) -> bool:
  """Whether a run has finished: its export is written last, after every eval."""
  return (export_dir(workdir) / "config.json").exists()


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The JSONL metric rows of a workdir, in write order."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    raise FileNotFoundError(f"No metrics log at {path}.")
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def rows_with(workdir: str | pathlib.Path, prefix: str) -> list[dict[str, Any]]:
  """The metric rows holding a key that starts with `prefix` (e.g. "eval/"); none without a log."""
  if not (pathlib.Path(workdir) / "metrics.jsonl").exists():
    return []
  return [row for row in read_metrics(workdir) if any(k.startswith(prefix) for k in row)]


def write_transcripts(path: str | pathlib.Path, transcripts: Iterable[Mapping[str, Any]]) -> None:
  """Writes episode transcripts (turns with text, labels and weights) as readable JSONL (process 0 only)."""
  if not _is_writer():
    return
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for transcript in transcripts:
      f.write(json.dumps(transcript, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"Not JSON-serialisable in a transcript: {type(value).__name__}.")
