"""Run provenance: every workdir records the config that made it, and a rerun must match it.

The first process to run in a folder writes `<folder>/config.json`: the flattened config
(dotted keys) and the folder's path. Every later process in that folder (a resume, a
pipeline rerun that would reuse a finished stage) compares its own config with the record
before anything is built, and refuses on a difference in a key that changes what the run
computes, listing the keys with their recorded and new values. A few keys only say how a
run executes or how long it goes on (`MAY_CHANGE`); `config.allow_changed` names further
keys whose change the user accepts. Either way the record is then rewritten to the new values.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Any

import ml_collections

from sage_opd_jax import config as config_lib
from sage_opd_jax import files

RECORD = "config.json"
# Keys (or whole sections) that may change between the processes of one run: how it executes
# (workers, timeouts, mesh, memory knobs, caches), what it logs and keeps, how many updates it
# runs (extending a run), and which of the pipeline's runs exist. None changes what an update computes.
MAY_CHANGE = (
    "allow_changed", "compilation_cache_dir",
    "train.num_steps", "train.log_every", "train.eval_every", "train.ckpt_every", "train.keep_ckpts",
    "eval.num_transcripts",
    "env.num_workers", "env.step_timeout_s", "demos.game_timeout_s",
    "mesh", "teacher.score_chunk", "student.loss_chunk",
    # The decode loop's shape floors: padding only, so a run may resume under other buckets.
    "sampling.min_cache_len", "sampling.min_chunk_len", "sampling.min_trie_shape",
    *(f"{who}.model.{field}" for who in ("student", "teacher") for field in ("remat", "attention_chunk",
                                                                            "mlp_chunk", "scan_unroll")),
    "pipeline.methods", "pipeline.seeds", "pipeline.sweep", "pipeline.results_dir",
)


def flatten(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """{dotted key: JSON value} of every leaf of `config` (tuples become lists, as JSON has them)."""
  flat: dict[str, Any] = {}

  def walk(node: Any, prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        walk(value, f"{prefix}{key}.")
      else:
        flat[f"{prefix}{key}"] = json.loads(json.dumps(value))

  walk(config, "")
  return flat


def _covered(key: str, patterns: tuple[str, ...]) -> bool:
  return any(key == p or key.startswith(p + ".") for p in patterns)


def _moved(recorded: str, now: str) -> tuple[str, str]:
  """The (old, new) folder that was moved or renamed, when the record's folder is now elsewhere.

  The common trailing path parts are the part of the run that did not move: for a pipeline stage,
  /a/run/runs/opd/seed0 -> /b/run2/runs/opd/seed0 means /a/run moved to /b/run2.
  """
  old, new = list(pathlib.PurePath(recorded).parts), list(pathlib.PurePath(now).parts)
  while len(old) > 1 and len(new) > 1 and old[-1] == new[-1]:
    old.pop()
    new.pop()
  return str(pathlib.PurePath(*old)), str(pathlib.PurePath(*new))


def _relocate(value: Any, old: str, new: str) -> Any:
  """`value` with paths under `old` moved under `new` (a moved workdir's own paths move with it)."""
  if isinstance(value, str) and (value == old or value.startswith(old.rstrip("/") + "/")):
    return new + value[len(old):]
  if isinstance(value, list):
    return [_relocate(v, old, new) for v in value]
  return value


def diff(recorded: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{key: (recorded, now)} for every key present in both whose values differ."""
  return {k: (recorded[k], now[k]) for k in sorted(recorded.keys() & now.keys()) if recorded[k] != now[k]}


def check(config: ml_collections.ConfigDict, folder: str | os.PathLike, *, write: bool = True,
          also_allowed: tuple[str, ...] = (), only: tuple[str, ...] | None = None) -> None:
  """Records `config` in `folder`, or checks it against the record there.

  Raises `config_lib.ConfigError` with the changed keys when a key outside `MAY_CHANGE`,
  `config.allow_changed` and `also_allowed` differs from the record. Keys the record lacks
  (a field added to the code since) or has in excess (one removed) are logged, not refused.
  With `write` False (a stage that only reads the folder) the record is never written.
  `only` (keys or sections) compares those keys alone: what another run that reuses the folder shares with it.
  """
  folder = pathlib.Path(folder).absolute()
  path = folder / RECORD
  now = flatten(config)
  if path.exists():
    try:
      record = json.loads(path.read_text(encoding="utf-8"))
      recorded, where = dict(record["config"]), record["workdir"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise config_lib.ConfigError(f"{path}: cannot read the recorded config ({type(e).__name__}: {e}); "
                                   "restore the file, or use a new workdir.") from None
    if where != str(folder):
      old, new = _moved(where, str(folder))
      recorded = {k: _relocate(v, old, new) for k, v in recorded.items()}
    changed = diff(recorded, now)
    if only is not None:
      changed = {k: v for k, v in changed.items() if _covered(k, only)}
    accepted = (*MAY_CHANGE, *config_lib.allowed_changes(config), *also_allowed)
    refused = {k: v for k, v in changed.items() if not _covered(k, accepted)}
    if refused:
      lines = "\n".join(f"  {k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
      raise config_lib.ConfigError(
          f"{folder} holds a run made with another config ({path}); these keys differ (recorded -> now):\n{lines}\n"
          f"Use a new workdir for a new run, or continue this one with the new values by adding "
          f"--config.allow_changed={','.join(refused)}")
    for k in sorted(recorded.keys() ^ now.keys()):
      logging.info("%s: config.%s is %s.", path, k, "new since the record" if k in now else "no longer a field")
    if not changed and recorded.keys() == now.keys() and where == str(folder):
      return
    if changed:
      logging.warning("%s: continuing with changed config keys %s.", path,
                      ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items()))
  if write and _is_primary():
    folder.mkdir(parents=True, exist_ok=True)
    # Atomic: a reader sees the old record or the new one, never half of it.
    files.write_atomically(path, json.dumps({"workdir": str(folder), "config": now}, indent=1, sort_keys=True) + "\n")


def _is_primary() -> bool:
  import jax  # pylint: disable=g-import-not-at-top  # Only here: the record needs no device otherwise.

  return jax.process_index() == 0
