"""experiments/control_diagnostics.py's state classes on hand-written pick_and_place_simple admissible lists."""

import pytest

from experiments import control_diagnostics

TASK_ID = "pick_and_place_simple-KeyChain-None-SideTable-322/trial_T0"  # put a keychain in sidetable.
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
  assert control_diagnostics.decisive_state(TASK_ID, actions) == kind
