r"""LastFM with the paper's hyperparameters.

Trains SASRec on the data, then iLoRA on that frozen SASRec, each evaluated on val and test
(stage=pipeline):
  python -m ilora_jax.main --config=configs/lastfm.py --workdir=runs/lastfm \
      --config.data.dir=../shared/data/lastfm
iLoRA on the original's pretrained SASRec instead (the paper's setting):
  ... --config.stage=ilora --config.sasrec.init_from=../shared/checkpoints/sasrec/lastfm.pt
SASRec alone: --config.stage=sasrec.

The hyperparameters are the paper's for Llama-2-7B but for a gradient-norm clip of 1.0 (the
original clips nothing: --config.ilora.train.clip_norm=0); the LLM defaults to the embedded
SmolLM2-135M. For the paper's setting add --config.llm.name=<Llama-2-7B Hugging Face folder>.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import base  # noqa: E402


def get_config():
  c = base.get_config()
  c.stage = "pipeline"  # SASRec, then iLoRA on top of it.
  c.data.name = "lastfm"
  c.data.dir = "data/lastfm"  # Folder with train_data.df, Val_data.df, id2name.txt.
  c.data.n_items = 4606  # Artists.
  c.ilora.train.batch_size = 8  # 8 x 16 = 128 (the paper's).
  c.ilora.train.grad_accum = 16
  c.ilora.train.lr = 7e-4  # Warm-up start and final lr are lr / 100.
  c.eval.batch_size = 128
  return c
