"""Recommend the next items for a history with a trained iLoRA run.

  python -m ilora_jax.recommend --workdir=W --history="Toy Story (1995)|Heat|#49" [--k=5]
      [--candidates="title|title|..."]

The run's settings come from `W/config.json` (written by every run). The history (oldest
first) and the candidates are entries joined by `|` (write `\\|` for a `|` inside a title):

  - `#N` is item id N (the data's ids, as the output's second column shows them);
  - `title:T` is the title T, whatever it looks like (`title:311`);
  - any other entry is a title (case-insensitive; a trailing ` (yyyy)` may be given or left
    out, as MovieLens titles are stored without it; a year given must be the movie's, and on
    data whose titles carry no year it must be the title's own), except that an entry of
    digits only is the item id N when N is an id; when it is both an id and the title of
    another item (LastFM's "311") it is an error naming both readings: write `#311` or
    `title:311`.

A title shared by several items (MovieLens's two "Cape Fear") is an error listing their ids:
give the id instead (or, on MovieLens, the title with its year). Without candidates, the frozen
SASRec retrieves `num_candidates` items outside the history and the adapted LLM re-ranks them
by the log-likelihood of each title after the hybrid prompt (the scoring evaluation's method).
The prompt lists the candidates in the order given (retrieved ones in SASRec's order), and
the scores depend on that order; the prompt is written in the run's `ilora.eval_template`
(template 0 where the run drew one per row). A history longer than the run's `data.max_len`
is read by its last `max_len` items (SASRec retrieves items outside the whole history); a
history of every item (nothing left to retrieve) is an error.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import json
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np

from ilora_jax.data import YEAR_SUFFIX, article_first
from ilora_jax.errors import HELP_FLAGS, UserError, cli_main, counted, parse_flags, print_help
from ilora_jax.files import checkpoint_folder

TITLE_PREFIX = "title:"  # `title:T`: T is a title, even when it looks like an id.
_ID = re.compile(r"#([0-9]+)")  # `#N`: item id N.
_DIGITS = re.compile(r"[0-9]+")  # A bare entry of ASCII digits: an id when N is one.
_SEPARATOR = re.compile(r"(?<!\\)\|")  # `|` joins entries; `\|` is a `|` inside one.
# Top-level sections of config.json that restoring an ilora run reads, and the keys of them
# this module reads itself.
_SECTIONS = ("data", "train", "sasrec", "ilora", "lora", "router", "llm", "checkpoint", "mesh")
_KEYS = (("data", "name"), ("data", "max_len"), ("data", "num_candidates"),
         ("checkpoint", "max_to_keep"))  # fmt: skip


def run_folder(workdir) -> str:
  """`workdir` as a path string; one that is no path, blank or a file is a UserError."""
  given = workdir
  workdir = os.fspath(workdir) if isinstance(workdir, os.PathLike) else workdir
  if not isinstance(workdir, str):
    raise UserError(f"workdir={given!r} is a {type(given).__name__}: give the run's folder")
  if not workdir.strip():
    raise UserError(f"the workdir {workdir!r} is blank: give the run's folder")
  if os.path.isfile(workdir):
    raise UserError(f"{workdir} is a file, not a run's folder")
  return workdir


def load_run_config(workdir: str):
  """The ConfigDict of the run in `workdir` (its `config.json`); a missing, unreadable or
  foreign file is a UserError naming it."""
  from ml_collections import ConfigDict

  workdir = run_folder(workdir)
  path = os.path.join(workdir, "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      raw = json.load(f)
  except FileNotFoundError:
    raise UserError(f"{path} not found: is {workdir} the workdir of an ilora run?") from None
  except json.JSONDecodeError as exc:
    raise UserError(
      f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}): "
      "the run's config file is damaged"
    ) from None
  except UnicodeDecodeError:
    raise UserError(f"{path} is not valid JSON (not UTF-8 text): the run's config file is "
                    "damaged") from None  # fmt: skip
  except OSError as exc:
    raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
  if not isinstance(raw, dict):
    raise UserError(
      f"{path} holds a JSON {type(raw).__name__}, not an object: it is not the config of an "
      "ilora run"
    )
  sections = [s for s in _SECTIONS if not isinstance(raw.get(s), dict)]
  keys = [".".join(k) for k in _KEYS if k[0] not in sections and k[1] not in raw[k[0]]]
  if sections or keys:
    lacks = [f"the section(s) {', '.join(sections)}"] if sections else []
    lacks += [f"the key(s) {', '.join(keys)}"] if keys else []
    raise UserError(
      f"{path} lacks {' and '.join(lacks)}: it is not the config of an ilora run, or was "
      "written by incompatible code"
    )
  config = ConfigDict(raw)
  from ilora_jax import configuration

  data = config.get("data")
  if isinstance(data, ConfigDict) and data.get("name") == "synthetic" and data.get("dir"):
    data.dir = ""  # Saved before such a data.dir was refused: generated data never read it.

  try:  # The checks of a config file, on the values the run wrote (or someone edited).
    configuration.validate(config)
  except UserError as exc:
    raise UserError(f"{path}: {exc}") from None
  except TypeError as exc:  # A value of the wrong type: compared or used as a number, say.
    raise UserError(
      f"{path} holds a value of the wrong type ({exc}): the run's config file was edited or damaged"
    ) from None
  except (KeyError, AttributeError):  # A run saved before a setting existed: not checked.
    pass
  return config


def titles_with_years(config, workdir: str) -> dict[int, str]:
  """Item id -> title as MovieLens's `u.item` writes it, with the year that `load_titles`
  strips (so that "Cape Fear (1991)" tells the two "Cape Fear" apart); {} for data sets whose
  titles file is not a `u.item`, or when it cannot be read (the run's titles still apply)."""
  from ilora_jax import data

  if config.data.get("name") == "synthetic":
    return {}
  try:  # The titles file `data.load_from_config` reads, read again with the years.
    path = data.titles_file(config.data, data.data_dir(config, workdir))
    if not os.path.basename(path).startswith("u.item"):
      return {}
    return data.load_titles(path, keep_years=True)
  except UserError:
    return {}


def split_entries(text: str) -> list[str]:
  """`a|b|c` -> its non-blank entries; `\\|` is a `|` inside an entry."""
  parts = (p.replace("\\|", "|") for p in _SEPARATOR.split(text))
  return [p for p in parts if p.strip()]


def _key(text: str) -> str:
  """Case, spacing and Unicode form (NFC: a title typed in decomposed form) ignored."""
  return " ".join(unicodedata.normalize("NFC", text).split()).lower()


def _bare_key(text: str) -> str:
  """The key of a title without its trailing ` (yyyy)`, as `data.load_titles` strips it."""
  return _key(YEAR_SUFFIX.sub("", text))


class _Titles:
  """Lookups of titles: exact (case-insensitive) first, then without a year suffix."""

  def __init__(self, titles: dict[int, str], full_titles: dict[int, str] | None):
    self.titles = titles
    self.full = {i: t for i, t in (full_titles or {}).items() if i in titles}
    self.exact: dict[str, list[int]] = {}
    self.bare: dict[str, list[int]] = {}
    for item in sorted(titles):
      full = self.full.get(item, titles[item])
      # The run's title, u.item's ("Usual Suspects, The (1995)") and that with the article
      # first, as the run may write it ("The Usual Suspects (1995)").
      for title in dict.fromkeys((titles[item], full, article_first(full))):
        for index, key in ((self.exact, _key(title)), (self.bare, _bare_key(title))):
          if item not in index.setdefault(key, []):
            index[key].append(item)

  def shown(self, item: int) -> str:
    return f"{item} {self.full.get(item, self.titles[item])!r}"

  def matches(self, title: str) -> list[int]:
    exact = self.exact.get(_key(title))
    if exact or YEAR_SUFFIX.search(title):  # A year given must be the title's own.
      return exact or []
    return self.bare.get(_bare_key(title), [])

  def by_title(self, title: str, what: str) -> int:
    if not title:
      raise UserError(f"empty {what} title after {TITLE_PREFIX!r}")
    items = self.matches(title)
    if len(items) == 1:
      return items[0]
    if items:
      listed = ", ".join(self.shown(i) for i in items[:10])
      more = f" and {len(items) - 10} more" if len(items) > 10 else ""
      raise UserError(
        f"ambiguous {what} title {title!r}: items {listed}{more} have it; give the id "
        f"instead, e.g. '#{items[0]}'"
      )
    pool = {_key(t): (i, t) for i, t in (self.full or self.titles).items()}
    query = title if self.full else YEAR_SUFFIX.sub("", title)
    close = difflib.get_close_matches(_key(query), list(pool), n=3, cutoff=0.5)
    hint = f"; close matches: {' | '.join(_typable(*pool[c]) for c in close)}" if close else ""
    year = YEAR_SUFFIX.search(title)
    yearless = [i for i in self.bare.get(_bare_key(title), []) if i not in self.full
                and not YEAR_SUFFIX.search(self.titles[i])]  # fmt: skip
    if year and yearless:  # "Heat (1995)" where the data's "Heat" has no year.
      named = self.titles[yearless[0]]
      hint += f"; the data's title {named!r} has no year: leave out {year[0].strip()!r}"
    if title.startswith("#"):  # Not `#N` (which is an id), and no such title either.
      hint += f"; an item id is written '#N' with N in {min(self.titles)}..{max(self.titles)}"
    raise UserError(f"unknown {what} title {clipped(title)}{hint}")

  def resolve(self, entry: str, what: str) -> int:
    text = entry.strip()
    if not text:
      raise UserError(f"a {what} entry is blank ({clipped(entry)}): name an item by title or id")
    if text.startswith(TITLE_PREFIX):
      return self.by_title(text[len(TITLE_PREFIX) :].strip(), what)
    if m := _ID.fullmatch(text):
      item = int(m[1])
      if item not in self.titles:
        titled = self.exact.get(_key(text), [])  # An item titled "#99", say.
        hint = (
          f"; item {titled[0]} is titled {text!r}: write '{TITLE_PREFIX}{text}'" if titled else ""
        )
        raise UserError(
          f"unknown {what} id #{item}: the item ids are {min(self.titles)}..{max(self.titles)}"
          f"{hint}"
        )
      return item
    if _DIGITS.fullmatch(text):
      item, named = int(text), self.exact.get(_key(text), [])
      others = [i for i in named if i != item]
      if item in self.titles and others:
        raise UserError(
          f"{what} entry {text!r} is both item id {self.shown(item)} and the title of item "
          f"{', '.join(str(i) for i in others)}: write '#{item}' for the id or "
          f"'{TITLE_PREFIX}{text}' for the title"
        )
      if item in self.titles:
        return item
      if not named:
        raise UserError(f"unknown {what} entry {clipped(text)}: no item has this id or title")
    return self.by_title(text, what)


def _typable(item: int, title: str) -> str:
  """A title as a close match names it: one with a character that prints as nothing (Steam's
  item 3073 ends in U+0099) escaped and with its id to give instead, which the title, as the
  terminal shows it, would not match."""
  if title.isprintable():
    return title
  shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in title)
  return f"{shown} (#{item})"


def clipped(text: str, limit: int = 80) -> str:
  """`repr(text)`, its first `limit` characters and its length where it is longer (for
  messages that echo what a user typed)."""
  if len(text) <= limit:
    return repr(text)
  return f"{text[:limit]!r}... ({len(text)} characters)"


def resolve_items(
  names: list[str], titles: dict[int, str], what: str, full_titles: dict[int, str] | None = None
) -> list[int]:
  """History or candidate entries -> item ids, by the rules of the module docstring.

  Args:
    names: entries: `#N` (id N), `title:T` (title T), or a title or bare id.
    titles: item id -> title, as the run uses them.
    what: "history" or "candidate", for the error messages.
    full_titles: optional item id -> title with its year (`titles_with_years`), which may
      also be given and tells apart titles equal without it.

  Raises:
    UserError: an unknown or ambiguous entry (an unknown title names close matches).
  """
  index = _Titles(titles, full_titles)
  return [index.resolve(name, what) for name in names]


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Recommender.load` builds: the model's parts (`train_ilora.setup`), the run's
  restored train state, its step, which weights they are in words (`restore_for_use`), and
  the evaluator whose scoring ranks candidates."""

  su: Any
  state: dict
  step: int
  weights: str
  evaluator: Any


class Recommender:
  """A restored iLoRA run that ranks candidates for histories.

  Made in two parts: the run's config and data set (titles) at once, so that entries
  resolve, and a mistyped title is refused, before anything slow; the model and the run's
  weights on first use (`load`, which `recommend` and `retrieve` call).
  """

  def __init__(self, workdir: str, config=None):
    from ilora_jax import data

    workdir = run_folder(workdir)
    config = load_run_config(workdir) if config is None else config
    config.progress = False
    from ilora_jax import llm

    model = config.llm.get("name", "")
    # The run's SASRec, else (the ilora stage reads it only then) sasrec.init_from's.
    own = checkpoint_folder(workdir, "sasrec")
    try:
      own_sasrec = any(n.isdigit() for n in os.listdir(own))
    except OSError:  # None there (or unreadable: its restore says so).
      own_sasrec = False
    init_from = "" if own_sasrec else config.sasrec.get("init_from", "")
    for key, path in (("data.dir", config.data.get("dir", "")),
                      ("llm.name", "" if model in llm.names() else model),
                      ("sasrec.init_from", init_from)):  # fmt: skip
      if path and not os.path.exists(path):
        where = f"the run's config.{key}={path} ({os.path.join(workdir, 'config.json')})"
        if not os.path.isabs(path):
          raise UserError(
            f"{where} is relative to the folder the run was started from: run recommend from "
            "there, or write the absolute path into that file"
          )
        raise UserError(  # A grid's SASRec (its workdir moved), a data folder moved.
          f"{where} does not exist (moved since the run?): write its path now into that file"
        )
    self.config, self.workdir = config, workdir
    self.dataset = data.load_from_config(config, workdir)
    self.titles_with_years = titles_with_years(config, workdir)
    self._restored = None

  def load(self) -> Recommender:
    """Builds the model and restores the weights the run's `ilora.select_by` picked (its
    best val epoch) where it has them; once."""
    if self._restored is None:
      from ilora_jax import checkpointing, console, train_ilora

      config = self.config
      train_ilora.require_checkpoint(self.workdir)
      su = train_ilora.setup(
        config, self.workdir, dataset=self.dataset, generates=False, trains=False
      )
      state, step, weights, _ = train_ilora.restore_for_use(
        self.workdir, checkpointing.abstract_like(su.state), "selected",
        config.checkpoint.max_to_keep, su.settings,
        lambda lost: console.info(f"warning: {lost}: ranking with the latest checkpoint"),
      )  # fmt: skip
      weights += train_ilora.unfinished(self.workdir, su.total_steps)
      evaluator = train_ilora.Evaluator(su.parts, config, su.dataset.val, su.gate_kind)
      self._restored = Restored(su, state, step, weights, evaluator)
    return self

  @property
  def restored(self) -> Restored:
    """The model and the run's weights (built on first use)."""
    return self.load()._restored

  @property
  def weights(self) -> str:
    """Which of the run's weights rank, in words (the selected epoch's or the latest)."""
    return self.restored.weights

  @property
  def titles(self) -> dict[int, str]:
    return self.dataset.titles

  def resolve(self, entries: list[str | int], what: str) -> list[int]:
    """Entries (see `resolve_items`; an int is an item id) -> item ids."""
    entries = _entries(entries, "history" if what == "history" else "candidates")
    for e in entries:
      if isinstance(e, bool | np.bool_) or not isinstance(e, str | int | np.integer):
        raise UserError(f"{what} entry {e!r} is a {type(e).__name__}: give a title or an item id")
      if not isinstance(e, str) and int(e) not in self.titles:  # -1 is no '#-1' title either.
        ids = f"{min(self.titles)}..{max(self.titles)}"
        raise UserError(f"unknown {what} item id {int(e)}: the item ids are {ids}")
    names = [f"#{int(e)}" if isinstance(e, int | np.integer) else str(e) for e in entries]
    return resolve_items(names, self.titles, what, self.titles_with_years)

  def _sequence(self, history: list[int]) -> tuple[list[int], np.ndarray]:
    """The history's last `data.max_len` items, and SASRec's padded [1, max_len] input."""
    max_len = self.config.data.max_len
    hist = history[-max_len:]
    seq = np.full((1, max_len), self.restored.su.parts.n_items, np.int32)
    seq[0, : len(hist)] = hist
    return hist, seq

  def retrieve(self, history: list[int], n: int) -> list[int]:
    """SASRec's top-n items outside the history."""
    import jax.numpy as jnp

    su = self.restored.su
    hist, seq = self._sequence(history)
    logits = np.asarray(
      su.parts.sasrec.apply(
        {"params": su.frozen["sasrec"]}, jnp.asarray(seq), jnp.asarray([len(hist)])
      )
    )[0]
    eligible = [i for i in np.argsort(-logits) if int(i) in self.titles and int(i) not in history]
    return [int(i) for i in eligible[:n]]

  def recommend(self, history: list[int], candidates: list[int] | None = None, k: int = 5):
    """Top-k (item id, title, log-likelihood) among the candidates (fewer when there are
    fewer candidates). The history keeps its last `data.max_len` items."""
    history = _entries(history, "history")
    candidates = None if candidates is None else _entries(candidates, "candidates")
    _check_k(k)
    for what, items in (("history", history), ("candidate", candidates or [])):
      unknown = [i for i in items if isinstance(i, bool) or i not in self.titles]
      if unknown:
        raise UserError(
          f"unknown {what} item id {unknown[0]!r}: the item ids are "
          f"{min(self.titles)}..{max(self.titles)} (`resolve` takes titles)"
        )
    _check_left(history, candidates, self.titles)
    n = self.config.data.num_candidates
    cands = self.retrieve(history, n) if not candidates else list(dict.fromkeys(candidates))
    restored = self.restored
    parts, state, evaluator = restored.su.parts, restored.state, restored.evaluator
    hist, seq = self._sequence(history)
    from ilora_jax.train_ilora import eval_template

    # The run's evaluation template (template 0 where it drew one per row).
    template = max(eval_template(self.config), 0)
    prompt = parts.builder.batch([(hist, cands, None)], template, True, pad_left=True)
    batch = dict(prompt.as_dict(), seq=seq, len_seq=np.array([len(hist)], np.int32))
    params, gate, mask, embeds = evaluator._prepare(
      state["trainable"], state["stats"], restored.su.frozen, batch
    )
    scores = evaluator._score(
      parts.model.module, params, gate, mask, embeds, prompt, np.array([cands])
    )[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [(cands[i], self.titles[cands[i]], float(scores[i])) for i in order]


def _entries(value, what: str) -> list:
  """`value` (a history or candidates given to the API) as a list; a string (which would be
  read one character at a time), bytes, None, a non-iterable or a numpy array of other than
  one dimension is a UserError."""
  if (
    isinstance(value, str | bytes | bytearray | memoryview)
    or not isinstance(value, Iterable)
    or (isinstance(value, np.ndarray) and value.ndim != 1)  # 0-d: a TypeError; 2-d: rows.
  ):
    shown = f"{what}={value!r}" if len(repr(value)) <= 40 else what
    raise UserError(
      f"{shown} is a {type(value).__name__}, not a list: pass a list of titles or item ids, "
      f"e.g. {what}=['Heat', 12] (a string is not split into entries)"
    )
  # A dict would give its keys; a set, its entries in no order (a history's order counts).
  if isinstance(value, Mapping) or (what == "history" and isinstance(value, AbstractSet)):
    raise UserError(
      f"{what} is a {type(value).__name__}: pass a list of titles or item ids"
      + (", oldest first (its order counts)" if what == "history" else "")
    )
  entries = list(value)
  if not entries:
    raise UserError(
      f"{what} is empty: name at least one item"
      + (" (or leave candidates out for SASRec's)" if what == "candidates" else "")
    )
  return entries


def _check_left(history: list[int], candidates, titles: dict[int, str]) -> None:
  """Without candidates, some item must be left outside the history to retrieve."""
  if not candidates and not set(titles) - set(history):
    raise UserError(
      f"the history holds every one of the {len(titles)} items: no item outside it is left "
      "to recommend (give candidates to rank items of the history)"
    )


def _check_k(k) -> None:
  if isinstance(k, bool | np.bool_) or not isinstance(k, int | np.integer) or k < 1:
    raise UserError(f"k must be a positive integer, got {k!r}")


def recommend(
  workdir: str,
  history: list[str | int],
  candidates: list[str | int] | None = None,
  k: int = 5,
  notify: Callable[[str], None] | None = None,
  config=None,
  describe: Callable[[str], None] | None = None,
) -> list[tuple[int, str, float]]:
  """Top-k (item id, title, score) for a history of titles or ids, with a trained run.

  Entries are strings as on the command line (`resolve_items`) or ints (item ids). `notify`,
  when given, receives one-line notices: the history is longer than the run's `data.max_len`
  (the model reads its last items; all are kept out of SASRec's candidates), given
  candidates are in the history (ranked all the same), or there are fewer than k candidates
  (so fewer rows).
  `config` is the run's (`load_run_config(workdir)`, read here when not given). `describe`,
  when given, receives which of the run's weights rank (`Recommender.weights`).
  """
  _check_k(k)
  history = _entries(history, "history")
  candidates = None if candidates is None else _entries(candidates, "candidates")
  rec = Recommender(workdir, config)
  hist = rec.resolve(history, "history")  # Before the model is built.
  cands = rec.resolve(candidates, "candidate") if candidates else None
  _check_left(hist, cands, rec.titles)
  if describe is not None and getattr(rec, "weights", None):
    describe(rec.weights)
  notify = notify or (lambda message: None)
  max_len = int(rec.config.data.max_len)
  if len(hist) > max_len:
    notify(
      f"the history has {len(hist)} items, more than the run's data.max_len={max_len}: "
      f"the model reads its last {max_len} (all are kept out of SASRec's candidates)"
    )
  if cands:
    in_history = set(hist)
    seen = [i for i in dict.fromkeys(cands) if i in in_history]
    if seen:
      named = ", ".join(f"{rec.titles[i]!r} (#{i})" for i in seen[:3])
      more = f" and {len(seen) - 3} more" if len(seen) > 3 else ""
      are = "is" if len(seen) == 1 else "are"
      notify(
        f"{counted(len(seen), 'candidate')} {are} in the history, ranked all the same: "
        f"{named}{more}"
      )
  top = rec.recommend(hist, cands, k)
  if len(top) < k:
    n, left = rec.config.data.num_candidates, len(set(rec.titles) - set(hist))
    were = "was" if len(top) == 1 else "were"
    if cands:
      source = f"only {counted(len(top), 'distinct candidate')} {were} given"
    elif left < n:  # The history, not data.num_candidates, limits them.
      source = f"the history leaves only {counted(left, 'item')} outside it to recommend"
    else:
      source = f"only {counted(len(top), 'item')} {were} retrieved (data.num_candidates={n})"
    notify(f"{source}, so {counted(len(top), 'row')} instead of k={k}")
  return top


@cli_main
def main(argv: list[str] | None = None) -> None:
  from absl import flags

  # Its own flag values: only these flags, and main may run more than once in a process.
  values = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "Workdir of a trained ilora run.", flag_values=values)
  flags.DEFINE_string(
    "history",
    None,
    "Items seen, oldest first, joined by '|': titles (a trailing year '(yyyy)' optional), "
    "'#N' for item id N, 'title:T' for a title that looks like an id; a bare number is an id "
    "unless it is also another item's title (then an error); '\\|' is a '|' inside a title.",
    flag_values=values,
  )
  flags.DEFINE_string(
    "candidates",
    "",
    "Optional candidates joined by '|', written as --history's entries (default: SASRec's).",
    flag_values=values,
  )
  flags.DEFINE_integer("k", 5, "How many items to return.", flag_values=values)
  argv = list(sys.argv if argv is None else argv)
  args = argv[1 : argv.index("--") if "--" in argv else len(argv)]
  if any(a in HELP_FLAGS for a in args):
    print_help(values)
    return
  # A bad flag is one line, and so is a word that is no flag (`--history=Heat Toy Story`
  # unquoted, a flagfile line that is not a flag): refused, not dropped.
  parse_flags(values, argv, "recommend")
  f = values
  if values["history"].present and not f.history:  # `--history=`: given, but empty.
    raise UserError("--history is empty: name at least one item")
  if values["candidates"].present and not f.candidates:  # `--candidates="$UNSET"`, say.
    raise UserError("--candidates is empty: name at least one item, or leave it out for SASRec's")
  if not f.workdir or not f.history:
    raise UserError("--workdir and --history are required (see --help)")
  if f.k < 1:
    raise UserError(f"--k must be at least 1, got {f.k}")
  history, candidates = split_entries(f.history), split_entries(f.candidates)
  if not history:
    raise UserError(f"--history={clipped(f.history)} names no item")
  if f.candidates and not candidates:
    raise UserError(
      f"--candidates={clipped(f.candidates)} names no item (leave it out for SASRec's)"
    )
  from ilora_jax import compile_cache, console

  # The run's compile cache (its saved config), so repeated calls load the compiled steps.
  config = load_run_config(f.workdir)
  console.quiet_libraries()
  compile_cache.enable(config.get("compile_cache_dir", ""))

  def notify(message: str) -> None:
    print(f"recommend: {message}", file=sys.stderr, flush=True)

  def describe(weights: str) -> None:
    print(f"recommend: ranking with {weights}", file=sys.stderr, flush=True)

  top = recommend(f.workdir, history, candidates or None, f.k, notify, config, describe)
  # A title the terminal cannot encode is written escaped (`\xeb`), not lost with the rest.
  if isinstance(sys.stdout, io.TextIOWrapper):
    sys.stdout.reconfigure(errors="backslashreplace")
  try:
    for item, title, score in top:
      print(f"{score:10.3f}  {item:6d}  {title}")
    sys.stdout.flush()
  except BrokenPipeError:  # The reader went away (`... | head -1`): `cli_main` ends quietly.
    raise
  except OSError as exc:  # A full disk behind `> file`, say.
    raise UserError(f"cannot write the recommendations to stdout: {exc.strerror or exc}") from None


class _CallableModule(type(sys)):
  """`ilora_jax.recommend(...)` calls `recommend`; `python -m ilora_jax.recommend` is the CLI."""

  def __call__(self, *args, **kwargs):
    return recommend(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  main()
