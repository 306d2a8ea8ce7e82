"""Synthetic sequential-recommendation data with distinct user behaviour patterns.

Users belong to one of `num_groups` groups; each group walks the catalogue in its
own fixed order (a permutation), so the same item is followed by a different next
item depending on the group: a single shared model must infer the group from the
history, which is the situation where one shared adapter suffers negative transfer.
"""

from __future__ import annotations

import numpy as np

from ilora_jax.data import Split
from ilora_jax.errors import UserError

_WORDS = (
  "Amber",
  "Blue",
  "Cedar",
  "Delta",
  "Echo",
  "Fable",
  "Golden",
  "Harbor",
  "Iron",
  "Jade",
  "Kite",
  "Lunar",
  "Maple",
  "Nova",
  "Onyx",
  "Pine",
  "Quartz",
  "River",
  "Solar",
  "Tide",
)


# One common English word per item: with a leading space each is a single token of the
# SmolLM2 / Llama-3-style tokenizers, so a title is one prediction (used by the experiments,
# where a small random Llama must learn the task in minutes).
WORD_TITLES = (
  "apple river stone cloud tiger piano garden rocket castle forest ocean candle mirror silver "
  "anchor bridge desert island jungle ladder lemon marble needle orange pepper planet rabbit "
  "saddle shadow spider thunder tunnel violin wagon window winter yellow zebra basket butter "
  "camera carpet circle cotton dragon engine falcon feather finger flower guitar hammer helmet "
  "hunter jacket kettle kitten lizard magnet monkey parrot pencil pillow pirate pocket potato "
  "puzzle salmon school shovel sister spoon square summer sword table tomato turtle valley "
  "wallet horse house money music paper party phone power queen radio sugar train water world "
  "night light heart earth"
).split()


def titles(num_items: int, kind: str = "numbered") -> dict[int, str]:
  """Distinct titles: `numbered` (two words and a number) or `words` (one word per item)."""
  if kind == "words":
    if num_items > len(WORD_TITLES):
      raise UserError(
        f"data.synthetic.titles=words has {len(WORD_TITLES)} titles, fewer than "
        f"data.synthetic.num_items={num_items}; use titles=numbered"
      )
    return dict(enumerate(WORD_TITLES[:num_items]))
  if kind != "numbered":
    raise UserError(f"data.synthetic.titles={kind!r} is unknown: numbered or words")
  n = len(_WORDS)
  return {i: f"{_WORDS[i % n]} {_WORDS[(i // n) % n]} {i}" for i in range(num_items)}


def generate(
  num_items: int,
  num_users: int,
  num_groups: int,
  seq_len: int,
  max_len: int,
  noise: float,
  seed: int,
) -> tuple[Split, Split, Split]:
  """Returns train, val and test splits; each row's `group` is its user's group.

  Users are split 8:1:1; train has one row per position >= 1 of each training user,
  val and test one row per held-out user (`next` = the user's last item).
  """
  rng = np.random.default_rng(seed)
  orders = [rng.permutation(num_items) for _ in range(num_groups)]
  groups = rng.integers(num_groups, size=num_users)
  sequences = []
  for g in groups:
    order = orders[g]
    start = int(rng.integers(num_items))
    seq = [int(order[(start + t) % num_items]) for t in range(seq_len)]
    for t in range(seq_len):
      if rng.random() < noise:
        seq[t] = int(rng.integers(num_items))
    sequences.append(seq)
  users = rng.permutation(num_users)
  n_train, n_val = int(num_users * 0.8), int(num_users * 0.1)
  parts = {
    "train": users[:n_train],
    "val": users[n_train : n_train + n_val],
    "test": users[n_train + n_val :],
  }

  def make(name: str, members) -> Split:
    seqs, lens, nexts, group = [], [], [], []
    for u in members:
      full = sequences[u]
      positions = range(1, seq_len) if name == "train" else [seq_len - 1]
      for i in positions:
        hist = full[max(0, i - max_len) : i]
        seqs.append(hist + [num_items] * (max_len - len(hist)))
        lens.append(len(hist))
        nexts.append(full[i])
        group.append(groups[u])
    return Split(
      name,
      np.array(seqs, np.int32),
      np.array(lens, np.int32),
      np.array(nexts, np.int32),
      np.array(group, np.int32),
    )

  return make("train", parts["train"]), make("val", parts["val"]), make("test", parts["test"])
