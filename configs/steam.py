r"""Steam with the paper's hyperparameters.

Trains SASRec on the data, then iLoRA on that frozen SASRec, each evaluated on val and test
(stage=pipeline):
  python -m ilora_jax.main --config=configs/steam.py --workdir=runs/steam \
      --config.data.dir=../shared/data/steam
(the folder here only has a 1,000-row training sample: add
--config.data.train_file=train_data_sample1000.df)
iLoRA on the original's pretrained SASRec instead (the paper's setting):
  ... --config.stage=ilora --config.sasrec.init_from=../shared/checkpoints/sasrec/steam.pt
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
  c.data.name = "steam"
  c.data.dir = "data/steam"  # Folder with train_data.df, Val_data.df, id2name.txt.
  c.data.n_items = 3581  # Games.
  c.ilora.train.batch_size = 4  # 4 x 32 = 128 (the paper's).
  c.ilora.train.grad_accum = 32
  c.ilora.train.lr = 5e-4
  c.eval.batch_size = 256
  return c
