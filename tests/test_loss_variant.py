"""A loss variant is a one-file change: registered in this file alone, chosen on the command line.

The variant below weighs later turns more. Nothing else names it: the command line's config
validation accepts it because it is registered, the trainer runs the judge because it declares
that it reads the labels, and the update trains with its weights.
"""

import pathlib
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from sage_opd_jax import config as config_lib
from sage_opd_jax import losses
from sage_opd_jax import main
from sage_opd_jax import train
from sage_opd_jax import update as update_lib
from sage_opd_jax import writers

import test_losses
import test_main
from test_main import tokenizer_dir  # noqa: F401  (the module's tokenizer fixture)

NAME = "test_only_later_turns_weigh_more"
METHOD_DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "method.md"


def later_turns_weigh_more(batch, options):
  """Turn t scores t times the judge's intervention i_t (E5); (E8) then normalises."""
  return batch["turn_ids"].astype(jnp.float32) * losses.batch_intervention(batch, options)


def _command_line(config_path, *overrides):
  """The config the CLI builds from `--config=config_path` and `overrides`, by the CLI's own flag parser."""
  argv = ["main", f"--config={config_path}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv, as on the command line.
    flag_values(argv)
  return flag_values.config


def test_a_variant_registered_here_trains_from_the_command_line(tokenizer_dir, tmp_path):  # noqa: F811
  config_path = test_main._write_config(tmp_path, tokenizer_dir, **{"train.num_steps": 1, "eval.num_episodes": 0})
  with pytest.raises(config_lib.ConfigError, match=rf"config.method='{NAME}'"):  # Not registered yet.
    main.run(_command_line(config_path, f"--config.method={NAME}"), str(tmp_path / "refused"))
  assert not (tmp_path / "refused" / "checkpoints").exists()

  losses.register_loss(NAME, needs_labels=True)(later_turns_weigh_more)
  try:
    config = _command_line(config_path, f"--config.method={NAME}")
    spy = test_main.FirstBatch()
    with pytest.MonkeyPatch.context() as patch:
      patch.setattr(train.DistillSource, "batch", lambda source, step, student: spy(source, step, student))
      main.run(config, str(tmp_path / "run"))
    first = spy.arrays
    num_turns = first["valid"].shape[1]
    weights_BxS = np.asarray(losses.token_weights({k: jnp.asarray(first[k]) for k in update_lib.loss_keys(first)},
                                                  train.loss_options(config, NAME, num_turns)))
  finally:
    losses._REGISTRY.pop(NAME)

  # The judge ran (the variant reads labels), and the weights are the variant's, in float64 NumPy.
  turn_ids_BxS = first["turn_ids"]
  response_BxS = turn_ids_BxS > 0
  labels_BxT = first["labels"]
  intervention_BxS = np.where(response_BxS, np.choose(labels_BxT, [0.0, config.loss.alpha, 1.0])[
      np.arange(len(turn_ids_BxS))[:, None], np.maximum(turn_ids_BxS - 1, 0)], 0.0)
  score_BxS = turn_ids_BxS * intervention_BxS
  want_BxS = score_BxS * response_BxS.sum() / score_BxS.sum()
  np.testing.assert_allclose(weights_BxS, want_BxS, rtol=1e-5, atol=1e-7)
  flat_BxS = np.where(response_BxS, intervention_BxS * response_BxS.sum() / intervention_BxS.sum(), 0.0)
  assert np.abs(want_BxS - flat_BxS).max() > 1e-2  # Later turns really weigh more than under equal turns.

  # The update trained with them: old_logprobs="current" makes the loss sum_s w_s k1_s / N.
  row = test_main.first_update(tmp_path / "run")
  assert row["train/num_tokens"] == response_BxS.sum() > 0
  assert row["train/weight_mean"] == pytest.approx(want_BxS.sum() / response_BxS.sum(), rel=1e-5)
  k1_BxS = first["student_logprobs"].astype(np.float64) - first["teacher_logprobs"]
  assert row["train/loss"] == pytest.approx((want_BxS * k1_BxS).sum() / response_BxS.sum(), rel=1e-4,
                                            abs=test_main.LOSS_TOL)
  assert writers.exported(tmp_path / "run")


def test_the_documented_recipe_registers_a_working_variant():
  section = METHOD_DOC.read_text().split("## Adding a loss variant", 1)[1]
  (code,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL)
  before = set(losses.registered_losses())
  exec(compile(code, str(METHOD_DOC), "exec"), {})  # pylint: disable=exec-used
  (name,) = set(losses.registered_losses()) - before
  try:
    assert losses.variant(name).needs_labels
    # The identity the recipe states: on squared token top-1 confidences, the square root gives sage_opd.
    _, logits, _, batch = test_losses.random_case(6, 3, 11, 5, 4)
    squared = dict(batch, teacher_top1=batch["teacher_top1"] ** 2)
    options = dict(estimator="full", confidence="token_top1")
    got = losses.sage_opd_loss(logits, squared, method=name, **options)[0]
    want = losses.sage_opd_loss(logits, batch, method="sage_opd", **options)[0]
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    assert abs(float(got) - float(losses.sage_opd_loss(logits, squared, method="sage_opd", **options)[0])) > 1e-4
  finally:
    losses._REGISTRY.pop(name)
