"""Shared pieces of the experiment grids (configs/experiments/*.py).

`grid(arg)` returns the grid skeleton for a scale:
  tiny (default): a 2-layer random Llama (`llm.init_std` scaled so adapters can steer it) on
    synthetic users in behaviour groups, one-word titles; minutes per run on 2 CPU cores.
  lastfm | movielens: SmolLM2-135M on the real data with the data set's paper settings, for a
    GPU (give the data folder with --grid.extra="data.dir=...", which adds to the scale's
    overrides; see experiments/RESULTS.md).
"""

from ml_collections import config_dict

TINY = (
  "data.synthetic.num_users=1000",
  "data.synthetic.num_groups=4",
  "data.synthetic.titles=words",
  "sasrec.train.epochs=8",
  "llm.init_std=0.125",
  "lora.rank=8",
  "ilora.train.steps=300",
  "ilora.train.lr=0.01",
  "ilora.max_target_tokens=4",
  "ilora.max_new_tokens=4",
  "ilora.eval_rows=0",
  "ilora.eval_batch_size=25",
  "ilora.eval_base=False",
  "checkpoint.every_steps=100",
)

REAL = {
  "lastfm": ("llm.name=smollm2-135m",),
  "movielens": ("llm.name=smollm2-135m",),
}


def grid(arg: str, title: str, description: str) -> config_dict.ConfigDict:
  scale = arg or "tiny"
  c = config_dict.ConfigDict()
  c.title = f"{title} ({scale})"
  c.description = description
  if scale == "tiny":
    c.config = "configs/tiny.py"
    c.overrides = TINY
  elif scale in REAL:
    c.config = f"configs/{scale}.py"
    c.overrides = REAL[scale]
  else:
    raise ValueError(f"unknown grid scale {scale!r}: tiny, lastfm or movielens")
  c.extra = ""  # More overrides for every run, "key=value key=value" (after `overrides`).
  c.variants = ()  # "name: key=value ..." (the grid file fills these in).
  c.seeds = "0,1,2"  # Comma-separated; each is config.train.seed of its runs.
  c.only = ""  # Comma-separated variant names to run ("" = all).
  c.share_sasrec = True  # One SASRec per seed, frozen by every variant of that seed.
  c.sasrec = ""  # Or one SASRec for every run: an original .pt checkpoint or a workdir.
  c.metrics = "hr@1,mrr,hit_ratio@1,valid_ratio"  # Table columns (scoring, then generation).
  c.reference = "lora"  # Paired differences are taken against this variant.
  return c
