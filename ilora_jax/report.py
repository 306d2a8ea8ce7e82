"""End-of-run report: `W/report/` with plots, `summary.md` and TensorBoard event files.

Everything is derived from `W/metrics.jsonl` (and, for the gate plots, `W/report/gates.npz`
written by the iLoRA stage), so a report can be rebuilt at any time:

  python -m ilora_jax.report --workdir=W [--compare=plain_lora=W2,...]

`summary.md` also has a comparison table per split: this run's model, the baselines it
evaluated on the same candidates (base LLM, SASRec) and the final metrics of other runs named
by `compare` (`config.report.compare`), e.g. a plain-LoRA run (`--config.lora.num_experts=1
--config.lora.gate=constant`). A run is only compared when its candidate fingerprint equals
this run's (same data, split, rows and `data.candidate_seed`); otherwise the row says so.
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import numpy as np

from ilora_jax.files import atomic_write

_SKIP = {"run", "stage", "split", "step", "epoch", "final", "skipped", "candidates"}
# Columns of the comparison table: the paper's generation metrics, then candidate scoring.
COMPARE_KEYS = ("valid_ratio", "hit_ratio@1", "hits_over_total", "hr@1", "hr@5", "ndcg@5", "mrr")


def read_records(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl` ([] when absent).

  A line that does not parse is skipped: only the last line can be one, cut by a kill, and
  the run rewrites that record when it resumes.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      if line.strip():
        try:
          out.append(json.loads(line))
        except ValueError:
          pass
  return out


def _numeric(record: dict) -> dict[str, float]:
  return {
    k: float(v)
    for k, v in record.items()
    if k not in _SKIP and isinstance(v, int | float) and not isinstance(v, bool)
  }


def kmeans(x: np.ndarray, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
  """Cluster labels [rows] of Lloyd's k-means (k-means++ start), deterministic for a seed."""
  x = np.asarray(x, np.float64)
  k = max(1, min(k, len(x)))
  rng = np.random.default_rng(seed)
  centers = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    d = np.min(((x[:, None] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
    p = d / d.sum() if d.sum() > 0 else np.full(len(x), 1 / len(x))
    centers.append(x[rng.choice(len(x), p=p)])
  centers = np.asarray(centers)
  labels = np.zeros(len(x), int)
  for _ in range(iters):
    labels = np.argmin(((x[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    new = np.array(
      [x[labels == c].mean(0) if np.any(labels == c) else centers[c] for c in range(k)]
    )
    if np.allclose(new, centers):
      break
    centers = new
  return labels


def _plot_series(ax, records, key, label):
  pts = [(r["step"], r[key]) for r in records if key in r and isinstance(r[key], int | float)]
  if pts:
    steps, values = zip(*pts)
    ax.plot(steps, values, marker="o" if len(pts) < 30 else None, label=label)
  return bool(pts)


def parse_compare(text: str) -> dict[str, str]:
  """`name=workdir,name=workdir` -> {name: workdir}; a bare workdir is named by its folder."""
  out = {}
  for part in (p.strip() for p in (text or "").split(",")):
    if not part:
      continue
    name, _, path = part.rpartition("=")
    path = path.strip()
    out[name.strip() or os.path.basename(os.path.normpath(path))] = path
  return out


def describe_run(workdir: str) -> str:
  """Short method name of a run from its `config.json` (iLoRA, plain LoRA, ...)."""
  try:
    with open(os.path.join(workdir, "config.json")) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return "model"
  lora, rtr = config.get("lora", {}), config.get("router", {})
  gate, experts = lora.get("gate"), lora.get("num_experts")
  if config.get("stage") == "sasrec":
    return "SASRec"
  if gate == "constant" or experts == 1:
    return f"plain LoRA (r={lora.get('rank')})"
  if gate == "uniform":
    return f"LoRA experts, uniform gate (E={experts})"
  return f"iLoRA (E={experts}, router {rtr.get('kind')})"


def finals_by_split(records: list[dict], run: str | None = None) -> dict[str, dict]:
  """The latest final record per split of the ilora stage (of one `run` when given)."""
  out = {}
  for r in records:
    if r.get("final") and r.get("stage") == "ilora" and run in (None, r.get("run")):
      out[r["split"]] = r
  return out


def group_table(finals: list[dict]) -> list[str]:
  """Markdown lines of the per-user-group metrics (`group/<g>/<metric>`) of final records."""
  rows, columns = [], []
  for r in finals:
    groups = sorted({int(k.split("/")[1]) for k in r if k.startswith("group/")})
    for g in groups:
      prefix = f"group/{g}/"
      vals = {k[len(prefix) :]: v for k, v in _numeric(r).items() if k.startswith(prefix)}
      columns += [k for k in vals if k not in columns]
      rows.append((r.get("run", ""), r.get("split", ""), g, vals))
  if not rows:
    return []
  lines = ["", "## Per user group", ""]
  lines.append("| run | split | group | " + " | ".join(columns) + " |")
  lines.append("|---" * (3 + len(columns)) + "|")
  for run, split, g, vals in rows:
    cells = [f"{vals[k]:.4f}" if k in vals else "" for k in columns]
    lines.append(f"| {run} | {split} | {g} | " + " | ".join(cells) + " |")
  return lines


def comparison(workdir: str, records: list[dict], compare: dict[str, str]) -> list[str]:
  """Markdown lines of the per-split comparison tables (empty when nothing to compare)."""
  lines = []
  others = {name: finals_by_split(read_records(path)) for name, path in compare.items()}
  for split, rec in finals_by_split(records).items():
    rows = [(f"{describe_run(workdir)}, this run", {k: rec.get(k) for k in COMPARE_KEYS})]
    for prefix, label in (
      ("base/", "base LLM, no adapters (text-only prompt)"),
      ("sasrec/", "SASRec"),
    ):
      vals = {k: rec.get(prefix + k) for k in COMPARE_KEYS}
      if any(v is not None for v in vals.values()):
        rows.append((label, vals))
    for name, finals in others.items():
      label = f"{name}: {describe_run(compare[name])}"
      other = finals.get(split)
      if other is None:
        rows.append((label, f"no final {split} evaluation in {compare[name]}"))
      elif other.get("candidates") != rec.get("candidates"):
        rows.append(
          (label, "different candidates (data, rows or candidate_seed differ): not comparable")
        )
      else:
        rows.append((label, {k: other.get(k) for k in COMPARE_KEYS}))
    lines += [
      f"## {split}: methods on the same candidates (fingerprint "
      f"{rec.get('candidates', '?')}, step {rec.get('step')})",
      "",
      "| method | " + " | ".join(COMPARE_KEYS) + " |",
      "|---" * (1 + len(COMPARE_KEYS)) + "|",
    ]
    for label, vals in rows:
      if isinstance(vals, str):
        cells = [vals] + [""] * (len(COMPARE_KEYS) - 1)
      else:
        cells = ["" if vals[k] is None else f"{float(vals[k]):.4f}" for k in COMPARE_KEYS]
      lines.append("| " + " | ".join([label] + cells) + " |")
    lines += [
      "",
      "valid_ratio, hit_ratio@1 (hits / valid, the paper's) and hits_over_total come "
      "from greedy generation; hr@k, ndcg@5 and mrr rank the candidates by likelihood.",
      "",
    ]
  return lines


def write(workdir: str, compare: dict[str, str] | str | None = None) -> str:
  """Writes `workdir/report/` and returns its path."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  out = os.path.join(workdir, "report")
  os.makedirs(out, exist_ok=True)
  records = read_records(workdir)
  by_stage: dict[str, list[dict]] = defaultdict(list)
  for r in records:
    by_stage[r.get("stage", "?")].append(r)
  stages = [s for s in ("sasrec", "ilora") if s in by_stage]

  # Training loss and learning rate.
  fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(6 * max(len(stages), 1), 4))
  axes = np.atleast_1d(axes)
  for ax, stage in zip(axes, stages):
    train = [r for r in by_stage[stage] if r.get("split") == "train"]
    _plot_series(ax, train, "loss", "train loss")
    ax.set_title(f"{stage}: training loss")
    ax.set_xlabel("step")
    if any("lr" in r for r in train):
      twin = ax.twinx()
      _plot_series(twin, train, "lr", "learning rate")
      twin.set_ylabel("learning rate", color="tab:orange")
      for line in twin.get_lines():
        line.set_color("tab:orange")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "train_loss.png"), dpi=100)
  plt.close(fig)

  # Validation metrics per evaluation.
  fig, axes = plt.subplots(1, max(len(stages), 1), figsize=(6 * max(len(stages), 1), 4))
  axes = np.atleast_1d(axes)
  for ax, stage in zip(axes, stages):
    val = [r for r in by_stage[stage] if r.get("split") == "val" and r.get("run") == stage]
    keys = ("hr@1", "hr@5", "ndcg@5", "hit_ratio@1", "valid_ratio")
    plotted = [_plot_series(ax, val, key, key) for key in keys]
    ax.set_title(f"{stage}: validation")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    if any(plotted):
      ax.legend(loc="best", fontsize=8)
    else:  # e.g. a run with both evaluation modes off: its val records hold the loss only
      ax.text(0.5, 0.5, "no ranking or generation metrics recorded", ha="center",
              va="center", transform=ax.transAxes, fontsize=9)  # fmt: skip
  fig.tight_layout()
  fig.savefig(os.path.join(out, "val_metrics.png"), dpi=100)
  plt.close(fig)

  # Gate usage.
  ilora_train = [r for r in by_stage.get("ilora", []) if r.get("split") == "train"]
  experts = sorted({k for r in ilora_train for k in r if k.startswith("gate_mean/")})
  gates_path = os.path.join(out, "gates.npz")
  if experts or os.path.exists(gates_path):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for key in experts:
      _plot_series(axes[0], ilora_train, key, "expert " + key.split("/")[1])
    axes[0].set_title("mean gate weight per expert (train batches)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    if os.path.exists(gates_path):
      data = np.load(gates_path)
      gates, users = data["gates"], data["users"]
      p = np.clip(gates, 1e-9, 1.0)
      entropy = -(p * np.log(p)).sum(-1)
      axes[1].hist(entropy, bins=20, range=(0, np.log(gates.shape[1]) + 1e-6))
      axes[1].set_title(f"gate entropy per user ({len(gates)} val users)")
      axes[1].set_xlabel("entropy (nats)")
      labels = kmeans(users, 4)
      clusters = sorted(set(labels.tolist()))
      width = 0.8 / gates.shape[1]
      for e in range(gates.shape[1]):
        means = [gates[labels == c, e].mean() for c in clusters]
        axes[2].bar(np.arange(len(clusters)) + e * width, means, width, label=f"expert {e}")
      axes[2].set_xticks(np.arange(len(clusters)) + 0.4 - width / 2)
      axes[2].set_xticklabels([f"cluster {c}\n({np.sum(labels == c)} users)" for c in clusters])
      axes[2].set_title("mean gate weights by SASRec user cluster (k-means)")
      axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "gates.png"), dpi=100)
    plt.close(fig)

  # summary.md: every final metric in one table.
  finals = [r for r in records if r.get("final") or r.get("skipped")]
  keys = []
  for r in finals:  # Per-group metrics get their own table below.
    keys += [k for k in _numeric(r) if k not in keys and not k.startswith("group/")]
  lines = [f"# Run summary: {os.path.abspath(workdir)}", ""]
  if finals:
    lines.append("| run | stage | split | step | " + " | ".join(keys) + " |")
    lines.append("|---" * (4 + len(keys)) + "|")
    for r in finals:
      vals = _numeric(r)
      cells = [f"{vals[k]:.4f}" if k in vals else "" for k in keys]
      if r.get("skipped"):
        cells = [f"skipped: {r['skipped']}"] + [""] * (len(keys) - 1)
      row = [str(r.get("run", "")), str(r.get("stage", "")), str(r.get("split", "")),
             str(r.get("step", ""))]  # fmt: skip
      lines.append("| " + " | ".join(row + cells) + " |")
  else:
    lines.append("No final evaluation yet.")
  lines += group_table(finals)
  if isinstance(compare, str) or compare is None:
    compare = parse_compare(compare or "")
  table = comparison(workdir, records, compare)
  if table:
    lines[2:2] = table + ["## Every final metric", ""]
  tb_hint = f"Scalars for TensorBoard: `tensorboard --logdir {os.path.join(out, 'tb')}`."
  lines += ["", "Plots: `train_loss.png`, `val_metrics.png`, `gates.png` (iLoRA).", tb_hint]
  with atomic_write(os.path.join(out, "summary.md")) as f:
    f.write("\n".join(lines) + "\n")

  # TensorBoard event files with the same scalars (rewritten from scratch each time).
  SummaryWriter = _summary_writer_class()  # noqa: N806

  tb = os.path.join(out, "tb")
  if os.path.isdir(tb):
    for name in os.listdir(tb):
      if name.startswith("events."):
        os.remove(os.path.join(tb, name))
  writer = SummaryWriter(tb)
  for r in records:
    if "step" not in r:
      continue
    prefix = f"{r.get('stage', '?')}/{r.get('split', '?')}{'_final' if r.get('final') else ''}"
    for key, value in _numeric(r).items():
      writer.add_scalar(f"{prefix}/{key}", value, int(r["step"]))
  writer.close()
  return out


def _summary_writer_class():
  """tensorboardX's `SummaryWriter`, imported without torch: tensorboardX's writer module
  imports torch wherever it is installed (about 3 s on a CPU; it only needs it for torch
  tensors, and this package never uses torch). While `sys.modules['torch']` is None, an
  `import torch` fails as if torch were absent; a torch already imported is left alone."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter

    return SummaryWriter
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    if "torch" in sys.modules and sys.modules["torch"] is None:
      del sys.modules["torch"]
  return SummaryWriter


def main(argv: list[str] | None = None) -> None:
  from ilora_jax.errors import UserError, cli_main

  @cli_main
  def run(argv):
    usage = "usage: python -m ilora_jax.report --workdir=DIR [--compare=name=DIR2,...]"
    opts = {}
    for a in argv[1:]:
      key, eq, value = a.partition("=")
      if key not in ("--workdir", "--compare") or not eq:
        raise UserError(f"unknown argument {a!r}; {usage}")
      opts[key[2:]] = value
    if "workdir" not in opts:
      raise UserError(usage)
    workdir = opts["workdir"]
    compare = parse_compare(opts.get("compare", ""))
    for path in [workdir, *compare.values()]:
      if not os.path.exists(os.path.join(path, "metrics.jsonl")):
        raise UserError(f"no metrics.jsonl in {path}")
    print(write(workdir, compare))

  run(sys.argv if argv is None else argv)


if __name__ == "__main__":
  main()
