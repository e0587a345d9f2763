"""Teacher-forced action accuracy of an exported model on expert demonstrations.

Free-running success mixes many failures; this isolates one: given the expert's own
transcript up to turn t, does the model's greedy response at turn t equal the expert's?
Reported per turn and per action verb, whole action and verb alone. It is how the CPU
teacher's failure was found (docs/notes.md): verbs right, object numbers wrong.

  python experiments/teacher_forced.py --hf_dir=workdirs/alfworld_cpu/teacher/hf \
      --tokenizer_dir=workdirs/alfworld_cpu/tokenizer \
      --demos_dir=workdirs/alfworld_cpu/demos/valid_seen --thoughts=subgoal
"""

import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from sage_opd_jax import config as config_lib
from sage_opd_jax import models, prompts, sft_data

_HF_DIR = flags.DEFINE_string("hf_dir", None, "The exported model.", required=True)
_TOKENIZER_DIR = flags.DEFINE_string("tokenizer_dir", None, "Its tokenizer.", required=True)
_DEMOS_DIR = flags.DEFINE_string("demos_dir", None, "A collect_demos folder (demos.jsonl).", required=True)
_LIMIT = flags.DEFINE_integer("limit", 20, "Demonstrations to score (0: all).")
_THOUGHTS = flags.DEFINE_enum("thoughts", "none", config_lib.THOUGHTS,
                              "The expert thoughts the model was trained with.")
_SHOW_ADMISSIBLE = flags.DEFINE_bool("show_admissible", False, "List admissible actions (as config.env).")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "Transcripts are cut to this many tokens.")


def main(argv):
  del argv
  tokenizer = models.load_tokenizer(_TOKENIZER_DIR.value)
  layout = prompts.ChatLayout.from_tokenizer(tokenizer)
  model = models.load_hf_checkpoint(_HF_DIR.value)
  greedy = jax.jit(lambda ids_1xS: jnp.argmax(model(ids_1xS)[0], axis=-1))
  demonstrations = sft_data.read_demonstrations(_DEMOS_DIR.value, _THOUGHTS.value)
  if _LIMIT.value:
    demonstrations = demonstrations[: _LIMIT.value]
  seq_len = _SEQ_LEN.value
  by_turn = collections.defaultdict(list)  # Turn (6 = 6 and later) -> whole-response matches.
  by_verb = collections.defaultdict(lambda: collections.defaultdict(list))  # verb -> {action, verb}.
  for demo in demonstrations:
    segments = sft_data.acting_segments(layout, demo, _SHOW_ADMISSIBLE.value)
    ids, turn_ids = sft_data.tokenize_segments(tokenizer, segments)
    ids, turn_ids = ids[:seq_len], np.asarray(turn_ids[:seq_len])
    pred_S = np.asarray(greedy(jnp.asarray([ids + [int(tokenizer.pad_token_id)] * (seq_len - len(ids))])))
    for t in range(1, int(turn_ids.max(initial=0)) + 1):
      pos = np.nonzero(turn_ids == t)[0]
      if pos[-1] + 1 < len(ids) and turn_ids[pos[-1] + 1] == t:
        continue  # A turn cut by seq_len.
      gold = tokenizer.decode([ids[i] for i in pos])
      guess = tokenizer.decode(pred_S[pos - 1].tolist())  # Position i predicts token i + 1.
      by_turn[min(t, 6)].append(guess == gold)
      gold_action = prompts.parse_action(gold) or ""
      guess_action = prompts.parse_action(guess) or ""
      verb = gold_action.split()[0] if gold_action else "(none)"
      by_verb[verb]["action"].append(guess_action == gold_action)
      by_verb[verb]["verb"].append(guess_action.split()[:1] == [verb])
  report = {
      "demonstrations": len(demonstrations),
      "turn_exact": float(np.mean([m for v in by_turn.values() for m in v])),
      "turn_exact_by_turn": {f"{t}{'+' if t == 6 else ''}": round(float(np.mean(v)), 3)
                             for t, v in sorted(by_turn.items())},
      "by_verb": {verb: {k: f"{sum(v)}/{len(v)}" for k, v in d.items()} for verb, d in sorted(by_verb.items())},
  }
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  app.run(main)
