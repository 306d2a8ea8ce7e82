"""Recommend the next items for a history with a trained iLoRA run.

  python -m ilora_jax.recommend --workdir=W --history="Toy Story (1995)|Heat (1995)" [--k=5]
      [--candidates="title|title|..."]

The run's settings come from `W/config.json` (written by every run). The history is a list of
titles (exact, case-insensitive) or item ids. Without candidates, the frozen SASRec retrieves
`num_candidates` items outside the history and the adapted LLM re-ranks them by the
log-likelihood of each title after the hybrid prompt (the scoring evaluation's method).
"""

from __future__ import annotations

import difflib
import json
import os
import sys

import numpy as np

from ilora_jax.errors import UserError, cli_main


def load_run_config(workdir: str):
  from ml_collections import ConfigDict

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"{path} not found: is {workdir} the workdir of an ilora run?")
  with open(path) as f:
    return ConfigDict(json.load(f))


def resolve_items(names: list[str], titles: dict[int, str], what: str) -> list[int]:
  """Titles (case-insensitive) or ids -> item ids; an unknown title lists close matches."""
  by_title: dict[str, int] = {}
  for item, title in titles.items():
    by_title.setdefault(title.strip().lower(), item)
  ids = []
  for name in names:
    key = name.strip()
    if key.isdigit() and int(key) in titles:
      ids.append(int(key))
      continue
    if key.lower() in by_title:
      ids.append(by_title[key.lower()])
      continue
    close = difflib.get_close_matches(key, list(titles.values()), n=3, cutoff=0.5)
    hint = f"; close matches: {' | '.join(close)}" if close else ""
    raise UserError(f"unknown {what} title {key!r}{hint}")
  return ids


class Recommender:
  """A restored iLoRA run that ranks candidates for histories."""

  def __init__(self, workdir: str, config=None):
    from ilora_jax import checkpointing, train_ilora

    config = load_run_config(workdir) if config is None else config
    config.progress = False
    self.config = config
    self.su = train_ilora.setup(config, workdir)
    ckpt = checkpointing.StageCheckpoints(workdir, "ilora", config.checkpoint.max_to_keep, False)
    latest = ckpt.latest_step()
    if latest is None:
      raise UserError(f"no ilora checkpoint in {ckpt.directory}: train with --config.stage=ilora")
    self.state, _ = ckpt.restore(latest, checkpointing.abstract_like(self.su.state))
    ckpt.close()
    self.evaluator = train_ilora.Evaluator(
      self.su.parts, config, self.su.dataset.val, self.su.gate_kind
    )

  @property
  def titles(self) -> dict[int, str]:
    return self.su.parts.builder.titles

  def retrieve(self, history: list[int], n: int) -> list[int]:
    """SASRec's top-n items outside the history."""
    import jax.numpy as jnp

    parts, max_len = self.su.parts, self.config.data.max_len
    seq = np.full((1, max_len), parts.n_items, np.int32)
    hist = history[-max_len:]
    seq[0, : len(hist)] = hist
    logits = np.asarray(
      parts.sasrec.apply(
        {"params": self.su.frozen["sasrec"]}, jnp.asarray(seq), jnp.asarray([len(hist)])
      )
    )[0]
    eligible = [i for i in np.argsort(-logits) if int(i) in self.titles and int(i) not in history]
    return [int(i) for i in eligible[:n]]

  def recommend(self, history: list[int], candidates: list[int] | None = None, k: int = 5):
    """Top-k (item id, title, log-likelihood) among the candidates."""
    if not history:
      raise UserError("the history is empty")
    n = self.config.data.num_candidates
    cands = self.retrieve(history, n) if not candidates else list(dict.fromkeys(candidates))
    parts, max_len = self.su.parts, self.config.data.max_len
    seq = np.full((1, max_len), parts.n_items, np.int32)
    hist = history[-max_len:]
    seq[0, : len(hist)] = hist
    prompt = parts.builder.batch([(hist, cands, None)], 0, True, pad_left=True)
    batch = dict(prompt.as_dict(), seq=seq, len_seq=np.array([len(hist)], np.int32))
    st = self.state
    params, gate, mask, embeds = self.evaluator._prepare(
      st["trainable"], st["stats"], self.su.frozen, batch
    )
    scores = self.evaluator._score(
      parts.model.module, params, gate, mask, embeds, prompt, np.array([cands])
    )[0]
    order = np.argsort(-scores, kind="stable")[:k]
    return [(cands[i], self.titles[cands[i]], float(scores[i])) for i in order]


def recommend(
  workdir: str, history: list[str | int], candidates: list[str | int] | None = None, k: int = 5
) -> list[tuple[int, str, float]]:
  """Top-k (item id, title, score) for a history of titles or ids, with a trained run."""
  rec = Recommender(workdir)
  hist = resolve_items([str(h) for h in history], rec.titles, "history")
  cands = (
    resolve_items([str(c) for c in candidates], rec.titles, "candidate") if candidates else None
  )
  return rec.recommend(hist, cands, k)


@cli_main
def main(argv: list[str] | None = None) -> None:
  from absl import flags

  flags.DEFINE_string("workdir", None, "Workdir of a trained ilora run.")
  flags.DEFINE_string("history", None, "Items seen, oldest first: titles or ids joined by '|'.")
  flags.DEFINE_string("candidates", "", "Optional candidates joined by '|' (default: SASRec's).")
  flags.DEFINE_integer("k", 5, "How many items to return.")
  try:
    flags.FLAGS(sys.argv if argv is None else argv)
  except flags.Error as exc:
    raise UserError(str(exc)) from None
  f = flags.FLAGS
  if not f.workdir or not f.history:
    raise UserError("--workdir and --history are required")
  if f.k < 1:
    raise UserError(f"--k must be at least 1, got {f.k}")
  from ilora_jax import compile_cache, console

  console.quiet_libraries()
  # The run's compile cache (its saved config), so repeated calls load the compiled steps.
  compile_cache.enable(load_run_config(f.workdir).get("compile_cache_dir", ""))
  split = lambda s: [x for x in s.split("|") if x.strip()]
  for item, title, score in recommend(f.workdir, split(f.history), split(f.candidates), f.k):
    print(f"{score:10.3f}  {item:6d}  {title}")


class _CallableModule(type(sys)):
  """`ilora_jax.recommend(...)` calls `recommend`; `python -m ilora_jax.recommend` is the CLI."""

  def __call__(self, *args, **kwargs):
    return recommend(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  main()
