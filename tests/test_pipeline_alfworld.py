"""The ALFWorld pipeline with the teacher's DAgger rounds (its own, then the student's), on the fixture games."""

import json
import pathlib
import re

import pytest

from configs import alfworld_cpu
from configs import base
from sage_opd_jax import config as config_lib
from sage_opd_jax import dagger
from sage_opd_jax import pipeline
from sage_opd_jax import results
from sage_opd_jax import train
from sage_opd_jax import writers
from sage_opd_jax.envs import base as envs_base
from sage_opd_jax.envs import demos as demos_lib

FIXTURE_DATA = pathlib.Path(__file__).resolve().parent / "fixtures" / "alfworld"
TINY = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
            max_position_embeddings=1024)


def tiny_config():
  """alfworld_cpu (constrained decoding, subgoal thoughts) cut to the fixture's one train game."""
  config = alfworld_cpu.get_config()
  config.env.data_dir = str(FIXTURE_DATA)
  config.env.eval_splits = ("valid_seen",)  # The fixture has no valid_unseen game of these types.
  config.env.max_turns = 4
  config.env.history_turns = 4
  config.env.num_workers = 1
  config.student.model = base.tiny_model(**TINY)
  config.teacher.model = base.tiny_model(**dict(TINY, hidden_size=48, head_dim=24))
  config.demos.judge_states = 1
  config.demos.search_order, config.demos.passes = "shuffled", 2
  config.sampling.max_new_tokens = 16
  config.judge.max_new_tokens = 2
  config.train.batch_episodes = 1  # The student's warm start has one demonstration.
  config.train.max_seq_len = 512
  config.train.eval_every = 100
  config.train.ckpt_every = 100
  config.eval.num_episodes = 1
  config.eval.num_transcripts = 1
  config.teacher.score_chunk = 64
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 1, 1
  config.sft.renumbered_copies = 1
  config.pipeline = alfworld_cpu.pipeline_config(
      teacher_steps=1, student_steps=1, student_demos=0, distill_steps=1, methods=("opd", "sft"), seeds=(0,),
      heldout_games=1, dagger_rounds=2, dagger_student_rounds=1, dagger_games=1, dagger_steps=1, student_copies=True)
  return config_lib.validate(config)


def test_dagger_rounds_train_the_teacher_that_is_evaluated_and_distilled(tmp_path, monkeypatch):
  # Which checkpoint each stage got (the real stages run; these only record their configs).
  evaluated, distilled, trained_from = [], [], {}
  evaluate_stage, train_stage = train.evaluate_stage, train.train

  def evaluate_spy(config, workdir):
    evaluated.append((pathlib.Path(workdir).name, config.student.hf_dir))
    return evaluate_stage(config, workdir)

  def train_spy(config, workdir):
    if config.stage == "distill":
      distilled.append(config.teacher.hf_dir)
    trained_from[pathlib.Path(workdir).relative_to(tmp_path).as_posix()] = config.student.hf_dir
    return train_stage(config, workdir)

  monkeypatch.setattr(train, "evaluate_stage", evaluate_spy)
  monkeypatch.setattr(train, "train", train_spy)
  config = tiny_config()
  pipeline.run(config, tmp_path)

  assert set(results.stage_times(tmp_path)) == {
      "teacher_sft", "dagger_collect/round1", "teacher_dagger/round1", "dagger_collect/round2",
      "teacher_dagger/round2", "dagger_collect/round3", "teacher_dagger/round3", "teacher_eval", "judge_accuracy",
      "student_sft", "student_eval", "opd/seed0", "sft/seed0"}
  rounds = [dagger.round_dir(tmp_path, r) for r in (1, 2, 3)]
  manifests = [json.loads((r / dagger.MANIFEST).read_text()) for r in rounds]
  teachers = [str(writers.export_dir(tmp_path / d)) for d in ("teacher", "teacher_dagger/round1",
                                                                "teacher_dagger/round2", "teacher_dagger/round3")]
  # The teacher's own rounds: each round's policy is the teacher the round before made, at
  # dagger_temperature. The student's round: the warm-started student plays at the rollout
  # temperature, as it will in OPD.
  assert [(m["policy"], m["player"], m["temperature"]) for m in manifests] == [
      (teachers[0], "teacher", config.pipeline.dagger_temperature),
      (teachers[1], "teacher", config.pipeline.dagger_temperature),
      (str(writers.export_dir(tmp_path / "student_sft")), "student", config.sampling.temperature)]
  # Every round trains the latest teacher, on every round's corrections so far (DAgger's
  # aggregate), besides the demonstrations.
  assert [trained_from[f"teacher_dagger/round{r}"] for r in (1, 2, 3)] == teachers[:3]
  counts = [len(demos_lib.read_jsonl(r / demos_lib.DEMOS)) for r in rounds]
  assert min(counts) > 0, counts
  # Each manifest sums what its round played: its games (each round starts where the last stopped, in the
  # split's order), their turns, wins and corrections (one record each, none past the game's turns).
  for r, (folder, manifest) in enumerate(zip(rounds, manifests)):
    games, records = demos_lib.read_jsonl(folder / demos_lib.GAMES), demos_lib.read_jsonl(folder / demos_lib.DEMOS)
    assert (manifest["requested"], manifest["first"], manifest["split"], manifest["expert"]) == (
        1, r, config.env.train_split, envs_base.spec(config.env.name).expert)
    assert (manifest["games"], manifest["won"], manifest["turns"], manifest["corrections"]) == (
        len(games), sum(g["won"] for g in games), sum(g["turns"] for g in games), len(records))
    for game in games:
      mine = [rec for rec in records if rec["task_id"] == game["task_id"]]
      assert game["corrections"] == len(mine) and game["error"] is None and 0 < game["turns"] <= config.env.max_turns
      assert all(len(rec["actions"]) <= game["turns"] and rec["trained"][-1] for rec in mine)
  # The second expert pass: its own seed, no judge examples; every teacher SFT trains on it too.
  second_pass = tmp_path / "demos" / "train_pass2"
  manifest = json.loads((second_pass / demos_lib.MANIFEST).read_text())
  assert (manifest["seed"], manifest["judge_states"], manifest["search_order"]) == (config.seed + 1, 0, "shuffled")
  assert json.loads((tmp_path / "demos" / "train" / demos_lib.MANIFEST).read_text())["judge_states"] == 1
  passed = len(demos_lib.read_jsonl(second_pass / demos_lib.DEMOS))
  assert passed == manifest["games_won"] > 0
  assert writers.read_metrics(tmp_path / "teacher")[0]["sft/extra_demos"] == passed
  assert writers.read_metrics(tmp_path / "student_sft")[0]["sft/extra_demos"] == 0  # The first pass only.
  # pipeline.student_copies: the student's SFT, its warm start and the sft method's, trains on the teacher's
  # copies too (the one demo and its renumbered copy).
  assert [writers.read_metrics(tmp_path / d)[0]["sft/demos"] for d in ("teacher", "student_sft", "runs/sft/seed0")
          ] == [2, 2, 2]
  info = writers.read_metrics(tmp_path / "teacher_dagger" / "round3")[0]
  assert info["sft/extra_demos"] == passed + sum(counts) and info["sft/demos"] > 0
  last_teacher = teachers[3]
  # The last round's teacher is the one evaluated, and the one the method distils from.
  assert ("teacher_eval", last_teacher) in evaluated
  assert distilled == [last_teacher]
  report = (tmp_path / "results" / "results.md").read_text()
  assert (f"then 3 DAgger rounds: {sum(counts[:2]):,} expert corrections at the states it reached in 2 train games "
          f"it played and {counts[2]:,} expert corrections at the states the student reached in 1 train games the "
          f"student played") in report
  # Another workdir from this one's checkpoints with 0 SFT updates: no tokenizer, student or teacher SFT is
  # trained, the given ones are evaluated, and a DAgger round goes on from the given teacher.
  given = tmp_path / "given"
  config.tokenizer_dir = str(tmp_path / "tokenizer")
  config.student.hf_dir = str(writers.export_dir(tmp_path / "student_sft"))
  config.teacher.hf_dir = teachers[1]
  config.pipeline.dagger_rounds, config.pipeline.dagger_student_rounds = 1, 0
  config.pipeline.student_steps = config.pipeline.teacher_steps = 0
  config.pipeline.methods = ("opd",)
  evaluated.clear()
  distilled.clear()
  pipeline.run(config_lib.validate(config), given)

  assert set(results.stage_times(given)) == {
      "dagger_collect/round1", "teacher_dagger/round1", "teacher_eval", "judge_accuracy", "student_eval", "opd/seed0"}
  assert not (given / "tokenizer").exists()
  assert json.loads((dagger.round_dir(given, 1) / dagger.MANIFEST).read_text())["policy"] == teachers[1]
  assert trained_from["given/teacher_dagger/round1"] == teachers[1]
  given_last = str(writers.export_dir(given / "teacher_dagger" / "round1"))
  assert ("teacher_eval", given_last) in evaluated and ("student_eval", config.student.hf_dir) in evaluated
  assert distilled == [given_last] and trained_from["given/runs/opd/seed0"] == config.student.hf_dir
  assert f"Teacher (the given checkpoint `{teachers[1]}`, then 1 DAgger round:" in (
      given / "results" / "results.md").read_text()
  # Resumed with other weights as the teacher (the warm-start student's: the tiny rounds above
  # train at a warm-up learning rate of 0), the workdir's evaluation of the earlier teacher is
  # not taken for theirs.
  config.teacher.hf_dir, config.pipeline.dagger_rounds = config.student.hf_dir, 0
  with pytest.raises(config_lib.ConfigError, match=re.escape(f"teacher.hf_dir: {teachers[1]!r} -> ")):
    pipeline.run(config_lib.validate(config), given)  # The workdir's recorded config names the change first.
  config.allow_changed = "teacher.hf_dir,pipeline.dagger_rounds"
  with pytest.raises(ValueError, match=re.escape(f"{given / 'teacher_eval'} holds the evaluation of {given_last}, "
                                                 f"but this pipeline's checkpoint is {config.student.hf_dir}")):
    pipeline.run(config_lib.validate(config), given)
