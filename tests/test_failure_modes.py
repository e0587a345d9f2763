"""experiments/failure_modes.py on hand-written pick_and_place_simple transcripts and admissible lists."""

import collections

import pytest

from experiments import failure_modes

TASK_ID = "pick_and_place_simple-Apple-None-CounterTop-1/trial_T0"
START = "You are in the middle of a room. Looking quickly around you, you see a countertop 1, a diningtable 1."


def _episode(steps, won=False):
  """steps: (action, feedback, thought) per turn."""
  turns = [dict(turn=t + 1, observation=START if t == 0 else "", action=a, feedback=f,
                response=f"<think>{thought}</think><action>{a}</action>") for t, (a, f, thought) in enumerate(steps)]
  return dict(task_id=TASK_ID, task_type="pick_and_place_simple", won=won, turns=turns)


def test_a_take_of_another_object_where_the_task_object_is_absent():
  episode = _episode([
      ("go to diningtable 1", "You arrive at diningtable 1. On the diningtable 1, you see a bread 1, and a knife 2.",
       "find apple"),
      ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a apple 3.", "find apple"),
      ("go to fridge 1", "You arrive at fridge 1. The fridge 1 is closed.", "find apple"),
      ("open fridge 1", "You open the fridge 1. The fridge 1 is open. In it, you see a tomato 1.", "find apple"),
      ("take tomato 1 from fridge 1", "You pick up the tomato 1 from the fridge 1.", "find apple"),
      ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a apple 3.", "put apple"),
  ])
  assert failure_modes.failure_mode(episode) == ("took another object", "find, object absent")
  # The closed fridge shows nothing to take; the apple was in view once and walked past; the
  # tomato's take answered an observation without the apple; nothing after the first take counts.
  assert failure_modes.take_counts(episode) == collections.Counter({(False, False): 1, (True, False): 1,
                                                                    (False, True): 1})


def test_a_won_game_and_one_that_walked_past_the_object():
  won = _episode([
      ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a apple 1.", "find apple"),
      ("take apple 1 from countertop 1", "You pick up the apple 1 from the countertop 1.", "find apple"),
  ], won=True)
  assert failure_modes.failure_mode(won) == ("won", None)
  assert failure_modes.take_counts(won) == collections.Counter({(True, True): 1})
  # "pineapple 1" is not an apple: the pattern needs the whole class name.
  walked = _episode([
      ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a pineapple 1.", "find apple"),
      ("go to diningtable 1", "You arrive at diningtable 1. On the diningtable 1, you see a apple 2.", "find apple"),
      ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a pineapple 1.", "find apple"),
  ])
  assert failure_modes.failure_mode(walked) == ("walked past it", None)
  assert failure_modes.take_counts(walked) == collections.Counter({(False, False): 1, (True, False): 1})


def test_absent_takes_split_by_the_scenes_train_take_sources():
  # Scene 1's train games took from the fridge and the countertop; scene 2's from a drawer.
  demos = [dict(task_id="pick_and_place_simple-Tomato-None-Fridge-1/trial_T1", actions=[
               "go to fridge 1", "open fridge 1", "take tomato 1 from fridge 1", "go to countertop 1"]),
           dict(task_id="pick_and_place_simple-Bread-None-Fridge-1/trial_T2", actions=[
               "take bread 2 from countertop 1"]),
           dict(task_id="pick_and_place_simple-Pen-None-Desk-2/trial_T3", actions=["take pen 1 from drawer 1"])]
  sources = failure_modes.take_sources(iter(demos))
  assert sources == {1: {"fridge 1", "countertop 1"}, 2: {"drawer 1"}}
  episode = _episode([
      ("go to diningtable 1", "You arrive at diningtable 1. On the diningtable 1, you see a bread 1.", "find apple"),
      ("go to countertop 1", "You arrive at countertop 1. On the countertop 1, you see a apple 3.", "find apple"),
      ("go to fridge 1", "You arrive at fridge 1. The fridge 1 is closed.", "find apple"),
      ("open fridge 1", "You open the fridge 1. The fridge 1 is open. In it, you see a tomato 1.", "find apple"),
      ("take tomato 1 from fridge 1", "You pick up the tomato 1 from the fridge 1.", "find apple"),
  ])
  # Only the states without the apple count: the dining table (elsewhere, no take) and the open
  # fridge (a take source of scene 1, taken from); the countertop showed the apple.
  assert failure_modes.absent_take_counts(episode, sources) == collections.Counter({(False, False): 1,
                                                                                   (True, True): 1})
  # Where scene 1's train games took only from a drawer, the fridge is elsewhere.
  assert failure_modes.absent_take_counts(episode, {1: {"drawer 1"}}) == collections.Counter({(False, False): 1,
                                                                                             (False, True): 1})


KEYCHAIN_TASK = "pick_and_place_simple-KeyChain-None-SideTable-322/trial_T0"  # put a keychain in sidetable.
AROUND = ["go to dresser 1", "go to sidetable 1", "inventory", "look"]


@pytest.mark.parametrize("actions, kind", [
    # At the dresser, the task's object among others: the take the task needs is offered.
    (AROUND + ["take alarmclock 1 from dresser 1", "take keychain 1 from dresser 1"], "take_here"),
    # Only other objects: a pencil, and a keychain's near name that is not its type.
    (AROUND + ["take pencil 2 from sidetable 2", "take keychainholder 1 from sidetable 2"], "take_elsewhere"),
    # The keychain held at a receptacle of the target's type: the put is offered.
    (AROUND + ["examine sidetable 1", "move keychain 1 to sidetable 1"], "put_here"),
    # Held at a dresser: only a put elsewhere.
    (AROUND + ["move keychain 1 to dresser 1"], "put_elsewhere"),
    # Another object held at the target receptacle (the move after a wrong take, an undo): no decisive state.
    (AROUND + ["move pencil 2 to sidetable 1"], None),
    (AROUND, None),
])
def test_decisive_state(actions, kind):
  assert failure_modes.decisive_state(KEYCHAIN_TASK, actions) == kind
