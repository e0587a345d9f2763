"""Orbax checkpoints of the train state plus the host state needed to resume exactly.

A checkpoint holds two items:
  * `state`: the train-state pytree (params, optimiser state, step, rng key data);
  * `host`: JSON with everything else a resumed run needs to continue exactly
    (the task cursor, the config, the host-side rng state), and the checkpoint's digest.

Orbax writes each step into a temporary folder and renames it only once complete,
so `latest_step` never sees a half-written checkpoint, even after SIGKILL. What it does
not do is check the bytes it reads back: its zarr shards checksum their index only, so a
data file damaged after the save can restore as other values without an error. Each save
therefore records a checksum of every array (computed on device, so a sharded state is never
gathered) in the host JSON, which orbax commits in the same atomic rename; `restore` checks
it, and that every float is finite, and falls back to the newest intact checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import shutil
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

DIGEST = "digest"  # The host-JSON key of a checkpoint's digest.
# The JSON files of a step folder that restore reads, checked first so that an error names the file.
_JSON_FILES = ("_CHECKPOINT_METADATA", "host/metadata", "state/_METADATA", "state/_sharding")
_REQUIRED = ("host/metadata", "state/_METADATA")


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read back, or reads back other values than were saved."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
  """[2] uint32: two position-weighted sums of the array's bits, wrapping mod 2**32.

  Each element's bits are multiplied by an odd weight of its position, so changing any one
  element always changes the first sum, and moving values around changes it too; a
  corruption that changes many elements goes unseen with odds of about 2**-64. A checksum,
  not a cryptographic hash: it guards against damaged files, not against an adversary.
  """
  x = jnp.asarray(x)
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  elif x.dtype.itemsize == 8:  # Two 32-bit words per element, on a trailing axis.
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
  # The flat position from per-axis iotas (a reshape to 1-D would gather a sharded array).
  position = jnp.zeros(bits.shape, jnp.uint32)
  stride = 1
  for axis in reversed(range(bits.ndim)):
    position += jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * jnp.uint32(stride % 2**32)
    stride *= bits.shape[axis]
  first = position * jnp.uint32(2) + jnp.uint32(1)
  second = (position * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)) | jnp.uint32(1)
  mixed = bits ^ (bits >> jnp.uint32(15))
  return jnp.stack([jnp.sum(bits * first, dtype=jnp.uint32), jnp.sum(mixed * second, dtype=jnp.uint32)])


@jax.jit
def _inspect(state: Any) -> tuple[Any, Any]:
  """(per-leaf checksums, per-leaf all-finite flags) of a state pytree, in one program."""
  checksums = jax.tree.map(_leaf_checksum, state)
  finite = jax.tree.map(
      lambda x: jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.asarray(True), state)
  return checksums, finite


def _leaf_names(state: Any) -> list[str]:
  return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]


def array_digest(state: Any) -> tuple[dict[str, str], list[str]]:
  """({leaf name: hex checksum}, names of leaves holding a NaN or an infinity) of `state`."""
  checksums, finite = jax.device_get(_inspect(state))
  names = _leaf_names(state)
  sums = [f"{int(c[0]):08x}{int(c[1]):08x}" for c in jax.tree.leaves(checksums)]
  return dict(zip(names, sums)), [n for n, ok in zip(names, jax.tree.leaves(finite)) if not ok]


def _host_digest(host: dict[str, Any]) -> str:
  """SHA-256 of the host JSON (without the digest itself); JSON turns tuples into lists either way."""
  host = {k: v for k, v in host.items() if k != DIGEST}
  return hashlib.sha256(json.dumps(host, sort_keys=True).encode()).hexdigest()


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
    """Starts an asynchronous save when `step` is due (or `force`); returns whether it did.

    The digest is computed before the save returns, while `state` is still valid (the next
    update may donate its buffers).
    """
    if not force and step % self.save_every:
      return False
    arrays, nonfinite = array_digest(state)
    if nonfinite:  # The update never applies such a state (update.make_update_fn); saving one would be a bug.
      raise ValueError(f"Refusing to checkpoint step {step}: non-finite values in {nonfinite}.")
    host = dict(host, **{DIGEST: {"arrays": arrays, "host": _host_digest(host)}})
    return self._manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)),
        force=force,
    )

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]] | None:
    """Restores `step`, or else the newest intact checkpoint, onto `abstract_state`'s shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings, e.g. from
    `jax.eval_shape`; returns None when there is nothing to restore. A checkpoint that fails
    to read, whose digest does not match, or that holds a non-finite value is logged with the
    file or array at fault; without `step`, the next older one is tried, and the bad ones newer
    than the one restored are moved to `<directory>_corrupt/` (else orbax would never save
    those steps again). Raises `CorruptCheckpointError` naming the directory when none is intact.
    """
    steps = sorted(self._manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      return None
    bad: dict[int, str] = {}
    for candidate in steps:
      try:
        restored = self._restore_verified(candidate, abstract_state)
      except Exception as e:  # pylint: disable=broad-except  # Any failure to read it back makes it unusable.
        bad[candidate] = f"{type(e).__name__}: {e}" if not isinstance(e, CorruptCheckpointError) else str(e)
        logging.error("Checkpoint %s is unusable: %s", self._step_dir(candidate), bad[candidate])
        continue
      if bad:
        logging.warning("Restored checkpoint %s instead of the newer, unusable %s.", self._step_dir(candidate),
                        ", ".join(map(str, sorted(bad))))
        self._set_aside(sorted(bad))
      return restored
    details = "\n".join(f"  step {s}: {why}" for s, why in bad.items())
    raise CorruptCheckpointError(
        f"No intact checkpoint in {self.directory}:\n{details}\nMove the folder away to start again, or restore "
        "its files from a copy.")

  def _step_dir(self, step: int) -> pathlib.Path:
    return self.directory / str(step)

  def _restore_verified(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    folder = self._step_dir(step)
    for name in _JSON_FILES:  # Orbax's own errors for these name no file.
      path = folder / name
      if not path.exists():
        if name in _REQUIRED:
          raise CorruptCheckpointError(f"{path} is missing.")
        continue
      try:
        json.loads(path.read_bytes())
      except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(f"{path} is not valid JSON ({e}): the file is truncated or damaged.") from e
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()),
      )
    except Exception as e:
      cause = e  # TensorStore's own error, at the bottom of the chain, names the array and the byte range.
      while cause.__cause__ is not None:
        cause = cause.__cause__
      first_line = (str(cause).strip().splitlines() or [""])[0]
      raise CorruptCheckpointError(f"reading {folder / 'state'} failed: {type(cause).__name__}: {first_line}") from e
    state, host = restored.state, dict(restored.host)
    arrays, nonfinite = array_digest(state)
    recorded = host.pop(DIGEST, None)
    if recorded is None:  # Written before checkpoints carried digests: only the values can be checked.
      logging.warning("Checkpoint %s carries no digest: its arrays cannot be verified.", folder)
    else:
      if recorded["host"] != _host_digest(host):
        raise CorruptCheckpointError(f"{folder / 'host' / 'metadata'} does not match its digest.")
      changed = [name for name, value in arrays.items() if recorded["arrays"].get(name) != value]
      if changed or set(recorded["arrays"]) != set(arrays):
        raise CorruptCheckpointError(
            f"the data under {folder / 'state'} does not match the digest saved with it (arrays "
            f"{changed or sorted(set(recorded['arrays']) ^ set(arrays))}): a data file was damaged after the save.")
    if nonfinite:
      raise CorruptCheckpointError(f"{folder / 'state'} holds non-finite values in {nonfinite}.")
    return state, host

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unusable step folders to `<directory>_corrupt/<step>-<time>` and forgets them."""
    if jax.process_index() == 0:
      corrupt = self.directory.with_name(self.directory.name + "_corrupt")
      corrupt.mkdir(parents=True, exist_ok=True)
      for step in steps:
        target = corrupt / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        shutil.move(str(self._step_dir(step)), target)
        logging.warning("Moved the unusable checkpoint %s to %s.", self._step_dir(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices("sage_opd_jax.checkpoints.set_aside")
    self._manager.reload()

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
