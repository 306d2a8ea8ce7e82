"""Hybrid prompts: item titles plus placeholder tokens that receive SASRec item embeddings.

Each history item is written `<title> [HistoryEmb]`, each candidate `<title> [CansEmb]`
(text-only form: `[PH]`, which receives nothing), joined with ", ", inside one of the
dataset's templates. Token ids are built from explicitly encoded pieces, so the
positions of placeholders and of the target are known by construction, never
recovered from tokenizer quirks:

  input_ids     [batch, time]  prompt tokens, then (training) the target tokens
  attention     [batch, time]  1 on real tokens, 0 on padding
  loss_mask     [batch, time]  1 on target tokens (the label of position t is input_ids[t])
  item_ids      [batch, time]  the item whose embedding replaces the token at this position,
                               `n_items` (padding) where nothing is replaced
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Sequence

import numpy as np

HISTORY = "[HistoryEmb]"
CANDIDATE = "[CansEmb]"
PLACEHOLDER = "[PH]"
ITEM = "[ItemEmb]"
PAD = "[PAD]"
SPECIAL_TOKENS = (PLACEHOLDER, HISTORY, CANDIDATE, ITEM)

# Three templates per dataset, the original's wording: the lines of LLaRA's prompt files,
# which the iLoRA code reads (`prompt/game.txt` for Steam, `movie.txt` for MovieLens,
# `artist.txt` for LastFM), stripped as it strips them. Training draws one per micro-batch,
# evaluation reads `ilora.eval_template`. "10 ... titles" is the original's text, though a
# prompt lists `data.num_candidates` (20) of them.
TEMPLATES = {
  "steam": (
    "This user has played [HistoryHere] in the previous. Please predict the next game this "
    "user will play. The game title candidates are [CansHere]. Choose only one game from "
    "the candidates. The answer is",
    "This user has played [HistoryHere] in the previous. Given the following 10 game "
    "titles, [CansHere], recommend one game for this user to play next. The game title you "
    "recommend is",
    "The visit history of this user is [HistoryHere]. Recommend a next game for this user "
    "to play from the following game title set, [CansHere]. The recommendation should "
    "contain one game title only. The recommendation is",
  ),
  "movielens": (
    "This user has watched [HistoryHere] in the previous. Please predict the next movie "
    "this user will watch. Choose the answer from the following 10 movie titles: "
    "[CansHere]. Answer:",
    "This user has watched [HistoryHere] in the previous. Given the following 10 movie "
    "titles: [CansHere], recommend one movie for this user to watch next. The movie title "
    "you recommend is:",
    "The visit history of this user is: [HistoryHere]. Recommend a next movie for this "
    "user to watch from the following movie title set: [CansHere]. The recommendation "
    "should contain one movie title only. Recommendation:",
  ),
  "lastfm": (
    "This user has listened to [HistoryHere] in the previous. Please predict the next "
    "music artist this user will listen to. The artist name candidates are [CansHere]. "
    "Choose only one artist from the candidates. The answer is",
    "This user has listened to [HistoryHere] in the previous. Given the following 10 music "
    "artist names, [CansHere], recommend one artist for this user to listen to next. The "
    "artist name you recommend is",
    "The listening history of this user is [HistoryHere]. Recommend the next music artist "
    "for this user to listen to from the following artist name set, [CansHere]. The "
    "recommendation should contain one artist's name only. The recommendation is",
  ),
}
TEMPLATES["synthetic"] = TEMPLATES["steam"]

# `templates_digest` of the templates code before 2026-12-07 wrote (the first Steam one the
# original's, the others its own): what its checkpoints, which record none, were trained on.
OLDER_DIGESTS = {
  "steam": "5d8451ac9a25fbd2",
  "movielens": "2d460409248f8cfa",
  "lastfm": "0dc290193f146d2b",
  "synthetic": "5d8451ac9a25fbd2",
}


def templates_digest(dataset: str) -> str:
  """A digest of `dataset`'s template texts: a run records it, so that a resume, an
  evaluation and a comparison of runs notice prompts of other wording."""
  return hashlib.sha1("\n".join(TEMPLATES[dataset]).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Batch:
  """Token arrays of one batch (see the module docstring); all [batch, time] int32."""

  input_ids: np.ndarray
  attention: np.ndarray
  loss_mask: np.ndarray
  item_ids: np.ndarray

  def as_dict(self) -> dict[str, np.ndarray]:
    return dataclasses.asdict(self)


TEXT_ANCHORS = ("\n", "\n\n", ".", "|")


def anchored_encoder(
  encode: Callable[[str], Sequence[int]], anchors: Sequence[str]
) -> Callable[[str], list[int]]:
  """`encode` for a piece of a prompt that follows other text (`anchors` TEXT_ANCHORS) or a
  special token (`anchors` a special token such as "[PH]"), not one that starts a text.

  Tokenizers differ in what they do at the start of a separately encoded string, and a
  prompt is assembled from pieces encoded once each. SentencePiece-style tokenizers (Llama's)
  mark the start of a text as a word start: " Title" alone gives ['▁', '▁Title'] where after
  a word it is ['▁Title']; after a special token the legacy ones mark a word start again and
  the others do not. The piece is encoded behind the anchor, whose own tokens (checked to be
  a prefix of the joint encoding, else the next anchor is tried) are dropped, so it gets the
  tokens it has in the whole prompt text tokenized at once. Byte-level BPE tokenizers
  (SmolLM2's) give the same tokens with or without the anchor.
  """
  prefixes = [(a, list(encode(a))) for a in anchors]

  def encode_after(text: str) -> list[int]:
    for anchor, prefix in prefixes:
      joint = list(encode(anchor + text))
      if joint[: len(prefix)] == prefix:
        return joint[len(prefix) :]
    raise ValueError(f"cannot encode {text!r} as a piece of a prompt with this tokenizer")

  return encode_after


class PromptBuilder:
  """Turns (history, candidates, target) rows into token arrays.

  A row's tokens are those of its whole prompt text (the template with each slot replaced by
  `<title> [HistoryEmb]` items joined with ", ", then the target ` <title>\n`) tokenized at
  once, assembled from pieces encoded once each: the template's start as the start of a
  text, the others behind what precedes them in the prompt (`anchored_encoder`): titles, the
  space before a marker and the answer after text; separators and the template's middle and
  end after a special token.

  Args:
    encode: text -> token ids, with no special tokens added.
    special_ids: ids of `[PH]`, `[HistoryEmb]`, `[CansEmb]` (keys are the token strings).
    pad_id: id used for padding.
    titles: item id -> title.
    n_items: padding item id (written in `item_ids` where nothing is replaced).
    dataset: key of TEMPLATES.
    bos_id: optional id put first in every prompt.
    multiple_of: `batch` rounds a batch's length up to a multiple of this by default (fewer
      shapes, so fewer compilations, against more padding).
    encode_title: text -> token ids of a title (default `encode`): one that reads the
      tokenizer's special-token texts in it as plain text (a title "A [HistoryEmb] B" or
      "A<|im_end|>B"), so that a title is never a placeholder, a pad or an end of text to
      the model (generation stopped at such an EOS and decoding dropped the others: the
      title could never be matched).
  """

  def __init__(
    self,
    encode: Callable[[str], Sequence[int]],
    special_ids: dict[str, int],
    pad_id: int,
    titles: dict[int, str],
    n_items: int,
    dataset: str,
    bos_id: int | None = None,
    multiple_of: int = 32,
    encode_title: Callable[[str], Sequence[int]] | None = None,
  ):
    if multiple_of < 1:
      raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    self.multiple_of = int(multiple_of)
    lock = threading.Lock()  # Training builds batches in a thread while evaluation runs.

    def locking(fn: Callable[[str], Sequence[int]]) -> Callable[[str], Sequence[int]]:
      def locked(text: str) -> Sequence[int]:
        with lock:
          return fn(text)

      return locked

    locked = locking(encode)
    self._after_text = anchored_encoder(locked, TEXT_ANCHORS)
    self._title_after_text = anchored_encoder(locking(encode_title or encode), TEXT_ANCHORS)
    self._after_special = anchored_encoder(locked, (PLACEHOLDER,))
    self.special_ids = special_ids
    self.pad_id = pad_id
    self.titles = titles
    self.n_items = n_items
    self.bos = [] if bos_id is None else [bos_id]
    self.templates = []
    for template in TEMPLATES[dataset]:
      head, rest = template.split("[HistoryHere]")
      middle, tail = rest.split("[CansHere]")
      # Titles bring their own leading space (as BPE sees a word inside a sentence).
      pieces = (head.rstrip(), middle.rstrip(), tail)
      self.templates.append(
        (list(locked(pieces[0])), self._after_special(pieces[1]), self._after_special(pieces[2]))
      )
    self._title_cache: dict[int, list[int]] = {}
    self._target_cache: dict[int, tuple[int, ...]] = {}
    self._sep = self._after_special(",")
    self._space = self._after_text(" ")  # before each placeholder

  def tokens_digest(self) -> str:
    """A digest (16 hex digits) of the tokens the prompts are made of: the templates', every
    title's (as an answer) and the separators'. A run records it, so that a resume notices a
    tokenizer that splits the same text otherwise (another tokenizer file, a library's or
    this package's other reading of it)."""
    pieces = [self.bos, self.templates, self._sep, self._space, self.encode_in_text("\n")]
    pieces += [self.target_tokens(i) for i in sorted(self.titles)]
    return hashlib.sha256(repr(pieces).encode()).hexdigest()[:16]

  def encode_in_text(self, text: str) -> list[int]:
    """Tokens of `text` where it follows other text in a prompt (a newline, an answer)."""
    return self._after_text(text)

  def _title(self, item: int) -> list[int]:
    """Tokens of ` <title> ` (the space before the placeholder included)."""
    if item not in self._title_cache:
      self._title_cache[item] = self._title_after_text(f" {self.titles[item]}") + self._space
    return self._title_cache[item]

  def target_tokens(self, item: int) -> list[int]:
    """Tokens of the answer ` <title>\n`, encoded once per item."""
    if item not in self._target_cache:
      self._target_cache[item] = tuple(self._title_after_text(f" {self.titles[item]}\n"))
    return list(self._target_cache[item])

  def _items(self, items: Sequence[int], marker: str, hybrid: bool) -> tuple[list, list]:
    ids, owners = [], []
    mark = self.special_ids[marker if hybrid else PLACEHOLDER]
    for k, item in enumerate(items):
      title = self._title(int(item))
      ids += title + [mark]
      owners += [self.n_items] * len(title) + [int(item) if hybrid else self.n_items]
      if k + 1 < len(items):
        ids += self._sep
        owners += [self.n_items] * len(self._sep)
    return ids, owners

  def encode_row(
    self,
    history: Sequence[int],
    candidates: Sequence[int],
    target: int | None,
    template: int,
    hybrid: bool,
  ) -> tuple[list[int], list[int], list[int]]:
    """Returns (ids, owner item per position, loss flags) of one row."""
    head, middle, tail = self.templates[template]
    hist_ids, hist_items = self._items(history, HISTORY, hybrid)
    cand_ids, cand_items = self._items(candidates, CANDIDATE, hybrid)
    ids = self.bos + head + hist_ids + middle + cand_ids + tail
    pad_item = self.n_items
    owners = (
      [pad_item] * len(self.bos + head)
      + hist_items
      + [pad_item] * len(middle)
      + cand_items
      + [pad_item] * len(tail)
    )
    loss = [0] * len(ids)
    if target is not None:
      answer = self.target_tokens(int(target))
      ids, owners, loss = ids + answer, owners + [pad_item] * len(answer), loss + [1] * len(answer)
    return ids, owners, loss

  def batch(
    self,
    rows: Sequence[tuple[Sequence[int], Sequence[int], int | None]],
    template: int | Sequence[int],
    hybrid: bool,
    length: int | None = None,
    pad_left: bool = False,
    multiple_of: int | None = None,
  ) -> Batch:
    """Encodes rows (history, candidates, target or None) and pads them to one length.

    `template`: one for every row, or one per row. Training pads on the right; generation
    prompts pad on the left so every row's next token is at the same position. The length is
    rounded up to `multiple_of` (the builder's by default; few shapes, few compilations)
    unless `length` is given.
    """
    templates = [template] * len(rows) if np.ndim(template) == 0 else list(template)
    if len(templates) != len(rows):
      raise ValueError(f"{len(templates)} templates for {len(rows)} rows")
    encoded = [self.encode_row(h, c, t, int(k), hybrid)
               for (h, c, t), k in zip(rows, templates)]  # fmt: skip
    longest = max(len(e[0]) for e in encoded)
    multiple_of = self.multiple_of if multiple_of is None else multiple_of
    if length is None:
      length = -(-longest // multiple_of) * multiple_of
    if longest > length:
      raise ValueError(f"a prompt has {longest} tokens, more than the length {length}")
    arrays = {k: np.zeros((len(rows), length), np.int32) for k in ("ids", "att", "loss")}
    items = np.full((len(rows), length), self.n_items, np.int32)
    arrays["ids"][:] = self.pad_id
    for r, (ids, owners, loss) in enumerate(encoded):
      span = slice(length - len(ids), length) if pad_left else slice(0, len(ids))
      arrays["ids"][r, span] = ids
      arrays["att"][r, span] = 1
      arrays["loss"][r, span] = loss
      items[r, span] = owners
    return Batch(arrays["ids"], arrays["att"], arrays["loss"], items)
