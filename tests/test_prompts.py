"""Hybrid prompts: placeholder positions, the loss mask and padding, with a toy tokenizer."""

import numpy as np

from ilora_jax import prompts

TITLES = {0: "Heat", 1: "Alien", 2: "Fargo", 3: "Brazil", 4: "Ran"}
SPECIAL = {prompts.PLACEHOLDER: 1000, prompts.HISTORY: 1001, prompts.CANDIDATE: 1002}


def _encode(text):
  """Toy tokenizer: one id per character (independent of the code under test)."""
  return [ord(c) for c in text]


def _builder():
  return prompts.PromptBuilder(
    _encode, SPECIAL, pad_id=0, titles=TITLES, n_items=5, dataset="movielens", bos_id=1
  )


def test_loss_mask_covers_exactly_the_target_text():
  b = _builder().batch([([0, 1], [2, 3, 4], 3)], template=0, hybrid=True)
  ids, loss = b.input_ids[0], b.loss_mask[0]
  target = "".join(chr(i) for i in ids[loss == 1])
  assert target == " Brazil\n"
  # The target is the last real text: nothing after it but padding.
  last = np.flatnonzero(b.attention[0])[-1]
  assert np.flatnonzero(loss)[-1] == last


def test_placeholders_carry_history_then_candidates_in_order():
  b = _builder().batch([([0, 1], [2, 3, 4], 3)], template=1, hybrid=True)
  ids, items = b.input_ids[0], b.item_ids[0]
  hist = np.flatnonzero(ids == SPECIAL[prompts.HISTORY])
  cans = np.flatnonzero(ids == SPECIAL[prompts.CANDIDATE])
  assert items[hist].tolist() == [0, 1]
  assert items[cans].tolist() == [2, 3, 4]
  assert np.all(items[(ids != 1001) & (ids != 1002)] == 5)
  text = "".join(chr(i) if i < 1000 else "#" for i in ids[b.attention[0] == 1][1:])
  assert "Heat #, Alien #" in text and "Fargo #, Brazil #, Ran #" in text


def test_text_only_form_replaces_nothing():
  b = _builder().batch([([0, 1], [2, 3, 4], None)], template=2, hybrid=False)
  assert np.all(b.item_ids == 5)
  assert (b.input_ids == SPECIAL[prompts.PLACEHOLDER]).sum() == 5
  assert b.loss_mask.sum() == 0


def test_padding_sides_and_bucketed_length():
  rows = [([0], [2, 3], None), ([0, 1, 4], [2, 3], None)]
  right = _builder().batch(rows, template=0, hybrid=True, multiple_of=64)
  left = _builder().batch(rows, template=0, hybrid=True, pad_left=True, multiple_of=64)
  assert right.input_ids.shape[1] % 64 == 0 and left.input_ids.shape == right.input_ids.shape
  n0 = int(right.attention[0].sum())
  assert right.attention[0, :n0].all() and not right.attention[0, n0:].any()
  assert left.attention[0, -n0:].all() and not left.attention[0, :-n0].any()
  np.testing.assert_array_equal(left.input_ids[0, -n0:], right.input_ids[0, :n0])
  np.testing.assert_array_equal(left.item_ids[0, -n0:], right.item_ids[0, :n0])


def test_every_dataset_has_three_templates_with_both_slots():
  for name, templates in prompts.TEMPLATES.items():
    assert len(templates) == 3, name
    for t in templates:
      assert t.count("[HistoryHere]") == 1 and t.count("[CansHere]") == 1


def test_titles_and_answers_are_encoded_once_per_item():
  """Setup encodes every answer (for the loss's target slots) and batches encode them again:
  the builder keeps each item's tokens, and a caller's edit of a returned list changes nothing."""
  calls = []
  builder = prompts.PromptBuilder(
    lambda text: calls.append(text) or _encode(text), SPECIAL, pad_id=0, titles=TITLES,
    n_items=5, dataset="movielens", bos_id=1,
  )  # fmt: skip
  setup = len(calls)
  answer = builder.target_tokens(3)
  assert "".join(map(chr, answer)) == " Brazil\n"
  answer.append(0)
  for _ in range(3):
    builder.batch([([0, 1], [2, 3, 4], 3)], template=0, hybrid=True)
  assert builder.target_tokens(3) == _encode(" Brazil\n")
  encoded = calls[setup:]
  assert encoded.count(" Brazil\n") == 1 and encoded.count(" Heat") == 1
