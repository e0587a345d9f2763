"""The whole pipeline of the paper's comparison, one resumable stage after another.

  1. demos          imitable-expert demonstrations and judge examples (train, and a
                    held-out valid_seen slice for the judge's accuracy);
  2. tokenizer      the given one, else the env's word-level tokenizer (`EnvSpec.tokenizer`):
                    ALFWorld's over every game's names (all splits);
  3. teacher        SFT of the teacher on acting and judging (none for a given teacher with
                    `pipeline.teacher_steps=0`); optionally DAgger rounds (it plays
                    new train games with the env expert shadowing it, and is trained again with
                    the expert's actions where it left them, `dagger.py`); then its evaluation;
  4. student_sft    an SFT warm start of the student on the demos (none with `pipeline.student_steps=0`);
  5. runs           from that same student, each method x seed for the same updates (`sft`: more
                    SFT on the demos, without the teacher);
  6. results        a markdown table, a CSV and plots of what the runs measured (`<workdir>/results/`;
                    the CSV and plots also to `config.pipeline.results_dir` if set).

ScienceWorld (config.env.name="scienceworld") runs the same stages with the same
folders: its demonstrations are the engine's gold paths, and its tokenizer's corpus is
their text plus the engine's object, action and task names (`ScienceWorldEnv.vocabulary_texts`),
since it has no game files to read.

Every stage writes into its own folder under the workdir and is skipped when its output is
complete, so an interrupted pipeline resumes where it stopped (a half-finished training
stage resumes from its last checkpoint). `config.pipeline` sets the budgets.

Given checkpoints are where training starts: `config.tokenizer_dir` replaces the tokenizer stage;
`config.student.hf_dir` is the start of the student's warm start (`pipeline.student_steps` SFT
updates; 0 takes it as it is) and `config.teacher.hf_dir` the start of the teacher's SFT
(`pipeline.teacher_steps`; 0 likewise; DAgger rounds, if any, go on from the result). Both are
still evaluated, so another workdir's (or a released) teacher and student run the comparison
without retraining them (the paper configs: Qwen3 checkpoints and their tokenizer).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pathlib
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections

from sage_opd_jax import config as config_lib
from sage_opd_jax import dagger
from sage_opd_jax import files
from sage_opd_jax import losses
from sage_opd_jax import models
from sage_opd_jax import provenance
from sage_opd_jax import results
from sage_opd_jax import train
from sage_opd_jax import writers
from sage_opd_jax.envs import base as envs_base
from sage_opd_jax.envs import demos as demos_lib

# What a sweep (`pipeline.sweep`: other distill settings, from the same start) shares with the stages it reuses:
# the keys that made their data and models. A sweep that changes one would reuse a start made without it, so its
# stage checks refuse it by name. (The env's keys are the demos manifest's to check.)
SHARED_KEYS = (
    "demos", "sft", "tokenizer_dir", "student.hf_dir", "student.model", "teacher.hf_dir", "teacher.model",
    *(f"pipeline.{key}" for key in (
        "student_steps", "student_demos", "student_copies", "sft_learning_rate", "sft_schedule", "teacher_steps",
        "dagger_rounds", "dagger_student_rounds", "dagger_games", "dagger_steps", "dagger_learning_rate",
        "dagger_temperature", "heldout_split", "heldout_games")),
)


def _derive(config: ml_collections.ConfigDict, **changes: Any) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key `changes` applied, validated."""
  derived = copy.deepcopy(config)
  derived.unlock()
  for key, value in changes.items():
    node = derived
    *parents, leaf = key.split("__")
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise config_lib.ConfigError(f"pipeline: config.{'.'.join(parents + [leaf])} does not exist.")
    node[leaf] = value
  derived.lock()
  return config_lib.validate(derived)


def collect_stage(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """The `collect_demos` stage: `config.demos` games of the expert into `workdir`."""
  return _collect(config, pathlib.Path(workdir), config.demos.split, config.demos.limit)


def _student_data(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The student's SFT data (warm start and the sft method): the demos as collected, unless
  `pipeline.student_copies` gives it sft.renamed_copies and sft.renumbered_copies as the teacher has."""
  return {} if config.pipeline.student_copies else dict(sft__renamed_copies=0, sft__renumbered_copies=0)


def _collect(config, out_dir: pathlib.Path, split: str, limit: int, expert_pass: int = 1) -> dict[str, Any]:
  """Expert pass `expert_pass` of `split` into `out_dir`: the first has judge examples, later ones other seeds."""
  name = config.env.name
  # What the env's expert needs of it (ALFWorld's reads the game's facts; a gold path nothing).
  kwargs = dict(train.env_kwargs(config), **envs_base.spec(name).expert_kwargs, max_turns=config.demos.max_turns)
  result = demos_lib.collect(
      out_dir, split, kwargs, env_name=name, num_workers=config.env.num_workers,
      game_timeout_s=config.demos.game_timeout_s, limit=limit or None,
      judge_states=config.demos.judge_states if expert_pass == 1 else 0, branch=demos_lib.DEFAULT_BRANCH[name],
      seed=config.seed + expert_pass - 1, search_order=config.demos.search_order,
  )
  return result.manifest


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> pathlib.Path:
  """Runs (or resumes) every stage; returns the results folder."""
  root = pathlib.Path(workdir)
  p = config.pipeline
  # A rerun with another config would reuse this one's stages. A sweep's config is its own, recorded
  # beside its runs: it reuses the tokenizer, demos, teacher and student as they are (`shared`).
  provenance.check(config, results.sweep_root(root, p.sweep))
  start = time.time()
  results.code_commit()  # The code this process imported: what the ledger credits every stage to.
  train_demos = root / "demos" / config.demos.split
  heldout_demos = root / "demos" / p.heldout_split
  extra_passes = [root / "demos" / f"{config.demos.split}_pass{k}" for k in range(2, config.demos.passes + 1)]

  def shared(stage_config: ml_collections.ConfigDict, folder: pathlib.Path):
    """The `_stage` record of a stage every sweep shares: recorded and checked whole by the base pipeline; a sweep
    (which changes distill settings) checks only the keys that made the stage's data and models, `SHARED_KEYS`."""
    return (stage_config, folder, SHARED_KEYS if p.sweep else None)

  # Every stage below names the checkpoints it loads; the given ones are kept aside, once checked against the
  # given tokenizer (before the demonstrations, which take hours at paper scale).
  given_student, given_teacher = config.student.hf_dir, config.teacher.hf_dir
  if config.tokenizer_dir:
    train.check_vocabularies(config, models.load_tokenizer(config.tokenizer_dir),
                             [role for role in ("student", "teacher") if config[role].hf_dir])
  # What the stages' configs start from: each sets its own stage, and names the checkpoints it loads
  # (the paper configs' required ones were checked above, with the pipeline's config).
  config = _derive(config, stage="collect_demos", student__hf_dir="", teacher__hf_dir="",
                   **({"required_keys": ()} if "required_keys" in config else {}))
  spec = envs_base.spec(config.env.name)
  config = _derive(config, **{f"env__{key}": value for key, value in spec.resolve(config.env).items()})
  logging.info("[1/6] demonstrations")
  _collect(config, train_demos, config.demos.split, config.demos.limit)
  for k, folder in enumerate(extra_passes, start=2):
    _collect(config, folder, config.demos.split, config.demos.limit, expert_pass=k)
  _collect(config, heldout_demos, p.heldout_split, p.heldout_games)

  logging.info("[2/6] tokenizer")
  tokenizer_dir = config.tokenizer_dir
  if not tokenizer_dir:
    if spec.tokenizer is None:
      raise config_lib.ConfigError(f"pipeline: config.env.name={config.env.name!r} has no tokenizer recipe "
                                   "(EnvSpec.tokenizer): set config.tokenizer_dir.")
    tokenizer_dir = spec.tokenizer(train.env_kwargs(config), root / "tokenizer", [train_demos, heldout_demos])
  vocab_size = results.padded_vocab_size(tokenizer_dir)
  base = _derive(config, tokenizer_dir=str(tokenizer_dir), student__model__vocab_size=vocab_size,
                 teacher__model__vocab_size=vocab_size)

  logging.info("[3/6] student warm start%s", f" (from the given {given_student})" if given_student else "")
  student_dir = root / "student_sft"
  student_hf = given_student  # 0 SFT updates: the given checkpoint as it is (config validation).
  if p.student_steps:
    student_cfg = _derive(
        base, stage="sft", student__hf_dir=given_student, sft__demos_dir=str(train_demos),
        sft__max_demos=p.student_demos, **_student_data(config), train__num_steps=p.student_steps,
        optim__learning_rate=p.sft_learning_rate, optim__schedule=p.sft_schedule, eval__num_episodes=0)
    _stage(root, "student_sft", writers.exported(student_dir), lambda: train.train(student_cfg, student_dir),
           record=shared(student_cfg, student_dir))
    student_hf = str(writers.export_dir(student_dir))
  student_eval = root / "student_eval"  # Step 0 of every method: the start they share.
  _claim_eval_dir(student_eval, student_hf)
  student_eval_cfg = _derive(base, stage="evaluate", student__hf_dir=student_hf)
  _stage(root, "student_eval", bool(writers.rows_with(student_eval, "eval/")),
         lambda: train.evaluate_stage(student_eval_cfg, student_eval), record=shared(student_eval_cfg, student_eval))

  # The env's expert as the teacher (config.teacher.kind='expert', expert_teacher.py): nothing to train or evaluate.
  model_teacher = config.teacher.kind == "model"
  logging.info("[4/6] teacher SFT (acting and judging)%s" if model_teacher else "[4/6] teacher: the env's expert%s",
               f" (from the given {given_teacher})" if given_teacher else "")
  teacher_dir = root / "teacher"
  # The teacher's SFT settings, shared by its first SFT and every DAgger round's.
  teacher_sft = dict(stage="sft", student__model=base.teacher.model, sft__demos_dir=str(train_demos),
                     sft__extra_demos_dirs=tuple(map(str, extra_passes)), sft__judge_examples=True,
                     optim__schedule=p.sft_schedule, eval__num_episodes=0)
  teacher_hf = given_teacher  # 0 SFT updates: the given checkpoint as it is.
  if p.teacher_steps and model_teacher:
    teacher_sft_cfg = _derive(base, **teacher_sft, student__hf_dir=given_teacher, train__num_steps=p.teacher_steps,
                              optim__learning_rate=p.sft_learning_rate)
    _stage(root, "teacher_sft", writers.exported(teacher_dir), lambda: train.train(teacher_sft_cfg, teacher_dir),
           record=shared(teacher_sft_cfg, teacher_dir))
    teacher_hf = str(writers.export_dir(teacher_dir))
  for r in range(1, (p.dagger_rounds + p.dagger_student_rounds) * model_teacher + 1):
    # The teacher's own rounds first; then the student plays, as it will in OPD's rollouts.
    player = "student" if r > p.dagger_rounds else "teacher"
    logging.info("[4/6] teacher DAgger round %d of %d (%d games of the %s)", r,
                 p.dagger_rounds + p.dagger_student_rounds, p.dagger_games, player)
    policy = (_derive(base, student__hf_dir=student_hf) if player == "student"
              else _derive(base, student__model=base.teacher.model, student__hf_dir=teacher_hf))
    temperature = base.sampling.temperature if player == "student" else p.dagger_temperature
    rounds = [dagger.round_dir(root, i) for i in range(1, r + 1)]
    _stage(root, f"dagger_collect/round{r}", dagger.finished(rounds[-1], p.dagger_games), lambda: dagger.collect(
        policy, rounds[-1], (r - 1) * p.dagger_games, p.dagger_games, temperature, player=player),
        record=shared(policy, rounds[-1]))
    teacher_dir = root / "teacher_dagger" / f"round{r}"
    round_cfg = _derive(
        base, **{**teacher_sft, "sft__extra_demos_dirs": (*teacher_sft["sft__extra_demos_dirs"], *map(str, rounds))},
        student__hf_dir=teacher_hf, train__num_steps=p.dagger_steps, optim__learning_rate=p.dagger_learning_rate)
    _stage(root, f"teacher_dagger/round{r}", writers.exported(teacher_dir), lambda: train.train(round_cfg, teacher_dir),
           record=shared(round_cfg, teacher_dir))
    teacher_hf = str(writers.export_dir(teacher_dir))
  teacher_eval = root / "teacher_eval"
  if model_teacher:
    teacher_cfg = _derive(base, stage="evaluate", student__hf_dir=teacher_hf)
    _claim_eval_dir(teacher_eval, teacher_hf)  # Both stages below write there.
    _stage(root, "teacher_eval", bool(writers.rows_with(teacher_eval, "eval/")),
           lambda: train.evaluate_stage(teacher_cfg, teacher_eval), record=shared(teacher_cfg, teacher_eval))
    _stage(root, "judge_accuracy", bool(writers.rows_with(teacher_eval, "judge_eval/")),
           lambda: results.judge_accuracy_stage(teacher_cfg, heldout_demos, teacher_eval),
           record=shared(teacher_cfg, teacher_eval))

  report = _derive(base, teacher__hf_dir=given_teacher)  # The report names a given teacher.
  logging.info("[5/6] methods x seeds%s", f" (sweep {p.sweep!r})" if p.sweep else "")
  runs_root = results.sweep_root(root, p.sweep)
  for method in p.methods:
    for seed in p.seeds:
      run_dir = runs_root / "runs" / method / f"seed{seed}"
      changes = dict(stage="distill", method=method, seed=seed, student__hf_dir=student_hf,
                     teacher__hf_dir=teacher_hf, train__num_steps=p.distill_steps)
      if not losses.variant(method).needs_teacher:  # Off-policy (sft): more SFT from the same start, same updates.
        changes.update(stage="sft", sft__demos_dir=str(train_demos), **_student_data(config))
      stage = "/".join([*([p.sweep] if p.sweep else []), method, f"seed{seed}"])
      run_cfg = _derive(base, **changes)
      _stage(root, stage, writers.exported(run_dir), lambda: train.train(run_cfg, run_dir),
             record=(run_cfg, run_dir, None))
    # A table after every method, so a long pipeline shows what it has so far.
    results.write_results(root, report, results_dir=p.results_dir or None)

  logging.info("[6/6] results")
  out = results.write_results(root, report, results_dir=p.results_dir or None)
  logging.info("Results in %s (%.1f min in this process)", out, (time.time() - start) / 60)
  return out


EVALUATED = "evaluated.json"  # In an eval stage's folder: the checkpoint whose rows it holds.


def _checkpoint_digest(hf_dir: str) -> str:
  """A SHA-256 of a checkpoint's files: the same weights wherever the workdir is copied or moved."""
  digest = hashlib.sha256()
  for path in sorted(pathlib.Path(hf_dir).glob("*.json")) + sorted(pathlib.Path(hf_dir).glob("*.safetensors")):
    digest.update(path.name.encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


def _claim_eval_dir(eval_dir: pathlib.Path, hf_dir: str) -> None:
  """Marks `eval_dir` as the evaluation of the checkpoint `hf_dir`; raises if it holds another's.

  A resumed pipeline whose checkpoint changed (another DAgger round, a given teacher) would
  otherwise report the earlier checkpoint's rows as this one's.
  """
  marker = eval_dir / EVALUATED
  digest = _checkpoint_digest(hf_dir)
  if marker.exists():
    evaluated = json.loads(marker.read_text(encoding="utf-8"))
    if evaluated["sha256"] != digest:
      raise ValueError(f"{eval_dir} holds the evaluation of {evaluated['checkpoint']}, but this pipeline's "
                       f"checkpoint is {hf_dir} (other weights): move {eval_dir} away to evaluate it again.")
    return
  eval_dir.mkdir(parents=True, exist_ok=True)
  files.write_atomically(marker, json.dumps({"checkpoint": hf_dir, "sha256": digest}) + "\n")


def _stage(root: pathlib.Path, name: str, done: bool, fn: Callable[[], Any],
           record: tuple[ml_collections.ConfigDict, pathlib.Path, tuple[str, ...] | None] | None = None) -> None:
  """Runs a stage unless `done`, and records its wall time in the workdir's ledger (also when
  it raises: a crash or Ctrl-C costs time too; a SIGKILL leaves no record).

  `record` is the stage's (config, folder, only): a finished stage is reused only if the config its
  folder recorded matches (`provenance.check`), on the keys `only` names if given (then the record is
  never written); a new one records it.
  """
  if record is not None:
    stage_config, folder, only = record
    provenance.check(stage_config, folder, write=only is None, only=only)
  if done:
    return
  start = time.time()
  try:
    fn()
  except BaseException:
    results.record_stage_time(root, name, time.time() - start, finished=False)
    raise
  results.record_stage_time(root, name, time.time() - start)
  # Each stage compiles its own executables (other models, other shape buckets); kept for the
  # whole pipeline they exhaust the process's memory maps (LLVM "Cannot allocate memory" after
  # ~1.5 h, vm.max_map_count 65530), so a finished stage's compilations are dropped.
  jax.clear_caches()
