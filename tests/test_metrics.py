"""Ranking metrics against hand-computed values."""

import math

import numpy as np

from ilora_jax.metrics import ranking_metrics, target_ranks


def test_ranks_by_hand():
  scores = np.array([[0.1, 0.9, 0.5], [3.0, 1.0, 2.0], [1.0, 1.0, 1.0]])
  target = np.array([2, 0, 1])
  # Row 0: one higher -> 1. Row 1: none -> 0. Row 2: two ties -> half of them -> 1.
  np.testing.assert_array_equal(target_ranks(scores, target), [1, 0, 1])


def test_hr_ndcg_mrr_by_hand():
  ranks = np.array([0, 1, 4, 7])
  m = ranking_metrics(ranks)
  assert m["hr@1"] == 0.25
  assert m["hr@5"] == 0.75
  expected_ndcg = (1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4
  assert math.isclose(m["ndcg@5"], expected_ndcg)
  assert math.isclose(m["mrr"], (1 + 1 / 2 + 1 / 5 + 1 / 8) / 4)
