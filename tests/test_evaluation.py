"""Episode metrics against a hand count."""

import numpy as np
import pytest

from sage_opd_jax import evaluation


def test_metrics_match_a_hand_count():
  # Episode 0: 3 turns, won, turn 2 invalid. Episode 1: 2 turns, lost, turn 2 repeats turn 1.
  # Episode 2: 4 turns, won, nothing odd. Columns past num_turns hold junk that must be ignored.
  valid = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
  repeated = np.array([[0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 0, 0]], bool)
  m = evaluation.episode_metrics(
      won_B=np.array([1, 0, 1]), num_turns_B=np.array([3, 2, 4]), valid_BxT=valid,
      repeated_BxT=repeated, task_types=["pick", "look", "pick"], cut_B=np.array([0, 1, 0]),
      prefix="valid_seen/",
  )
  assert m["valid_seen/success"] == pytest.approx(2 / 3)
  assert m["valid_seen/mean_turns"] == pytest.approx(3.0)
  assert m["valid_seen/invalid_rate"] == pytest.approx(1 / 9)
  assert m["valid_seen/repeated_rate"] == pytest.approx(1 / 9)
  assert m["valid_seen/pick/success"] == 1.0 and m["valid_seen/pick/episodes"] == 2.0
  assert m["valid_seen/look/success"] == 0.0
  assert m["valid_seen/look/repeated_rate"] == pytest.approx(1 / 2)
  assert m["valid_seen/pick/invalid_rate"] == pytest.approx(1 / 7)
  assert m["valid_seen/context_cut_rate"] == pytest.approx(1 / 3)
  assert m["valid_seen/look/context_cut_rate"] == 1.0 and m["valid_seen/pick/context_cut_rate"] == 0.0


def test_mismatched_lengths_are_named():
  with pytest.raises(ValueError, match="2 task types"):
    evaluation.episode_metrics(won_B=np.zeros(3), num_turns_B=np.ones(3), valid_BxT=np.ones((3, 2)),
                               repeated_BxT=np.zeros((3, 2)), task_types=["a", "b"], cut_B=np.zeros(3))
  with pytest.raises(ValueError, match=r"cut \(2,\)"):
    evaluation.episode_metrics(won_B=np.zeros(3), num_turns_B=np.ones(3), valid_BxT=np.ones((3, 2)),
                               repeated_BxT=np.zeros((3, 2)), task_types=["a", "b", "c"], cut_B=np.zeros(2))


def test_mean_and_std_over_seeds():
  out = evaluation.mean_and_std([{"s": 0.5}, {"s": 1.0}])
  assert out["s"] == pytest.approx((0.75, 0.25))
  with pytest.raises(ValueError, match="run 1"):
    evaluation.mean_and_std([{"s": 0.5}, {"t": 1.0}])
