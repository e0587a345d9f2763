"""Orbax checkpoints of the train state plus the host state needed to resume exactly.

A checkpoint holds two items:
  * `state`: the train-state pytree (params, optimiser state, step, rng key data);
  * `host`: JSON with everything else a resumed run needs to continue exactly
    (the task cursor, the config, the host-side rng state).

Orbax writes each step into a temporary folder and renames it only once complete,
so `latest_step` never sees a half-written checkpoint, even after SIGKILL.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves asynchronously every `save_every` steps and keeps the last `keep`."""

  def __init__(self, directory: str | pathlib.Path, *, save_every: int, keep: int):
    if save_every < 1:
      raise ValueError(f"save_every={save_every}: must be >= 1.")
    if keep < 1:
      raise ValueError(f"keep={keep}: must be >= 1.")
    self.directory = pathlib.Path(directory).absolute()
    self.save_every = save_every
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # The interval is ours (see `save`): orbax's saves any first step.
            max_to_keep=keep,
            enable_async_checkpointing=True,
            create=True,
        ),
        item_names=("state", "host"),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, host: dict[str, Any], *, force: bool = False) -> bool:
    """Starts an asynchronous save when `step` is due (or `force`); returns whether it did."""
    if not force and step % self.save_every:
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)),
        force=force,
    )

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
    """Restores `step` (default: the latest complete one) onto `abstract_state`'s shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings, e.g. from
    `jax.eval_shape`; returns None when there is nothing to restore.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()),
    )
    return restored.state, dict(restored.host)

  def wait(self) -> None:
    """Blocks until every pending asynchronous save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state: Any) -> Any:
  """The ShapeDtypeStruct pytree (with shardings) that `Checkpointer.restore` restores onto."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
  )
