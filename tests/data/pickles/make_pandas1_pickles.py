"""Writes the pandas 1.x fixtures of this folder: run it with a pandas 1.x (see README.md).

Small LLaRA-like frames (columns seq, len_seq, next) as pandas 1.x pickled them: a filtered
frame keeps an Int64Index, a reset one a RangeIndex; MovieLens-like rows hold (id, rating)
pairs of numpy integers. Each file is named after the pandas that wrote it.
"""

import os
import sys

import numpy as np
import pandas as pd


def frames():
  pad = 9
  lastfm = pd.DataFrame(
    {
      "seq": [[1, 2, 3, pad], [2, 3, 4, 5], [5, 6, pad, pad], [1, 1, 1, pad]],
      "len_seq": [3, 4, 2, 3],
      "next": [4, 6, 7, 2],
    }
  )
  pairs = [(np.int64(i), np.int64(r)) for i, r in [(1, 4), (2, 5), (3, 3), (4, 5), (5, 1)]]
  movielens = pd.DataFrame(
    {
      "seq": [pairs[:2], pairs[1:4], pairs[3:4], pairs[:3]],
      "len_seq": [2, 3, 1, 3],
      "next": [pairs[2], pairs[4], pairs[0], pairs[3]],
    }
  )
  return {
    "lastfm_filtered": lastfm[lastfm["len_seq"] > 2],  # Int64Index [0, 1, 3].
    "movielens_filtered": movielens[movielens["len_seq"] > 1],
    "steam_range": lastfm[lastfm["len_seq"] > 2].reset_index(drop=True),  # RangeIndex.
    "uint64_index": lastfm.set_index(pd.Index(np.arange(4, dtype=np.uint64) * 2)),
    "float64_index": lastfm.set_index(pd.Index([0.5, 1.5, 2.5, 3.5])),
  }


def main(folder):
  for case, frame in frames().items():
    frame.to_pickle(os.path.join(folder, f"pandas{pd.__version__}_{case}.df"))


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.abspath(__file__)))
