"""The paper's ablation in one command: strategies and objectives x seeds, one workdir
each, one table.

  python -m ntxr.sweep --root=sweeps/default --seeds=0,1
  python -m ntxr.sweep --root=sweeps/short --strategies=random,semihard_cross \\
      --processes=2 -- --config.num_epochs=2
  python -m ntxr.sweep --root=sweeps/objectives --strategies=semihard_cross \\
      --objectives=infonce,siglip
  python -m ntxr.sweep --root=sweeps/gpu --processes=4 --gpus=0,1,2,3,4,5,6,7
  python -m ntxr.sweep --root=sweeps/together --seeds=0,1,2 --together
  python -m ntxr.sweep --root=sweeps/default --table_only

Each run is `python -m ntxr.main --strategy=S --config.seed=N --workdir=ROOT/S/seed_N ARGS`
for a strategy S of the triplet loss, and `--objective=O ... --workdir=ROOT/O/seed_N` for
an objective O (ARGS: whatever follows `--`), its output in the workdir's log.txt. With
neither --strategies nor --objectives, every strategy runs. With --together the runs
train in this one process instead, the seeds of each strategy or objective as one
vmapped program (`ntxr.train.train_runs`), each run in its own workdir as before; ARGS
may then hold only --config flags. Every run's settings are checked before any
starts: one whose workdir holds a run with other settings stops the sweep, naming them
(use another --root). A run tested with these settings is skipped, an unfinished one
resumes (as does a tested one given more epochs), a failed one is reported and the
others go on. The table of every run under ROOT finished with these settings (the
--config flags after `--`, also with --table_only) goes to ROOT/results.csv and
ROOT/results.md: per strategy, the mean and sample standard deviation over seeds of
both directions' metrics, how many seeds collapsed, and where the corpus knows its
events, the share of the negatives' weight on false negatives; its figures (metrics by
strategy, collapse signals over epochs) to ROOT/*.png; the commits, package versions
and dates its runs' results were written at, and the sweep's command, to
ROOT/provenance.json.
"""

import concurrent.futures
import copy
import csv
import dataclasses
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
from typing import Optional, Union

from ntxr import ctrl_c

if __name__ == "__main__":  # first: a Ctrl-C while the imports below load costs one line
  ctrl_c.exit_at_once()

# pylint: disable=wrong-import-position
from absl import app
from absl import flags
import ml_collections
import numpy as np

from ntxr import cli, command, files, lifetime, plots, provenance, ranking, specs
# pylint: enable=wrong-import-position

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This command's flags (defined where it starts, not when ntxr.sweep is imported)."""
  cli.define_strategies(default_all=False)
  cli.define_objectives()
  flags.DEFINE_string("root", "sweeps/default", "folder holding one workdir per run")
  flags.DEFINE_list("seeds", ["0", "1"], "seeds to run for each strategy and objective")
  flags.DEFINE_integer("processes", 1, "training processes at a time", lower_bound=1)
  flags.DEFINE_list("gpus", [], "GPU ids to split evenly among the processes, e.g. 0,1,2,3 "
                    "with --processes=4: one GPU per run (default: all shared)")
  flags.DEFINE_bool("table_only", False, "only write the table of finished runs")
  flags.DEFINE_bool("together", False, "train the runs in this process, the seeds of each "
                    "strategy or objective as one program (their states stacked on a runs "
                    "axis); what follows -- may hold only --config flags")
  flags.DEFINE_integer("group_size", 0, "with --together: at most this many runs in one "
                       "program (0: every seed of a strategy or objective)", lower_bound=0)

COLUMNS = (tuple(f"t2a {m}" for m in ranking.T2A) + tuple(f"a2t {m}" for m in ranking.A2T))
# Columns where the runs measured false negatives (results.json "false_negatives"): the
# share of the negatives' weight on them, and with the pool filter on, the share of the
# pool it removed and the share of those removed that were false negatives.
FALSE_NEGATIVES = {"false negatives": "false_negative_share", "filtered": "filtered_share",
                   "filtered false": "filtered_false_share"}


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep, a (strategy or objective, seed) pair: `setting` is a strategy of
  the triplet loss or an objective that takes none (`specs.run_settings()`), whose `field`
  is the config field and ntxr.main flag it sets; its name names the run's folder and
  the table's row."""
  setting: Union[specs.Strategy, specs.Objective]
  seed: int
  workdir: str

  @property
  def name(self) -> str:
    return self.setting.name

  @property
  def tested(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, "results.json"))

  def config(self, sweep_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's config: the sweep's with the run's strategy or objective and seed."""
    config = copy.deepcopy(sweep_config)
    config.seed = self.seed
    config[self.setting.field] = self.name
    return config

  def finished(self, sweep_config: ml_collections.ConfigDict) -> bool:
    """Whether the run is tested with these settings (other epochs or collapse bounds: to
    train or test again)."""
    from ntxr import settings  # pylint: disable=import-outside-toplevel
    return self.tested and all(field in settings.OPERATIONAL
                               for field, _, _ in settings.changes(self.workdir,
                                                                   self.config(sweep_config)))

  def command(self, main_args=()) -> list:
    return [sys.executable, "-m", "ntxr.main", f"--{self.setting.field}={self.name}",
            f"--config.seed={self.seed}", f"--workdir={self.workdir}", *main_args]


def plan(root: str, names, seeds) -> list:
  """Every (strategy or objective, seed) run under root, seed by seed so a stopped sweep
  has whole seeds; names from `specs.run_settings()`."""
  by_name = specs.run_settings()
  return [Run(by_name[name], seed, os.path.join(root, name, f"seed_{seed}"))
          for seed in seeds for name in names]


class Stopping:
  """The runs a sweep's threads started, and Ctrl-C (SIGINT) as a sweep takes it: each run
  is asked to stop (it saves and exits, as `ntxr.main` does on Ctrl-C) and no other run
  starts. A context that sets the handler and puts the previous one back."""

  def __init__(self):
    self.asked = False
    self._running = set()
    self._lock = threading.Lock()  # between the threads starting runs and the handler
    self._previous = None

  def __enter__(self) -> "Stopping":
    self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *unused) -> None:
    signal.signal(signal.SIGINT, self._previous)

  def _handle(self, number, frame) -> None:
    del frame
    with self._lock:
      self.asked = True
      for process in self._running:
        process.send_signal(number)

  def run(self, args, **options) -> Optional[int]:
    """The exit code of the process `args` (subprocess.Popen's options), or None if the
    sweep was asked to stop before it started."""
    with self._lock:
      if self.asked:
        return None
      process = subprocess.Popen(args, **options)
      self._running.add(process)
    try:
      return process.wait()
    finally:
      with self._lock:
        self._running.discard(process)


def execute(run: Run, main_args=(), env=None, stopping: Optional[Stopping] = None
            ) -> Optional[int]:
  """Runs one training process, its output in workdir/log.txt; returns its exit code, or
  None if `stopping` was asked to stop before it started."""
  stopping = stopping or Stopping()
  if stopping.asked:
    return None
  os.makedirs(run.workdir, exist_ok=True)
  with open(os.path.join(run.workdir, "log.txt"), "a") as log:
    return stopping.run(run.command(main_args), stdout=log, stderr=subprocess.STDOUT,
                        env=lifetime.launcher_environment(env))


def gpu_groups(gpus, processes: int) -> list:
  """Splits GPU ids into `processes` equal groups: ["0", "1", "2", "3"], 2 -> ["0,1", "2,3"]."""
  if len(gpus) % processes:
    raise ValueError(f"{len(gpus)} GPUs ({','.join(gpus)}) do not split evenly into "
                     f"{processes} processes")
  size = len(gpus) // processes
  return [",".join(gpus[i:i + size]) for i in range(0, len(gpus), size)]


def check(runs, config: ml_collections.ConfigDict) -> None:
  """Raises SettingError, before any run starts, for settings that cannot run or a run's
  workdir that holds a run with other settings."""
  from ntxr import settings  # pylint: disable=import-outside-toplevel  (loads JAX)
  for run in runs:
    settings.check(run.workdir, run.config(config), elsewhere="--root")


def run_all(runs, config, main_args=(), processes: int = 1, gpus=(), report=print) -> list:
  """Runs the runs not finished with `config` (the sweep's settings, which main_args
  give), `processes` at a time; returns the failed ones.

  With gpus, each process sees only its own group of them (CUDA_VISIBLE_DEVICES, see
  gpu_groups); without, processes share every device, and with several JAX is told not
  to preallocate its memory. On Ctrl-C (from the main thread) the running runs stop and
  save, no other starts, and KeyboardInterrupt is raised once they have ended.
  """
  pending = [r for r in runs if not r.finished(config)]
  report(f"{len(runs) - len(pending)} of {len(runs)} runs finished already; "
         f"{len(pending)} to run, {processes} at a time")
  share = processes > 1 and not gpus
  env = dict(os.environ, **({"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if share else {}))
  free = queue.Queue()
  for group in gpu_groups(list(gpus), processes) if gpus else [None] * processes:
    free.put(group)

  def execute_on_free_group(run):
    group = free.get()
    try:
      return execute(run, main_args,
                     env if group is None else dict(env, CUDA_VISIBLE_DEVICES=group), stopping)
    finally:
      free.put(group)

  failed = []
  with Stopping() as stopping, concurrent.futures.ThreadPoolExecutor(processes) as pool:
    futures = {pool.submit(execute_on_free_group, r): r for r in pending}
    for future in concurrent.futures.as_completed(futures):
      run, code = futures[future], future.result()
      if code is None:  # not started: the sweep was stopping
        continue
      status = ("done" if code == 0 else "stopped (Ctrl-C)" if code == 130
                else f"FAILED (exit {code})")
      report(f"{run.name} seed {run.seed}: {status}; log {run.workdir}/log.txt")
      if code:
        failed.append(run)
  if stopping.asked:
    raise KeyboardInterrupt()
  return failed


def run_together(runs, config, group_size: int = 0, report=print) -> list:
  """Trains the unfinished runs in this process with `ntxr.train.train_runs` (each run's
  config: `config` with its strategy or objective and seed; at most group_size runs in a
  program, 0 for no limit); returns the failed ones (frozen before an epoch ended). Its
  failures end the command as `ntxr.main`'s do."""
  pending = [r for r in runs if not r.finished(config)]
  report(f"{len(runs) - len(pending)} of {len(runs)} runs finished already; "
         f"{len(pending)} to train together")
  if not pending:
    return []
  # pylint: disable=import-outside-toplevel  (JAX and TensorFlow load only for training)
  from ntxr import main as main_lib, train
  results = main_lib.run_or_exit(train.train_runs,
                                 [(r.config(config), r.workdir) for r in pending], group_size)
  for run, result in zip(pending, results):
    status = ("FAILED (frozen before its first epoch ended)" if result is None
              else f"frozen: {result['frozen']}" if result["frozen"] else "done")
    report(f"{run.name} seed {run.seed}: {status}; results in {run.workdir}")
  return [run for run, result in zip(pending, results) if result is None]


def read_run(workdir: str) -> dict:
  """A run's results.json, with its per-epoch metrics.jsonl records as "epochs_log"."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return dict(results, workdir=workdir,
              epochs_log=files.read_jsonl(os.path.join(workdir, "metrics.jsonl")))


def read_sweep(root: str, config: ml_collections.ConfigDict, report=print) -> list:
  """Every run under root (ROOT/STRATEGY/seed_N) finished with the sweep's settings
  `config`, in strategy then seed order; the tested runs with other settings are left
  out, and `report` says so."""
  runs, other = [], []
  for setting in specs.run_settings().values():
    folder = os.path.join(root, setting.name)
    seeds = sorted((int(d[5:]), d) for d in os.listdir(folder) if d.startswith("seed_")
                   and d[5:].isdigit()) if os.path.isdir(folder) else []
    for seed, seed_folder in seeds:
      run = Run(setting, seed, os.path.join(folder, seed_folder))
      if run.finished(config):
        runs.append(dict(read_run(run.workdir), seed=seed, strategy=run.name))  # its row
      elif run.tested:
        other.append(run)
  if other:
    from ntxr import settings  # pylint: disable=import-outside-toplevel
    field, there, here = next(change for change in settings.changes(
        other[0].workdir, other[0].config(config)) if change[0] not in settings.OPERATIONAL)
    report(f"left out of the table: {len(other)} runs tested with other settings than "
           f"these (first {other[0].workdir}: {field} {there!r} there, {here!r} here)")
  return runs


def table(runs) -> list:
  """Per strategy (or objective): {"strategy", "seeds", "collapsed", COLUMN: (mean,
  spread)}, and the FALSE_NEGATIVES columns where every seed measured them (the filter's
  two where every seed's filter removed something).

  The spread is the sample standard deviation over seeds (nan for one seed)."""
  def mean_and_spread(values):
    values = np.array(values)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else float("nan")
  rows = []
  for strategy in specs.run_settings():
    mine = [r for r in runs if r["strategy"] == strategy]
    if not mine:
      continue
    row = dict(strategy=strategy, seeds=len(mine), collapsed=sum(r["collapse"] for r in mine))
    for column in COLUMNS:
      direction, metric = column.split()
      row[column] = mean_and_spread([r[direction][metric] for r in mine])
    measured = [r["false_negatives"] for r in mine if r.get("false_negatives")]
    filtered = all(m.get("filtered_share") for m in measured)
    for column, key in FALSE_NEGATIVES.items():
      if len(measured) == len(mine) and (filtered or key == "false_negative_share"):
        row[column] = mean_and_spread([m[key] for m in measured])
    rows.append(row)
  return rows


def _columns(rows) -> tuple:
  """Those of COLUMNS and FALSE_NEGATIVES that some row has, in that order."""
  return tuple(c for c in (*COLUMNS, *FALSE_NEGATIVES) if any(c in r for r in rows))


def to_csv(rows) -> str:
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  columns, missing = _columns(rows), (float("nan"), float("nan"))
  writer.writerow(["strategy", "seeds", "collapsed"] +
                  [f"{c} {part}" for c in columns for part in ("mean", "std")])
  for row in rows:
    writer.writerow([row["strategy"], row["seeds"], row["collapsed"]] +
                    [f"{v:.4f}" for c in columns for v in row.get(c, missing)])
  return out.getvalue()


def read_csv(path: str) -> list:
  """The rows of a results.csv `to_csv` wrote, as `table` gives them (values as written,
  4 decimals; a column the file leaves nan is left out of its row)."""
  rows = []
  with open(path, newline="", encoding="utf-8-sig") as f:
    for line, record in enumerate(csv.DictReader(f), start=2):
      try:
        row = dict(strategy=record["strategy"], seeds=int(record["seeds"]),
                   collapsed=int(record["collapsed"]))
        for column in [k[:-len(" mean")] for k in record if k.endswith(" mean")]:
          mean, spread = float(record[f"{column} mean"]), float(record[f"{column} std"])
          if not np.isnan(mean):
            row[column] = (mean, spread)
      except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}:{line}: not a results.csv row ({error})") from error
      rows.append(row)
  return rows


def to_markdown(rows) -> str:
  """Mean ± spread per cell, the collapse column as collapsed seeds / seeds."""
  cell = lambda m, s: "-" if np.isnan(m) else f"{m:.3f}" if np.isnan(s) else f"{m:.3f} ± {s:.3f}"
  columns, missing = _columns(rows), (float("nan"), float("nan"))
  lines = ["| strategy | " + " | ".join(columns) + " | collapse |",
           "|---" * (len(columns) + 2) + "|"]
  for row in rows:
    lines.append(f"| {row['strategy']} | " +
                 " | ".join(cell(*row.get(c, missing)) for c in columns) +
                 f" | {row['collapsed']}/{row['seeds']} |")
  return "\n".join(lines) + "\n"


FIGURES = ("metrics_by_strategy", "training_curves", "collapse_over_epochs", "score_histograms")


def provenance_of(runs: list, command: Optional[str]) -> dict:
  """What ROOT/provenance.json records: the sweep's command, when the table was made,
  and where its runs came from (each run's results.json records it): how many, the
  commits, CPUs and package versions their results were written at ("unrecorded" for
  runs older than the record) and their first and last dates."""
  recorded = [run.get("provenance") or {} for run in runs]
  dates = sorted(p["date"] for p in recorded if "date" in p)
  packages = dict.fromkeys(name for p in recorded for name in p.get("versions", {}))
  return dict(command=command, tabulated=provenance.now(), runs=dict(
      count=len(runs), commits=sorted({p.get("commit") or "unrecorded" for p in recorded}),
      cpus=sorted({p.get("cpu") or "unrecorded" for p in recorded}),
      first=dates[0] if dates else None, last=dates[-1] if dates else None,
      versions={name: sorted({p["versions"][name] for p in recorded
                              if name in p.get("versions", {})}) for name in packages}))


def write_report(root: str, config: ml_collections.ConfigDict, report=print,
                 command: Optional[str] = None) -> list:
  """From the runs finished with the sweep's settings `config`: ROOT/results.csv,
  ROOT/results.md, ROOT/provenance.json (`provenance_of`; command: the sweep's) and the
  FIGURES as ROOT/NAME.png. Returns the rows."""
  runs = read_sweep(root, config, report)
  rows = table(runs)
  files.write_text(os.path.join(root, "results.csv"), to_csv(rows))
  files.write_json(os.path.join(root, "provenance.json"), provenance_of(runs, command))
  files.write_text(os.path.join(root, "results.md"), to_markdown(rows))
  for name, fig in [("metrics_by_strategy", plots.metrics_by_strategy(rows)),
                    ("training_curves", plots.training_curves(runs)),
                    ("collapse_over_epochs", plots.collapse_over_epochs(runs)),
                    ("score_histograms", plots.score_histograms(runs))]:
    plots.write_png(fig, os.path.join(root, f"{name}.png"))
  return rows


def parse_flags(argv) -> list:
  """The sweep's flags, before --, parsed as `command.parse_flags` does; returns
  [argv[0], what follows --] (the runs' flags). A --config flag or an argument before --
  is refused in one line saying that it goes after --, and after -- a flag the sweep sets
  for each run."""
  end = argv.index("--") if "--" in argv else len(argv)
  for arg in argv[1:end]:
    if re.match(r"--?config(\.|=|$)", arg):
      command.exit_with(f"{arg}: the runs' flags go after --, as in python -m ntxr.sweep "
                        f"--strategies=random -- {arg}", 2)
  stray = command.parse_flags(argv[:end])[1:]
  if stray:
    command.exit_with(f"unexpected arguments {stray}: the runs' flags go after --", 2)
  for arg in argv[end + 1:]:
    if re.match(r"--?(config\.seed|workdir|strategy|objective)(=|$)", arg):
      command.exit_with(f"{arg}: the sweep sets it for each run (--seeds, --root, "
                        "--strategies, --objectives): leave it out after --", 2)
  return [argv[0], *argv[end + 1:]]


def main(argv):
  try:
    names = (cli.chosen("strategies", specs.STRATEGIES)
             + cli.chosen("objectives", specs.objectives_without_strategy()))
    seeds = []
    for seed in FLAGS.seeds:
      if not seed.isdigit():
        raise ValueError(f"--seeds: {seed!r} is not a whole number")
      seeds.append(int(seed))
    files.check_folder("root", FLAGS.root)
    if FLAGS.table_only and not os.path.isdir(FLAGS.root):
      raise ValueError(f"--root={FLAGS.root}: no such folder, so no runs to tabulate")
    runs = plan(FLAGS.root, names or list(specs.STRATEGIES), seeds)
    if FLAGS.gpus:
      gpu_groups(FLAGS.gpus, FLAGS.processes)
    if FLAGS.together and (FLAGS.processes > 1 or FLAGS.gpus):
      raise ValueError("--together trains every run in this one process: leave out "
                       "--processes and --gpus")
    config = cli.config_of(argv[1:], only_config=FLAGS.together)  # the runs' settings
    if not FLAGS.table_only:
      check(runs, config)
  except ValueError as error:  # settings.SettingError too
    command.exit_with(error, 2)
  if FLAGS.table_only:
    failed = []
  elif FLAGS.together:
    command.start(argv[:1])
    command.import_tensorflow()
    failed = run_together(runs, config, FLAGS.group_size)
  else:
    try:
      failed = run_all(runs, config, argv[1:], FLAGS.processes, FLAGS.gpus)
    except KeyboardInterrupt:  # the runs have stopped, each saved
      print(ctrl_c.INTERRUPTED, file=sys.stderr)
      sys.exit(130)
  os.makedirs(FLAGS.root, exist_ok=True)
  rows = write_report(FLAGS.root, config,
                      command=" ".join(["python -m ntxr.sweep", *sys.argv[1:]]))
  print(to_markdown(rows))
  print(f"{sum(r['seeds'] for r in rows)} runs: table and figures in {FLAGS.root}")
  if failed:
    command.exit_with(f"{len(failed)} runs failed; see " +
                      ", ".join(f"{r.workdir}/log.txt" for r in failed), 1)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
