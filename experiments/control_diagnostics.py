"""Why a controlled-teacher run (configs/alfworld_control.py) does or does not lift its student.

Three checks on the student's own episodes (docs/results.md, "Controlled teacher"):

- takeover: the student plays train games (at the rollout temperature OPD trains on) with the
  env expert shadowing it; each episode is then replayed up to a turn (after the student left the
  expert's path, a random turn, its last turn) and the expert plays on from that real state for up
  to `--takeover_turns` turns. Its win rate says whether the a* the teacher names off its path
  leads anywhere; also how often a* was missing.
- step: on one such rollout batch, scored by the expert teacher, a step along the OPD loss's
  gradient (plain SGD on the unit-norm direction) and the change of the student's constrained
  log P(a*) at the batch's own states, overall and by the expert's verb: is the update's direction
  right? The same for the exact reverse KL over decoding's support (nu's conditional over the
  trie's children at each action token against the student's renormalised over the same ids), to
  tell the one-sample estimate's noise from the direction of the divergence itself. And the OPD
  loss without the turns whose a* is a `go to`: does their gradient lower the other turns' a*? And
  both objectives under other teachers scoring the same batch (`--variants`, teacher.expert
  overrides, e.g. search=spread+eps_over=verbs), the first also with its go-to turns left out by
  kind (search steps, the others, those where the student took or put instead), and without every
  turn where the student took what the teacher does not prefer.
- logp: the student's constrained log P(a*) at those states, by the expert's verb (its put of the
  task's object apart from its other moves, the undos), for the start and for each `--trained`
  student (e.g. OPD's exported `hf/`): did training move it towards a*?
- takes: how many of the student's takes were of the task's object, and the expert's next verb after
  a take of another (`student_takes`): what the teacher says on the student's own states.
- verb_probability: each student's probability of the take where the task's object can be taken
  (take_here) and where only others can (take_elsewhere), and of the put (a `move` of the task's
  object) at a receptacle of the target's type (put_here) and at another (put_elsewhere), on every
  batch's states: does training teach the student to tell them apart, or only to take and put less?
  With the teacher's own (nu's mass on the verb) and the take probability a student that cannot tell
  those states apart would settle at: the mean of nu under the forward KL, the mean of its log-odds
  under the reverse KL (`shared_take_optimum`).

Also the two-back repeat rate (a turn repeating the action of two turns earlier: walking between
two receptacles) of the student's sampled episodes; an eval transcript's is in its jsonl.

  python -m experiments.control_diagnostics --config=configs/alfworld_control.py:0 \\
      --config.tokenizer_dir=workdirs/alfworld_control/tokenizer \\
      --student=workdirs/alfworld_control/student_sft/hf \\
      --trained=workdirs/alfworld_control/sweeps/eta0/runs/opd/seed0/hf \\
      --variants=search=spread,search=spread+eps_over=verbs

Prints a JSON report; `--out` also writes it.
"""

import collections
import json
import pathlib
import random

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from sage_opd_jax import config as config_lib
from sage_opd_jax.expert_teacher import verb
from sage_opd_jax import judge
from sage_opd_jax import losses
from sage_opd_jax import models
from sage_opd_jax import train
from sage_opd_jax import update as update_lib
from sage_opd_jax.envs import alfworld_expert
from sage_opd_jax.envs import base
from experiments.failure_modes import decisive_state

_CONFIG = config_flags.DEFINE_config_file("config", "configs/alfworld_control.py:0", "The controlled-teacher config.")
_STUDENT = flags.DEFINE_string("student", None, "The start student's exported HF directory.", required=True)
_TRAINED = flags.DEFINE_list("trained", [], "Trained students' HF directories whose log P(a*) to compare.")
_NUM_GAMES = flags.DEFINE_integer("num_games", 16, "Train games the student plays for the takeover check.")
_TAKEOVER_TURNS = flags.DEFINE_integer("takeover_turns", 30, "Turns the expert may play after taking over.")
_SEED = flags.DEFINE_integer("seed", 0, "Draws the games and the takeover turns.")
_TAKEOVER = flags.DEFINE_bool("takeover", True, "Run the takeover check (the env replays are most of its time).")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON report here.")
_BASELINE = flags.DEFINE_bool("baseline", True, "Step along the config's own teacher's objectives.")
_VARIANTS = flags.DEFINE_list("variants", ["search=spread"], "Other teachers to step along, each teacher.expert "
                              "overrides joined by '+' (e.g. search=spread+eps_over=verbs); the first's go-to "
                              "turns are also left out by kind.")


def two_back_repeats(actions_per_episode) -> tuple[int, int]:
  """(turns repeating the action of two turns earlier, turns from the third on)."""
  pairs = [(a[t], a[t - 2]) for a in actions_per_episode for t in range(2, len(a))]
  return sum(x == y for x, y in pairs), len(pairs)


def takeover(env, task, actions, k, max_turns) -> bool:
  """Replays the student's first k actions with the expert shadowing them, then lets the expert play on."""
  observation, info = env.reset(task)
  expert = alfworld_expert.ImitableExpert(task)
  action = expert.first_action(observation, info)
  for t in range(k + max_turns):
    result = env.step(actions[t] if t < k else action)
    if result.done:
      return bool(result.info.won)
    action = expert.next_action(result)
  return False


def astar_batch(played, arrays, teacher, seq_len):
  """Each turn's context in the student's episode followed by the expert's own response (a*), with the
  constrained-decoding support of its action tokens; the verb of each a* ('put' for the task's put, 'move'
  for other moves); and, for its rows at a `decisive_state`, the position of the action's first token (its
  verb), the first token of that state's takes or puts, nu's mass on that verb, and the state's kind."""
  rows, supports, verbs = [], [], []
  decisive = collections.defaultdict(list)
  for b, (episode, beliefs) in enumerate(zip(played.episodes, teacher.beliefs(played.episodes))):
    for t, belief in enumerate(beliefs):
      if belief.peak is None:
        continue
      context = list(arrays["tokens"][b, :np.flatnonzero(arrays["turn_ids"][b] == t + 1)[0]])
      prefix = teacher.response_format(belief.thought)[0]
      response = prefix + teacher.action_tokens([belief.peak])[0]
      if len(context) + len(response) <= seq_len:
        kind = decisive_state(episode.task.task_id, belief.actions)
        if kind is not None:
          wanted = "take" if kind.startswith("take") else "move"
          offered = next(a for a in belief.actions if verb(a) == wanted)
          decisive["row"].append(len(rows))
          decisive["pos"].append(len(context) + len(prefix))
          decisive["verb_id"].append(teacher.action_tokens([offered])[0][0])
          decisive["kind"].append(kind)
          decisive["nu"].append(sum(p for a, p in zip(belief.actions, belief.probs) if verb(a) == wanted))
        rows.append(context + response)
        supports.append([[] for _ in context] + teacher.turn_support(belief, response))
        # A `move` of the task's object to the target's receptacle type is the put; other moves are undos.
        verbs.append("put" if decisive_state(episode.task.task_id, [belief.peak]) == "put_here" else verb(belief.peak))
  width = max(len(ids) for support in supports for ids in support)
  tokens, mask = np.zeros((len(rows), seq_len), np.int32), np.zeros((len(rows), seq_len), np.int32)
  support_BxSxK = np.full((len(rows), seq_len, width), -1, np.int32)
  for i, (row, support) in enumerate(zip(rows, supports)):
    tokens[i, :len(row)], mask[i, :len(row)] = row, 1
    for s, ids in enumerate(support):
      support_BxSxK[i, s, :len(ids)] = ids
  batch = dict(tokens=tokens, attention_mask=mask, student_support=support_BxSxK)
  return ({k: jnp.asarray(v) for k, v in batch.items()}, np.asarray(verbs),
          {k: np.asarray(v) for k, v in decisive.items()})


def verb_probability(model, batch, decisive) -> np.ndarray:
  """[decisive rows] the student's constrained probability of the state's take (or put) verb: its policy at
  the action's first token, renormalised over the verbs decoding offers there."""
  if not len(decisive.get("row", ())):
    return np.zeros((0,))
  logits_RxV = update_lib.student_logits(model, batch)[decisive["row"], decisive["pos"] - 1]
  support_RxK = batch["student_support"][decisive["row"], decisive["pos"]]
  picked_RxK = jnp.take_along_axis(logits_RxV, jnp.maximum(support_RxK, 0), axis=-1)
  logp_RxK = jax.nn.log_softmax(jnp.where(support_RxK >= 0, picked_RxK, -1e9), axis=-1)
  return np.asarray(jnp.sum(jnp.where(support_RxK == decisive["verb_id"][:, None], jnp.exp(logp_RxK), 0.0), axis=-1))


def by_kind(p, kinds) -> dict[str, list[float]]:
  """Per decisive kind: [states, mean verb probability]."""
  return {k: [int((kinds == k).sum()), round(float(p[kinds == k].mean()), 3)] for k in sorted(set(kinds))}


def astar_logprob(model, batch) -> np.ndarray:
  """[rows] the student's constrained log P(a*): its renormalised log-probs summed over a*'s action tokens."""
  logp_BxS = losses.token_logprobs(update_lib.student_logits(model, batch), batch["tokens"], batch["student_support"])
  return np.asarray(jnp.sum(jnp.where(batch["student_support"][..., 0] >= 0, logp_BxS, 0.0), axis=1))


def support_teacher_logprobs(played, arrays, teacher) -> np.ndarray:
  """[B, S, K] log nu of each id of `student_support` given the action's earlier tokens
  (`ExpertTeacher.turn_support_logprobs`; -inf where none is listed)."""
  support_BxSxK = arrays["student_support"]
  lognu_BxSxK = np.full(support_BxSxK.shape, -np.inf, np.float32)
  for b, (episode, beliefs) in enumerate(zip(played.episodes, teacher.beliefs(played.episodes))):
    for t, (turn, belief) in enumerate(zip(episode.turns, beliefs)):
      where = np.flatnonzero(arrays["turn_ids"][b] == t + 1)
      response = list(turn.response_tokens)
      support = teacher.turn_support(belief, response)
      for s, values in zip(where, teacher.turn_support_logprobs(belief, support, response)):
        lognu_BxSxK[b, s, :len(values)] = values
  return lognu_BxSxK


def exact_support_kl(model, batch, lognu_BxSxK) -> jax.Array:
  """Token mean over response tokens of KL(pi_c || nu) at each action token with a choice, pi_c the student's
  policy renormalised over decoding's support (a support id nu gives no mass costs pi_c * 20 nats)."""
  support_BxSxK = batch["student_support"]
  logits_BxSxV = jnp.roll(update_lib.student_logits(model, batch), 1, axis=1)  # Entry s predicts token s.
  valid_BxSxK = support_BxSxK >= 0
  picked_BxSxK = jnp.take_along_axis(logits_BxSxV, jnp.maximum(support_BxSxK, 0), axis=-1)
  logpi_BxSxK = jax.nn.log_softmax(jnp.where(valid_BxSxK, picked_BxSxK, -1e9), axis=-1)
  known_BxSxK = jnp.isfinite(lognu_BxSxK)
  gap_BxSxK = jnp.where(known_BxSxK, logpi_BxSxK - jnp.where(known_BxSxK, lognu_BxSxK, 0.0), 20.0)
  choice_BxS = support_BxSxK[..., 1] >= 0
  kl = jnp.where(valid_BxSxK & choice_BxS[..., None], jnp.exp(logpi_BxSxK) * gap_BxSxK, 0.0)
  return jnp.sum(kl) / jnp.sum(batch["turn_ids"] > 0)


def without_turns(played, arrays, teacher, leave_out) -> np.ndarray:
  """[B, S] the batch's turn_ids with every turn (and its tokens) where `leave_out(turn, belief)` left out."""
  turn_ids_BxS = np.array(arrays["turn_ids"])
  for b, (episode, beliefs) in enumerate(zip(played.episodes, teacher.beliefs(played.episodes))):
    for t, (turn, belief) in enumerate(zip(episode.turns, beliefs)):
      if belief.peak is not None and leave_out(turn, belief):
        turn_ids_BxS[b, turn_ids_BxS[b] == t + 1] = 0
  return turn_ids_BxS


def by_verb(logp, verbs) -> dict[str, list[float]]:
  return {v: [int((verbs == v).sum()), round(float(logp[verbs == v].mean()), 3)] for v in sorted(set(verbs))}


def main(argv):
  del argv
  config = _CONFIG.value
  config.stage, config.method = "distill", "opd"
  config.student.hf_dir = _STUDENT.value
  config = config_lib.validate(config)
  tokenizer = models.load_tokenizer(config.tokenizer_dir)
  teacher = train.load_teacher(config, tokenizer, None)
  student = train.load_model(config.student, None, config.seed)
  rng = random.Random(_SEED.value)
  env = base.make(config.env.name, **{**train.env_kwargs(config), "facts": True,
                                      "max_turns": config.env.max_turns + _TAKEOVER_TURNS.value})
  tasks = rng.sample(list(env.tasks(config.env.train_split)), _NUM_GAMES.value)
  seq_len, size = config.train.max_seq_len, config.train.batch_episodes
  report = {"student": _STUDENT.value, "games": len(tasks)}
  with train.make_rollout_engine(config, tokenizer) as engine:
    batches = []
    for start in range(0, len(tasks), size):
      played = engine.run(student, tasks[start:start + size], jax.random.PRNGKey(_SEED.value + start), seq_len=seq_len)
      arrays = played.arrays()
      arrays.update(teacher.score(played.episodes, arrays))
      batches.append((played, arrays))
  episodes = [e for played, _ in batches for e in played.episodes]
  turns = [t for e in episodes for t in e.turns]
  report["turns"] = len(turns)
  search = [len(t.expert_search) for t in turns if len(t.expert_search) > 1]
  report["search_turns"] = [len(search), round(float(np.mean(search)), 2) if search else 0.0]
  report["expert_missing"] = sum(t.expert_action is None for t in turns)
  report["student_won"] = sum(e.won for e in episodes)
  report["two_back_repeats"] = two_back_repeats([[t.action for t in e.turns] for e in episodes])
  same = lambda t: t.action is not None and t.expert_action is not None and judge.same_action(t.action, t.expert_action)
  played_astar = collections.defaultdict(lambda: [0, 0])
  for t in turns:
    if t.expert_action is not None:
      played_astar[verb(t.expert_action)][0] += same(t)
      played_astar[verb(t.expert_action)][1] += 1
  report["student_played_astar_by_verb"] = dict(played_astar)
  # Which objects the student takes, and what the expert names next after a take of another object.
  takes = collections.Counter()
  for episode in episodes:
    target = alfworld_expert.task_params(episode.task)["object_target"]
    for turn, later in zip(episode.turns, [*episode.turns[1:], None]):
      if verb(turn.action) == "take":
        right = turn.action.split()[1] == target.lower()
        takes["task_object" if right else "other_object"] += 1
        if not right and later is not None and later.expert_action is not None:
          takes[f"then_expert_{verb(later.expert_action)}"] += 1
  report["student_takes"] = dict(takes)

  # Takeover: the expert plays on from the student's real states.
  wins = collections.defaultdict(list)
  for episode in episodes if _TAKEOVER.value else ():
    actions = [t.action for t in episode.turns]
    left = next((k for k, t in enumerate(episode.turns) if not same(t)), len(actions))
    for name, k in (("start", 0), ("after_leaving", min(left + 1, len(actions))),
                    ("random_turn", rng.randrange(1, len(actions) + 1)), ("last_turn", len(actions))):
      wins[name].append(takeover(env, episode.task, actions, k, _TAKEOVER_TURNS.value))
  env.close()
  report["takeover_won"] = {name: [int(sum(w)), len(w)] for name, w in wins.items()}

  students = {"start": student}
  for hf_dir in _TRAINED.value:
    with config.unlocked():
      config.student.hf_dir = hf_dir
    students[hf_dir] = train.load_model(config.student, None, config.seed)
  # Does each student tell the states where the task's take (or put) is offered from those where only others
  # are? Its probability of the verb there, on every batch's states.
  built = [astar_batch(played, arrays, teacher, seq_len) for played, arrays in batches]
  decisive = [(astar, found) for astar, _, found in built]
  kinds = np.concatenate([d.get("kind", np.zeros((0,), str)) for _, d in decisive])
  report["verb_probability"] = {
      name: by_kind(np.concatenate([verb_probability(model, b, d) for b, d in decisive]), kinds)
      for name, model in students.items()}
  # The teacher's, and the best a student can do that gives every state offering a take one shared take
  # probability: under the forward KL the mean of nu's, under the reverse KL the mean of their log-odds.
  nu = np.concatenate([d.get("nu", np.zeros((0,))) for _, d in decisive])
  report["verb_probability"]["teacher"] = by_kind(nu, kinds)
  offered = np.isin(kinds, ("take_here", "take_elsewhere"))
  logit = np.log(nu[offered]) - np.log1p(-nu[offered])
  report["shared_take_optimum"] = {"forward_kl": round(float(nu[offered].mean()), 3),
                                   "reverse_kl": round(float(1 / (1 + np.exp(-logit.mean()))), 3)}
  # The update's direction, and log P(a*) by verb, on the first batch's states.
  played, arrays = batches[0]
  astar, verbs, _ = built[0]
  before = astar_logprob(student, astar)
  for name, model in students.items():
    logp = before if name == "start" else astar_logprob(model, astar)
    report.setdefault("logp_astar", {})[name] = {"all": round(float(logp.mean()), 3), **by_verb(logp, verbs)}
  loss_fn, totals_fn = update_lib.make_loss_fns(train.loss_options(config, "opd", config.env.max_turns))
  batch = {k: jnp.asarray(arrays[k]) for k in update_lib.loss_keys(arrays)}
  totals = totals_fn(batch)
  lognu_BxSxK = jnp.asarray(support_teacher_logprobs(played, arrays, teacher))
  # The same loss with the turns whose a* is a `go to` left out: does their gradient lower the others' a*?
  no_go = dict(batch, turn_ids=jnp.asarray(without_turns(played, arrays, teacher, lambda t, b: verb(b.peak) == "go")))
  no_go_totals = totals_fn(no_go)
  params = nnx.state(student, nnx.Param)
  objectives = {"opd_loss": lambda m: loss_fn(m, batch, totals)[0],
                "opd_loss_without_go_to": lambda m: loss_fn(m, no_go, no_go_totals)[0],
                "exact_support_kl": lambda m: exact_support_kl(m, batch, lognu_BxSxK)}
  if not _BASELINE.value:
    objectives = {}
  for v, variant in enumerate(_VARIANTS.value):
    name = variant.replace("=", "_").replace("+", "_")
    variant_config = config.copy_and_resolve_references()
    for key, value in (kv.split("=") for kv in variant.split("+")):
      variant_config.teacher.expert[key] = type(config.teacher.expert[key])(value)
    spread_teacher = train.load_teacher(variant_config, tokenizer, None)
    spread = dict(arrays, **spread_teacher.score(played.episodes, arrays))
    spread_batch = {k: jnp.asarray(spread[k]) for k in update_lib.loss_keys(spread)}
    spread_lognu_BxSxK = jnp.asarray(support_teacher_logprobs(played, spread, spread_teacher))
    objectives[f"opd_loss_{name}"] = (lambda m, b=spread_batch, bt=totals_fn(spread_batch): loss_fn(m, b, bt)[0])
    objectives[f"exact_support_kl_{name}"] = (
        lambda m, b=spread_batch, nu=spread_lognu_BxSxK: exact_support_kl(m, b, nu))
    if v:
      continue
    # Which go-to turns' gradient lowers the take and the put: the search steps, or the others (the expert
    # walking to a seen object, to the target receptacle, back with a wrong object)? And among the go-to turns,
    # those where the student took or put something instead?
    go_to_kinds = {"search_go_to": lambda t, b: verb(b.peak) == "go" and len(t.expert_search) > 1,
                   "other_go_to": lambda t, b: verb(b.peak) == "go" and len(t.expert_search) <= 1,
                   "go_to_where_student_took_or_put": lambda t, b: verb(b.peak) == "go" and verb(t.action) in
                   ("take", "move"),
                   "any_turn_where_student_took_what_the_teacher_does_not_prefer":
                   lambda t, b: verb(t.action) == "take" and not b.prefers(t.action)}
    report["go_to_turns_student_verbs"] = {}
    for kind, leave_out in go_to_kinds.items():
      chosen = [verb(t.action) for e, bs in zip(played.episodes, spread_teacher.beliefs(played.episodes))
                for t, b in zip(e.turns, bs) if leave_out(t, b)]
      report["go_to_turns_student_verbs"][kind] = dict(collections.Counter(chosen))
      kept = dict(spread_batch, turn_ids=jnp.asarray(without_turns(played, spread, spread_teacher, leave_out)))
      objectives[f"opd_loss_{name}_without_{kind}"] = (
          lambda m, kept=kept, kept_totals=totals_fn(kept): loss_fn(m, kept, kept_totals)[0])
  report["step"] = {}
  for name, objective in objectives.items():
    grads = nnx.state(nnx.grad(objective)(student), nnx.Param)
    norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
    report["step"][name] = {"grad_norm": round(norm, 4)}
    for step in (0.01, 0.1):
      moved = nnx.merge(nnx.graphdef(student), jax.tree.map(lambda p, g, s=step, n=norm: p - s * g / n, params, grads))
      change = astar_logprob(moved, astar) - before
      report["step"][name][str(step)] = {"all": round(float(change.mean()), 4), "up": int((change > 0).sum()),
                                         "down": int((change < 0).sum()), **by_verb(change, verbs)}
  print(json.dumps(report, indent=1))
  if _OUT.value:
    pathlib.Path(_OUT.value).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
  app.run(main)
