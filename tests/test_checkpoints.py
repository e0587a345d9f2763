"""Orbax checkpoints: round trip with host state, keep-last-k, and no half-written restores."""

import jax
import jax.numpy as jnp
import numpy as np

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
