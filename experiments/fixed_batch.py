"""Does OPD fit the teacher on the student's own states, and does what it fits carry to other states?

The student plays two batches of train games (the distill stage's own batches 0 and 1: rollouts at the
rollout temperature, scored by the config's teacher). Then `--steps` updates of the trainer's own update
step, every one on batch A; before each, the loss's per-token divergence (`train/kl_mean`) on A and on
batch B, which it never trains on. With the exact divergence (`--config.loss.estimator=full`) that is the
divergence itself, position by position: falling on A says the update minimises its objective on the
states it sees; rising on B says what it learns there moves the student the wrong way on other states.

  python -m experiments.fixed_batch --config=configs/alfworld_control.py:0 \\
      --config.tokenizer_dir=workdirs/alfworld_control/tokenizer \\
      --config.student.hf_dir=workdirs/alfworld_control/student_sft/hf \\
      --config.student.model.vocab_size=1344 --config.teacher.model.vocab_size=1344 \\
      --config.loss.estimator=full --learning_rates=1e-4,1e-3

Prints one line per update and learning rate; `--out` also writes them as JSON.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from sage_opd_jax import config as config_lib
from sage_opd_jax import train
from sage_opd_jax import update as update_lib
from sage_opd_jax.envs import base
from sage_opd_jax.models import sharding

_CONFIG = config_flags.DEFINE_config_file("config", "configs/alfworld_control.py:0", "A distill config.")
_STEPS = flags.DEFINE_integer("steps", 30, "Updates on batch A.")
_LEARNING_RATES = flags.DEFINE_list("learning_rates", ["1e-4", "1e-3"], "Constant learning rates, each from the start.")
_OUT = flags.DEFINE_string("out", "", "Also write the curves here as JSON.")


def main(_):
  config = _CONFIG.value
  config.stage = "distill"
  config_lib.validate(config)
  mesh = train.mesh_from_config(config.mesh)
  tokenizer = train.shared_tokenizer(config, "distill")
  student = train.load_model(config.student, mesh, config.seed)
  graphdef = nnx.graphdef(student)
  teacher = train.load_teacher(config, tokenizer, mesh)
  engine = train.make_rollout_engine(config, tokenizer)
  env = base.make(config.env.name, **train.env_kwargs(config))
  tasks = env.tasks(config.env.train_split)
  env.close()
  batch_sharding = sharding.batch_sharding(mesh)
  try:
    source = train.DistillSource(config, tokenizer, teacher, engine, tasks, batch_sharding)
    played = {name: source.batch(step, student)[:2] for name, step in (("A", 0), ("B", 1))}
  finally:
    engine.close()
  for name, (_, host) in played.items():
    print(f"batch {name}: won {host['rollout/success']:.3f}, {host['rollout/mean_turns']:.1f} turns")
  batches = {name: jax.device_put({k: arrays[k] for k in update_lib.loss_keys(arrays)}, batch_sharding)
             for name, (arrays, _) in played.items()}
  loss_fn, totals_fn = update_lib.make_loss_fns(train.loss_options(config, config.method, config.env.max_turns),
                                                config.student.loss_chunk)
  tx = update_lib.make_optimizer(config.optim)

  @jax.jit
  def divergence(params, batch):
    return loss_fn(nnx.merge(graphdef, params), batch, totals_fn(batch))[1]["kl_mean"]

  curves, update = {}, None
  for rate in _LEARNING_RATES.value:
    state, state_sharding = update_lib.place_state(
        update_lib.init_train_state(nnx.merge(graphdef, jax.tree.map(jnp.copy, nnx.state(student))), tx, config.seed),
        mesh)  # A copy: the update donates its state.
    # One compiled update serves every rate (the rate is its input), as in the trainer.
    update = update or update_lib.jit_update(
        update_lib.make_update_fn(graphdef, tx, loss_fn, totals_fn, micro_batches=config.train.micro_batches),
        state_sharding, batch_sharding)
    rows = []
    for step in range(_STEPS.value + 1):
      row = {name: float(divergence(state.params, batch)) for name, batch in batches.items()}
      rows.append(row)
      print(f"lr {rate} update {step}: divergence on A {row['A']:.4f}, on B {row['B']:.4f}", flush=True)
      if step < _STEPS.value:
        state, _ = update(state, batches["A"], np.float32(rate))
    curves[rate] = rows
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(curves, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
