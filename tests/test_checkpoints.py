"""Orbax checkpoints: round trip with host state, keep-last-k, no half-written or damaged restores."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sage_opd_jax import checkpoints


def _state(seed: int):
  key = jax.random.key(seed)
  return {
      "params": {"w": jax.random.normal(key, (4, 3)), "b": jnp.arange(3.0)},
      "step": jnp.asarray(seed, jnp.int32),
      "rng": jax.random.key_data(key),
  }


def test_round_trip_restores_state_and_host(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, save_every=1, keep=2)
  state = _state(3)
  host = {"task_cursor": 17, "config": {"method": "sage_opd"}}
  assert ckpt.save(5, state, host)
  ckpt.wait()
  restored, restored_host = ckpt.restore(checkpoints.abstract_like(state))
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert restored_host == host
  ckpt.close()


def test_keeps_last_k_and_respects_interval(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, save_every=2, keep=2)
  saved = [step for step in range(1, 8) if ckpt.save(step, _state(step), {"step": step})]
  ckpt.wait()
  assert saved == [2, 4, 6]
  assert ckpt.latest_step() == 6
  kept = sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit())
  assert kept == [4, 6]
  restored, host = ckpt.restore(checkpoints.abstract_like(_state(0)), step=4)
  assert host == {"step": 4}
  np.testing.assert_array_equal(restored["params"]["w"], _state(4)["params"]["w"])
  ckpt.close()


def test_half_written_checkpoint_is_never_picked_up(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, save_every=1, keep=3)
  ckpt.save(1, _state(1), {"step": 1})
  ckpt.close()
  # What a SIGKILL mid-save leaves: orbax's temporary folder for a later step.
  partial = tmp_path / "2.orbax-checkpoint-tmp-1234"
  (partial / "state").mkdir(parents=True)
  (partial / "state" / "garbage").write_text("truncated")
  reopened = checkpoints.Checkpointer(tmp_path, save_every=1, keep=3)
  assert reopened.latest_step() == 1
  _, host = reopened.restore(checkpoints.abstract_like(_state(0)))
  assert host == {"step": 1}
  reopened.close()


def test_restore_with_nothing_saved_returns_none(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, save_every=1, keep=1)
  assert ckpt.restore(checkpoints.abstract_like(_state(0))) is None
  ckpt.close()


def _big_state(seed: int):
  """A state whose largest array (256 KiB of random floats) fills one data file that compression cannot shrink."""
  return dict(_state(seed), moments=jax.random.normal(jax.random.key(seed + 100), (256, 256)))


def _largest_data_file(step_dir):
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _overwrite_middle(step_dir):
  file = _largest_data_file(step_dir)
  data = bytearray(file.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 4096] = np.random.default_rng(0).bytes(4096)  # Raw float data: no decoder notices.
  file.write_bytes(bytes(data))
  return "does not match the digest saved with it (arrays [\"['moments']\"])"


def _truncate_data(step_dir):
  file = _largest_data_file(step_dir)
  file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
  return "Error reading \"moments"


def _truncate_host(step_dir):
  file = step_dir / "host" / "metadata"
  file.write_bytes(file.read_bytes()[:5])
  return f"{file} is not valid JSON"


def _delete_metadata(step_dir):
  (step_dir / "state" / "_METADATA").unlink()
  return f"{step_dir / 'state' / '_METADATA'} is missing"


@pytest.mark.parametrize("damage", [_overwrite_middle, _truncate_data, _truncate_host, _delete_metadata],
                         ids=["overwritten", "truncated", "host_truncated", "metadata_deleted"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, caplog, damage):
  ckpt = checkpoints.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  for step in (1, 2):
    ckpt.save(step, _big_state(step), {"step": step})
  ckpt.close()
  named = damage(tmp_path / "ckpt" / "2")
  reopened = checkpoints.Checkpointer(tmp_path / "ckpt", save_every=1, keep=3)
  with caplog.at_level(logging.WARNING):
    restored, host = reopened.restore(checkpoints.abstract_like(_big_state(0)))
  assert host == {"step": 1}
  jax.tree.map(np.testing.assert_array_equal, restored, _big_state(1))
  assert named in caplog.text and f"Restored checkpoint {tmp_path / 'ckpt' / '1'}" in caplog.text
  # The damaged step is set aside, so the resumed run saves that step again.
  assert reopened.latest_step() == 1 and [p.name[:2] for p in (tmp_path / "ckpt_corrupt").iterdir()] == ["2-"]
  assert reopened.save(2, _big_state(2), {"step": 2})
  reopened.wait()
  assert reopened.restore(checkpoints.abstract_like(_big_state(0)))[1] == {"step": 2}
  reopened.close()


def test_no_intact_checkpoint_is_an_error_naming_the_directory(tmp_path):
  ckpt = checkpoints.Checkpointer(tmp_path, save_every=1, keep=1)
  ckpt.save(1, _big_state(1), {"step": 1})
  ckpt.close()
  _overwrite_middle(tmp_path / "1")
  reopened = checkpoints.Checkpointer(tmp_path, save_every=1, keep=1)
  with pytest.raises(checkpoints.CorruptCheckpointError, match=f"No intact checkpoint in {tmp_path}:\n  step 1: "):
    reopened.restore(checkpoints.abstract_like(_big_state(0)))
  assert (tmp_path / "1").is_dir()  # Nothing restored, nothing moved.
  reopened.close()


def test_a_checkpoint_holding_non_finite_values_is_not_restored(tmp_path):
  # Written as checkpoints were before they carried digests, by orbax itself.
  state = _state(1)
  state["params"]["b"] = state["params"]["b"].at[0].set(jnp.nan)
  with ocp.CheckpointManager(tmp_path, item_names=("state", "host")) as manager:
    manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state), host=ocp.args.JsonSave({"step": 1})))
  reopened = checkpoints.Checkpointer(tmp_path, save_every=1, keep=1)
  with pytest.raises(checkpoints.CorruptCheckpointError, match=r"non-finite values in \[\"\['params'\]\['b'\]\"\]"):
    reopened.restore(checkpoints.abstract_like(state))
  with pytest.raises(ValueError, match="Refusing to checkpoint step 2: non-finite"):
    reopened.save(2, state, {"step": 2})
  reopened.close()
