"""End-of-run report: `W/report/` with plots, `summary.md` and TensorBoard event files.

Everything is derived from `W/metrics.jsonl` (and, for the gate plots, `W/report/gates.npz`
written by the iLoRA stage), so a report can be rebuilt at any time:

  python -m ilora_jax.report --workdir=W
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import numpy as np

_SKIP = {"run", "stage", "split", "step", "epoch", "final", "skipped"}


def read_records(workdir: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


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


def write(workdir: str) -> str:
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
    for key in ("hr@1", "hr@5", "ndcg@5", "hit_ratio@1", "valid_ratio"):
      _plot_series(ax, val, key, key)
    ax.set_title(f"{stage}: validation")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend(loc="best", fontsize=8)
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
  for r in finals:
    keys += [k for k in _numeric(r) if k not in keys]
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
  tb_hint = f"Scalars for TensorBoard: `tensorboard --logdir {os.path.join(out, 'tb')}`."
  lines += ["", "Plots: `train_loss.png`, `val_metrics.png`, `gates.png` (iLoRA).", tb_hint]
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")

  # TensorBoard event files with the same scalars (rewritten from scratch each time).
  from tensorboardX import SummaryWriter

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


def main(argv: list[str] | None = None) -> None:
  from ilora_jax.errors import UserError, cli_main

  @cli_main
  def run(argv):
    args = [a for a in argv[1:] if a.startswith("--workdir=")]
    if not args:
      raise UserError("usage: python -m ilora_jax.report --workdir=DIR")
    workdir = args[0].split("=", 1)[1]
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
      raise UserError(f"no metrics.jsonl in {workdir}")
    print(write(workdir))

  run(sys.argv if argv is None else argv)


if __name__ == "__main__":
  main()
