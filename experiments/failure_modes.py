"""Why a policy lost its ALFWorld pick-and-place games, read off an eval's transcripts.

Success counts games; this sorts the lost ones of pick_and_place_simple by the first thing
that went wrong, so that a change to the teacher's training can aim at the commonest:

- `never saw it`: no observation showed the task's object;
- `walked past it`: an observation showed it, and no take of anything followed;
- `took another object`: the first take was of another object class;
- `took it, lost after`: the task's object was picked up, and the episode still lost.

For the first wrong take it also counts whether the observation it answered showed the task's
object, and the first word of its thought ("find", or "take" under `sft.thoughts=subgoal_take`):
a "take" thought with the object absent is a policy that believes the object is where it is
not. And it measures how well the policy reads the observation, over every state before its
first take where the observation shows objects on or in a receptacle: P(take | the task's object
in view) against P(take | absent) (the expert's are 1 and 0). With `--train_demos` (the train
split's demos.jsonl) the absent states are also split by where the policy stands: at a receptacle
the expert took from in some train game of the same scene (a room the policy may have learned
takes in), or elsewhere. Every other task type is left out. `--config.eval.num_transcripts` must
cover the split (the evaluate stage writes only the first few transcripts by default):

  python -m sage_opd_jax.main --config=configs/alfworld_cpu_pick.py --config.stage=evaluate \\
      --config.student.hf_dir=workdirs/alfworld_cpu_pick/teacher/hf \\
      --config.tokenizer_dir=workdirs/alfworld_cpu_pick/tokenizer --config.student.model.vocab_size=1344 \\
      --config.teacher.model.vocab_size=1344 --config.eval.num_transcripts=48 --workdir=workdirs/teacher_eval_all
  python experiments/failure_modes.py workdirs/teacher_eval_all/transcripts/step0_valid_seen_t0.jsonl \\
      --train_demos=workdirs/alfworld_cpu_pick/demos/train/demos.jsonl
"""

import collections
import json
import re
from typing import Any, Iterable, Iterator, Mapping

from absl import app, flags

from sage_opd_jax.envs import alfworld
from sage_opd_jax.expert_teacher import verb

_TRAIN_DEMOS = flags.DEFINE_string(
    "train_demos", None,
    "The train split's demos.jsonl: also split P(take | absent) by the scene's train take sources.")

CATEGORIES = ("won", "never saw it", "walked past it", "took another object", "took it, lost after")


# The receptacle an observation answers from ("You arrive at drawer 2.", "You open the drawer 2.").
_AT = re.compile(r"(?:You arrive at|You open the|On the) ([a-z]+ \d+)")


def _task_object(episode: Mapping[str, Any]) -> tuple[str, re.Pattern[str]]:
  """The task's object class and a pattern for any instance of it in an observation."""
  obj = alfworld.parse_task_folder(episode["task_id"])["pddl_params"]["object_target"].lower()
  return obj, re.compile(rf"\b{obj} \d+\b")


def decisive_state(task_id: str, actions) -> str | None:
  """Whether a state's admissible actions offer the take or the put that the task needs ('take_here',
  'put_here'), or only others ('take_elsewhere': takes of other objects; 'put_elsewhere': the task's
  object held at a receptacle not of the target's type); None for any other state."""
  params = alfworld.parse_task_folder(task_id)["pddl_params"]
  target, receptacle = params["object_target"].lower(), params["parent_target"].lower()
  takes = [a.split() for a in actions if verb(a) == "take"]
  if takes:
    return "take_here" if any(a[1] == target for a in takes) else "take_elsewhere"
  puts = [a.split() for a in actions if verb(a) == "move" and a.split()[1] == target]  # move X N to Y M.
  if puts:
    return "put_here" if any(a[-2] == receptacle for a in puts) else "put_elsewhere"
  return None


def _states_before_take(episode: Mapping[str, Any]) -> Iterator[tuple[str, bool]]:
  """(observation, the policy took) over the states before its first take whose observation
  shows objects on or in a receptacle."""
  observation = episode["turns"][0]["observation"]
  for turn in episode["turns"]:
    took = (turn["action"] or "").startswith("take ")
    if alfworld.SHOWS_OBJECTS.search(observation):
      yield observation, took
    if took:
      return
    observation = turn["feedback"] or ""


def take_counts(episode: Mapping[str, Any]) -> collections.Counter[tuple[bool, bool]]:
  """(task's object in view, the policy took) -> states, over `_states_before_take`."""
  _, in_view = _task_object(episode)
  return collections.Counter((bool(in_view.search(obs)), took) for obs, took in _states_before_take(episode))


def take_sources(demos: Iterable[Mapping[str, Any]]) -> dict[int, set[str]]:
  """Scene -> the receptacles the expert took an object from in those demos."""
  sources = collections.defaultdict(set)
  for demo in demos:
    takes = (alfworld.TAKE_RE.fullmatch(a) for a in demo["actions"])
    sources[alfworld.parse_task_folder(demo["task_id"])["scene"]].update(m["recep"] for m in takes if m)
  return sources


def absent_take_counts(episode: Mapping[str, Any],
                       sources: Mapping[int, set[str]]) -> collections.Counter[tuple[bool, bool]]:
  """(at one of the scene's train take sources, the policy took) -> states, over the states of
  `_states_before_take` without the task's object in view."""
  _, in_view = _task_object(episode)
  scene_sources = sources.get(alfworld.parse_task_folder(episode["task_id"])["scene"], set())
  return collections.Counter(
      (bool((at := _AT.search(obs)) and at[1] in scene_sources), took)
      for obs, took in _states_before_take(episode) if not in_view.search(obs))


def _rate(counts: Mapping[tuple[bool, bool], int], key: bool) -> str | None:
  states = counts[key, True] + counts[key, False]
  return f"{counts[key, True] / states:.2f} of {states}" if states else None


def failure_mode(episode: Mapping[str, Any]) -> tuple[str, str | None]:
  """One of `CATEGORIES` for a transcript record of a pick_and_place_simple game, and for
  `took another object` "<thought's first word>, object in view|absent" of that take."""
  if episode["won"]:
    return "won", None
  obj, in_view = _task_object(episode)
  seen = False
  last_observation = episode["turns"][0]["observation"]
  for turn in episode["turns"]:
    action = turn["action"] or ""
    if action.startswith("take "):
      if action.split()[1] == obj:
        return "took it, lost after", None
      thought = re.search(r"<think>(\S*)", turn["response"] or "")
      here = "in view" if in_view.search(last_observation) else "absent"
      return "took another object", f"{thought[1] if thought else ''}, object {here}"
    last_observation = turn["feedback"] or ""
    seen = seen or bool(in_view.search(last_observation))
  return ("walked past it" if seen else "never saw it"), None


def main(argv):
  sources = None
  if _TRAIN_DEMOS.value:
    with open(_TRAIN_DEMOS.value) as f:
      sources = take_sources(json.loads(line) for line in f)
  for path in argv[1:]:
    with open(path) as f:
      episodes = [json.loads(line) for line in f]
    picks = [e for e in episodes if e["task_type"] == "pick_and_place_simple"]
    modes = [failure_mode(e) for e in picks]
    counts = collections.Counter(mode for mode, _ in modes)
    wrong_takes = collections.Counter(detail for _, detail in modes if detail)
    takes = sum((take_counts(e) for e in picks), collections.Counter())
    rates = {"P(take | object in view)": _rate(takes, True), "P(take | object absent)": _rate(takes, False)}
    if sources is not None:
      absent = sum((absent_take_counts(e, sources) for e in picks), collections.Counter())
      rates["P(take | absent, at a train take source of the scene)"] = _rate(absent, True)
      rates["P(take | absent, elsewhere)"] = _rate(absent, False)
    print(json.dumps({"transcripts": path, "pick_and_place_simple": len(picks),
                      **{c: counts[c] for c in CATEGORIES}, "wrong takes": dict(wrong_takes), **rates}))


if __name__ == "__main__":
  app.run(main)
