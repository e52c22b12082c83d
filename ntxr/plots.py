"""Figures of a sweep (ntxr.sweep) and of kernel benchmarks (ntxr.bench); each returns a
matplotlib Figure, which `write_png` saves.

  runs = sweep.read_sweep("sweeps/default", default.get_config())
  plots.metrics_by_strategy(sweep.table(runs))
  plots.collapse_over_epochs(runs)
"""

import io

import matplotlib
from matplotlib import figure
from matplotlib import ticker
import numpy as np

from ntxr import files, specs

METRICS = ("t2a R@10", "t2a mAP@10", "a2t R@10", "a2t mAP@10")
# Collapse signals: metrics.jsonl path -> title. "collapse" holds the validation
# embeddings' signs (ntxr.evaluate.Collapse), "training" the epoch's mean training
# statistics (ntxr.steps.TrainingStatistics).
SIGNALS = {("collapse", "audio_cosine"): "clip embeddings: mean pairwise cosine",
           ("collapse", "text_cosine"): "caption embeddings: mean pairwise cosine",
           ("collapse", "audio_effective_rank"): "clip embeddings: effective rank",
           ("collapse", "text_effective_rank"): "caption embeddings: effective rank",
           ("training", "positive_std"): "training: spread of positive scores",
           ("training", "grad_norm"): "training: gradient norm"}


def write_png(fig: figure.Figure, path: str, dpi: int = 110) -> None:
  """Writes the figure as a PNG at `path` (local or gs://), whole or not at all."""
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=dpi)
  files.write_bytes(path, png.getvalue())


def strategy_color(strategy: str):
  """One fixed colour per strategy, the same in every figure."""
  return matplotlib.colormaps["tab10"](list(specs.run_settings()).index(strategy))


def metrics_by_strategy(rows, metrics=METRICS) -> figure.Figure:
  """Grouped bars: each metric's mean per strategy, the seed spread as error bars;
  collapsed strategies hatched. rows: ntxr.sweep.table(...)."""
  fig = figure.Figure(figsize=(max(8, 2 + 1.3 * len(rows)), 4.5), layout="constrained")
  ax = fig.subplots()
  width = 0.8 / len(metrics)
  for i, metric in enumerate(metrics):
    means = [r[metric][0] for r in rows]
    spreads = [0 if np.isnan(r[metric][1]) else r[metric][1] for r in rows]
    bars = ax.bar(np.arange(len(rows)) + (i - (len(metrics) - 1) / 2) * width, means, width,
                  yerr=spreads, capsize=2, label=metric, color=matplotlib.colormaps["Set2"](i))
    for bar, row in zip(bars, rows):
      if row["collapsed"]:
        bar.set_hatch("//")
  ax.set_xticks(np.arange(len(rows)),
                [f"{r['strategy']}\n{r['seeds']} seed{'s' * (r['seeds'] > 1)}"
                 f"{', ' + str(r['collapsed']) + ' collapsed' if r['collapsed'] else ''}"
                 for r in rows], fontsize=8)
  ax.set_ylabel("evaluation split")
  ax.set_ylim(0, 1)
  ax.legend(ncols=len(metrics), fontsize=8, loc="upper right")
  ax.set_title("Retrieval by negative-sampling strategy (mean and spread over seeds)")
  return fig


def _per_epoch(run: dict, path: tuple) -> tuple:
  """(epochs, values) of one metrics.jsonl field, e.g. ("validation", "loss")."""
  epochs, values = [], []
  for record in run["epochs_log"]:
    value = record
    for key in path:
      value = value.get(key) if isinstance(value, dict) else None
    if value is not None:
      epochs.append(record["epoch"])
      values.append(value)
  return epochs, values


def _lines_per_run(runs, panels: dict, strategies, columns: int) -> figure.Figure:
  """One panel per {title: metrics.jsonl path}, one line per run coloured by strategy."""
  rows = -(-len(panels) // columns)
  fig = figure.Figure(figsize=(4 * columns, 3 * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
  for ax, (title, path) in zip(axes, panels.items()):
    labelled = set()
    for run in runs:
      if run["strategy"] not in strategies:
        continue
      epochs, values = _per_epoch(run, path)
      ax.plot(epochs, values, "o-", color=strategy_color(run["strategy"]), alpha=0.8,
              label=None if run["strategy"] in labelled else run["strategy"])
      labelled.add(run["strategy"])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  for ax in axes[len(panels):]:
    ax.set_axis_off()
  if axes[0].get_legend_handles_labels()[0]:  # some run of the strategies drawn
    axes[0].legend(fontsize=7)
  return fig


def collapse_over_epochs(runs, strategies=("semihard_cross", "hard_cross"),
                         signals=tuple(SIGNALS)) -> figure.Figure:
  """The collapse diagnostics of each run over epochs (one line per seed)."""
  fig = _lines_per_run(runs, {SIGNALS[path]: path for path in signals},
                       strategies, columns=3)
  fig.suptitle("Feature-collapse signals per epoch: " + " vs ".join(strategies))
  return fig


def training_curves(runs, strategies=None) -> figure.Figure:
  """Training and validation loss and validation mAP@10 over epochs, per run of the
  strategies (or objectives) named (default: all)."""
  strategies = list(specs.run_settings()) if strategies is None else strategies
  return _lines_per_run(runs, {"training loss": ("training", "loss"),
                               "validation loss": ("validation", "loss"),
                               "validation t2a mAP@10": ("validation", "t2a", "mAP@10")},
                        strategies, columns=3)


def score_histograms(runs, strategies=("random", "semihard_cross", "hard_cross")):
  """Densities of matching and non-matching clip-caption scores on the test split, per
  strategy (the first seed of each); runs without a histogram are left out."""
  chosen = {}
  for run in runs:
    if run["strategy"] in strategies and "score_histogram" in run:
      chosen.setdefault(run["strategy"], run)
  fig = figure.Figure(figsize=(4 * max(len(chosen), 1), 3), layout="constrained")
  axes = np.atleast_1d(fig.subplots(1, max(len(chosen), 1)))
  for ax, (strategy, run) in zip(axes, chosen.items()):
    histogram = run["score_histogram"]
    edges = np.asarray(histogram["edges"])
    for kind, color in (("positive", "tab:green"), ("negative", "tab:red")):
      counts = np.asarray(histogram[kind], float)
      density = counts / max(counts.sum(), 1) / np.diff(edges)
      ax.stairs(density, edges, color=color, label=kind)
    ax.set_title(f"{strategy} (seed {run['seed']})", fontsize=9)
    ax.set_xlabel("score")
  if chosen:
    axes[0].legend(fontsize=7)
  return fig


def device_label(result: dict) -> str:
  """A benchmark result's device, said to be at no recorded commit where it is (figures
  transcribed, not measured by this code).

  >>> device_label(dict(device="cpu: cpu", commit=None))
  'cpu: cpu (commit not recorded)'
  """
  return result["device"] + ("" if result.get("commit") else " (commit not recorded)")


def kernel_times(results) -> figure.Figure:
  """Kernel time and matmul fraction against N per strategy and shape (T, W, E), one
  line style per device.

  results: the kernels result files (`ntxr.bench.results`), one per device."""
  fig = figure.Figure(figsize=(10, 4), layout="constrained")
  time_ax, fraction_ax = fig.subplots(1, 2)
  styles = ["o-", "s--", "^:", "d-."]
  for result, style in zip(results, styles):
    for strategy in specs.run_settings():
      mine = [r for r in result["rows"] if r["strategy"] == strategy]
      for k, shape in enumerate(sorted({(r["T"], r["W"], r["E"]) for r in mine})):
        rows = sorted((r for r in mine if (r["T"], r["W"], r["E"]) == shape),
                      key=lambda r: r["N"])  # one line per clip and caption length
        n = [r["N"] for r in rows]
        label = f"{strategy} ({device_label(result)})" if k == 0 else None
        time_ax.plot(n, [r["kernel_ms"] for r in rows], style, label=label,
                     color=strategy_color(strategy))
        fraction_ax.plot(n, [r["matmul_fraction"] for r in rows], style,
                         color=strategy_color(strategy))
  time_ax.set(xscale="log", yscale="log", xlabel="batch size N", ylabel="forward+backward ms")
  fraction_ax.set(xscale="log", xlabel="batch size N", ylabel="share of matmul throughput")
  time_ax.legend(fontsize=6, ncols=2)
  return fig


def speedup_by_strategy(results, shape=None) -> figure.Figure:
  """Each strategy's speedup over the authors' per-anchor loop (left: in JAX, right: in
  PyTorch) at one shape (N, T, W, E; default: the first result's first, the paper's in
  both grids), a bar per device; a loop not timed has no bar.

  results: the kernels result files (`ntxr.bench.results`), one per device."""
  first = results[0]["rows"][0]
  shape = tuple(shape or (first["N"], first["T"], first["W"], first["E"]))
  fig = figure.Figure(figsize=(10, 3.6), layout="constrained")
  axes = fig.subplots(1, 2, sharey=True)
  strategies = [s for s in specs.run_settings()
                if any(r["strategy"] == s for result in results for r in result["rows"])]
  width = 0.8 / max(1, len(results))
  for ax, key, title in zip(axes, ("speedup", "torch_speedup"),
                            ("against the loop in JAX", "against the loop in PyTorch")):
    for k, result in enumerate(results):
      at_shape = {r["strategy"]: r.get(key) for r in result["rows"]
                  if (r["N"], r["T"], r["W"], r["E"]) == tuple(shape)}
      x = [i + k * width for i, s in enumerate(strategies) if at_shape.get(s)]
      y = [at_shape[s] for s in strategies if at_shape.get(s)]
      ax.bar(x, y, width, label=device_label(result))
    ax.set_xticks([i + width * (len(results) - 1) / 2 for i in range(len(strategies))],
                  strategies, rotation=45, ha="right", fontsize=7)
    ax.set_title(f"{title}, N={shape[0]} T={shape[1]} W={shape[2]}", fontsize=9)
    if ax.patches:  # a loop timed on some device
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
  axes[0].set_ylabel("speedup of the jitted kernel")
  handles, labels = axes[0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="outside lower center", ncols=max(1, len(results)),
             fontsize=8)
  return fig
