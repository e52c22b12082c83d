"""Training as the paper runs it, for one run or many: epochs of steps, validation after
each, the learning rate cut on a validation-loss plateau, the best epoch's checkpoint
tested.

`train_and_evaluate(config, workdir)` trains (resuming from `workdir` if a run is
there), keeps the latest and the best checkpoint (by `config.select_by`: validation
text-to-audio mAP@10, or the authors' lowest validation loss), evaluates the best on
the test split and returns what it writes to workdir/results.json (ntxr.workdir lists
the files). `train_runs([(config, workdir), ...])` does the same for a sweep's runs in
one process, the runs of one loss setting stepped as one program (`ntxr.programs`).
"""

import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from typing import Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from ntxr import checkpoints as checkpoints_lib, experiment as experiment_lib, files
from ntxr import metrics_log, parallel, programs, provenance, settings, steps
from ntxr import workdir as workdir_lib
from ntxr.data import corpus as corpus_lib, input_pipeline


@dataclasses.dataclass(frozen=True)
class Plateau:
  """ReduceLROnPlateau's memory: the lowest value so far and the epochs since it."""
  best: float = float("inf")
  bad_epochs: int = 0


def reduce_on_plateau(plateau: Plateau, value: float, learning_rate: float,
                      options: settings.Schedule) -> tuple:
  """PyTorch's ReduceLROnPlateau(mode="min", threshold_mode="abs") for one epoch.

  Returns (plateau, learning_rate): the rate is multiplied by factor (not below
  min_lr) once more than `patience` epochs in a row fail to improve on the best by
  `threshold`.

  Example:
    >>> plateau, lr = Plateau(), 1e-3
    >>> for loss in [1.0, 0.999, 0.998, 0.997, 0.996, 0.996, 0.996]:
    ...   plateau, lr = reduce_on_plateau(plateau, loss, lr, settings.Schedule())
    >>> plateau, round(lr, 6)
    (Plateau(best=1.0, bad_epochs=0), 0.0001)
  """
  if value < plateau.best - options.threshold:
    plateau = Plateau(best=float(value))
  else:
    plateau = Plateau(plateau.best, plateau.bad_epochs + 1)
  if plateau.bad_epochs > options.patience:
    learning_rate = max(learning_rate * options.factor, options.min_lr)
    plateau = Plateau(plateau.best)
  return plateau, learning_rate


def plateau_stop(recent: tuple, results: int, value: float,
                 options: settings.Stopper) -> tuple:
  """Ray Tune's TrialPlateauStopper (tune/stopper/trial_plateau.py) for one result.

  Returns (recent, results, stop): the last `num_results` values, the count of results
  so far, and whether to stop: once at least `grace_period` results are in and the
  last `num_results` have a population standard deviation below `std`.

  Example:
    >>> recent, results = (), 0
    >>> for loss in [1.0, 0.5, 0.5004, 0.5002]:
    ...   recent, results, stop = plateau_stop(recent, results, loss,
    ...                                        settings.Stopper(0.001, 3, 2))
    >>> recent, stop
    ((0.5, 0.5004, 0.5002), True)
  """
  recent, results = (*recent, float(value))[-options.num_results:], results + 1
  stop = (results >= options.grace_period and len(recent) == options.num_results
          and float(np.std(recent)) < options.std)
  return recent, results, stop


@dataclasses.dataclass(frozen=True)
class Progress:
  """Where training stands, saved with every checkpoint: epochs completed, steps into
  the next and the sums of their statistics, the learning rate and its plateau, the best
  epoch and its selection value, training seconds, the epochs flagged as collapsed, and
  the plateau stopper's memory (its last validation losses, their count, and whether it
  stopped training)."""
  learning_rate: float
  epoch: int = 0
  step_in_epoch: int = 0
  statistic_sums: dict = dataclasses.field(default_factory=dict)
  plateau: Plateau = Plateau()
  best_selection: float = -float("inf")
  best_epoch: int = 0
  seconds: float = 0.0
  collapse_epochs: tuple = ()
  recent_losses: tuple = ()
  validation_results: int = 0
  stopped_early: bool = False

  def after_step(self, statistics: dict) -> "Progress":
    sums = {name: self.statistic_sums.get(name, 0.0) + value
            for name, value in statistics.items()}
    return dataclasses.replace(self, step_in_epoch=self.step_in_epoch + 1,
                               statistic_sums=sums)

  def statistic_means(self) -> dict:
    """The epoch's mean training statistics so far, resumed steps included."""
    return {name: total / self.step_in_epoch for name, total in self.statistic_sums.items()}

  def to_json(self) -> dict:
    return dict(dataclasses.asdict(self), collapse_epochs=list(self.collapse_epochs),
                recent_losses=list(self.recent_losses))

  @classmethod
  def from_json(cls, saved: dict) -> "Progress":
    return cls(**dict(saved, plateau=Plateau(**saved["plateau"]),
                      collapse_epochs=tuple(saved["collapse_epochs"]),
                      recent_losses=tuple(saved.get("recent_losses", ()))))

  def after_validation(self, loss: float, options: settings.Optimiser) -> "Progress":
    """The progress with a validation loss given to the plateau schedule (where the
    learning rate follows it) and the stopper."""
    plateau, learning_rate = self.plateau, self.learning_rate
    if options.lr_schedule == "plateau":
      plateau, learning_rate = reduce_on_plateau(plateau, loss, learning_rate, options.schedule)
    recent, results, stop = plateau_stop(self.recent_losses, self.validation_results, loss,
                                         options.stopper)
    return dataclasses.replace(self, plateau=plateau, learning_rate=learning_rate,
                               recent_losses=recent, validation_results=results,
                               stopped_early=stop)


class Stopped(Exception):
  """Training stopped when asked to (SIGTERM, a preemption notice, Ctrl-C), its state
  saved; `interrupted` is whether Ctrl-C (SIGINT) asked."""

  def __init__(self, message: str, interrupted: bool = False):
    super().__init__(message)
    self.interrupted = interrupted


class Interrupted(BaseException):
  """SIGTERM or Ctrl-C, at a step or between an epoch's steps and its end: the loop saves
  what the steps reached. Not an Exception, so that no `except Exception` (a checkpoint's
  write errors) takes it for a failure."""


class StopRequests:
  """Asks training to stop on SIGTERM, which preemptible VMs and TPUs send before they
  stop, and on Ctrl-C (SIGINT); a context that sets the handlers and puts the previous
  ones back.

  While steps run (`at_steps`) the handler only records the signal, and `asked(step)`
  tells the loop to save after the step it is in. Elsewhere (validation, checkpoints,
  metrics) it raises at once and the loop saves the state the epoch's steps reached; if
  the raise comes where Python drops exceptions (a `__del__`, a garbage-collection
  callback), it is dropped unreported and the loop stops at the epoch's end.
  Several processes: `asked` is JAX's preemption sync point, which stops every process
  at the same step once any of them is given notice. Outside the main thread, where no
  handler can be set, it never asks.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None  # the signal that asked
    self.at_steps = False
    self._previous = {}
    self._report = None  # sys.unraisablehook before

  def __enter__(self) -> "StopRequests":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {number: signal.signal(number, self._handle) for number in self.SIGNALS}
      self._report, sys.unraisablehook = sys.unraisablehook, self._unraisable
    return self

  def __exit__(self, *unused) -> None:
    for number, previous in self._previous.items():
      signal.signal(number, previous)
    if self._report is not None:
      sys.unraisablehook = self._report

  def _unraisable(self, unraisable) -> None:
    if not isinstance(unraisable.exc_value, Interrupted):
      self._report(unraisable)

  def _handle(self, number, frame) -> None:
    del frame
    self.received = self.received or number
    if not self.at_steps:
      raise Interrupted()

  def stopped(self, what: str) -> Stopped:
    """The Stopped error of the stop this recorded: "as asked (its signal), `what`"."""
    interrupted = self.received == signal.SIGINT
    return Stopped(f"as asked ({'Ctrl-C' if interrupted else 'SIGTERM or a preemption notice'}), "
                   f"{what}", interrupted)

  def asked(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.received is not None


def check_statistics(progress: Progress, read: list, epoch: int,
                     checkpoints: checkpoints_lib.Checkpoints) -> Progress:
  """`progress` with the sums of the steps' statistics `read` ([(step, {field: float})],
  `steps.UnreadStatistics.read`); raises FloatingPointError at the first step whose loss
  or gradient norm is not finite."""
  for step, statistics in read:
    if not (np.isfinite(statistics["loss"]) and np.isfinite(statistics["grad_norm"])):
      kept = checkpoints.step("latest")
      raise FloatingPointError(
          f"training loss became {statistics['loss']} (gradient norm "
          f"{statistics['grad_norm']}) at step {step} (epoch {epoch}; steps "
          f"{read[0][0]}-{read[-1][0]} were checked together); stopped. " + (
              "Nothing was saved: rerun with a lower --config.learning_rate"
              if kept is None else
              f"The last good checkpoint (step {kept}) is kept in {checkpoints.root}; "
              "try a lower --config.learning_rate in another --workdir"))
    progress = progress.after_step(statistics)
  return progress


def epoch_line(record: dict) -> str:
  """The line a run prints as an epoch ends, from the epoch's record (metrics.jsonl's)."""
  training, validation = record["training"], record["validation"]
  return (f"epoch {record['epoch']}: train loss {training.get('loss', float('nan')):.4f}, "
          f"validation loss {validation['loss']:.4f}, t2a R@10 "
          f"{validation['t2a']['R@10']:.3f} mAP@10 {validation['t2a']['mAP@10']:.3f}, a2t "
          f"R@10 {validation['a2t']['R@10']:.3f}, lr {record['learning_rate']:g} "
          f"(validation {record['validation_seconds']:.0f} s)")


def end_epoch(run: programs.Run, seconds: float, validated: tuple) -> None:
  """The plateau schedule, checkpoints and the metrics line of the run's epoch, whose
  steps took `seconds` and whose validation gave `validated` ((validation metrics,
  Collapse, validation seconds), `programs`); leaves the run's state and progress at the
  start of the next epoch."""
  experiment, state, progress = run.experiment, run.state, run.progress
  select = settings.SELECTIONS[experiment.settings.checkpoints.select_by]
  epoch, training = progress.epoch + 1, progress.statistic_means()
  validation, collapse, validation_seconds = validated
  progress = progress.after_validation(validation["loss"], experiment.settings.optimiser)
  state = steps.set_learning_rate(state, progress.learning_rate)
  # The next step's rate: the plateau's after this epoch, or the schedule's.
  learning_rate = (experiment.scheduled_rate(int(state.step)) if steps.scheduled(state)
                   else progress.learning_rate)
  if collapse.collapsed:
    logging.warning("feature collapse at epoch %d: %s", epoch, "; ".join(collapse.reasons))
  progress = dataclasses.replace(
      progress, epoch=epoch, step_in_epoch=0, statistic_sums={},
      seconds=progress.seconds + seconds,
      collapse_epochs=progress.collapse_epochs + ((epoch,) if collapse.collapsed else ()))
  if select(validation) > progress.best_selection:
    progress = dataclasses.replace(progress, best_selection=select(validation),
                                   best_epoch=epoch)
    run.checkpoints.save("best", state, progress.to_json())
  run.checkpoints.save("latest", state, progress.to_json())
  run.checkpoints.wait()
  record = dict(epoch=epoch, step=int(state.step), training=training, validation=validation,
                collapse=collapse.to_dict(), learning_rate=learning_rate,
                seconds=progress.seconds, validation_seconds=validation_seconds)
  run.log.write(int(state.step), record)
  tqdm.tqdm.write(run.label + epoch_line(record))
  if progress.stopped_early:
    stopper = experiment.settings.optimiser.stopper
    tqdm.tqdm.write(f"{run.label}the validation loss has plateaued (standard deviation below "
                    f"{stopper.std:g} over its last {stopper.num_results} values): training "
                    f"stops after epoch {epoch}")
  run.state, run.progress = state, progress


def best_state(experiment: experiment_lib.Experiment,
               checkpoints: checkpoints_lib.Checkpoints) -> steps.TrainState:
  """The best checkpoint's train state; FileNotFoundError if there is none."""
  checkpoints.wait()
  restored = checkpoints.restore("best", experiment.initial_state)
  if restored is None:
    raise FileNotFoundError(f"{checkpoints.root}/best: no checkpoint; train first")
  return restored[0]


def evaluate_best(experiment: experiment_lib.Experiment, checkpoints: checkpoints_lib.Checkpoints,
                  workdir: str, frozen: Optional[str] = None,
                  scored: Optional[tuple] = None) -> dict:
  """Evaluates the best checkpoint on the test split; writes and returns its results.
  frozen: why training was cut short (a run trained together whose loss became NaN while
  the others went on), its results' "frozen" (None: it was not). scored: (the test
  split's embeddings by the best state, their scores [clips, captions]) where made
  already (runs tested together)."""
  checkpoints.wait()
  evaluation = experiment.evaluation
  metrics, submission, score_matrix = (
      evaluation.test(best_state(experiment, checkpoints)) if scored is None
      else evaluation.test_results(*scored))
  best_json = checkpoints.progress("best")
  best = Progress.from_json(best_json)
  trained = Progress.from_json(checkpoints.progress("latest") or best_json)
  loss = experiment.settings.loss
  skipped = [entry for entries in experiment.corpus.skipped.values() for entry in entries]
  results = dict(metrics, objective=loss.objective, strategy=loss.strategy,
                 run=experiment.settings.run_name, score=loss.score,
                 split=experiment.test_split,
                 collapse=best.best_epoch in trained.collapse_epochs,
                 collapse_epochs=list(trained.collapse_epochs), epochs=trained.epoch,
                 stopped_early=trained.stopped_early, frozen=frozen,
                 selected_by=experiment.settings.checkpoints.select_by,
                 skipped=dict(count=len(skipped), entries=skipped),
                 steps=checkpoints.step("latest") or checkpoints.step("best"),
                 best_epoch=best.best_epoch, best_step=checkpoints.step("best"),
                 seconds=trained.seconds, provenance=provenance.of(),
                 false_negatives=metrics_log.false_negatives_of(
                     files.read_jsonl(os.path.join(workdir, "metrics.jsonl")),
                     best.best_epoch))
  workdir_lib.write_results(workdir, results, submission, score_matrix)
  return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if workdir holds a run), then tests the best checkpoint.

  Returns the dict written to workdir/results.json. Raises FloatingPointError if the
  loss or a score becomes NaN; the last good checkpoints stay in workdir. Every program
  it compiles multiplies matrices at config.matmul_precision.
  """
  results, = train_runs([(config, workdir)], freeze=False)
  if results is None:  # the stopper ended it before its first epoch
    raise FileNotFoundError(f"{workdir}/checkpoints/best: no checkpoint; training stopped "
                            "before its first epoch ended")
  return results


def train_runs(runs: list, group_size: int = 0, freeze: bool = True) -> list:
  """Trains [(config, workdir)] (resuming each workdir's run), then tests each run's best
  checkpoint; returns each run's results (as written to its results.json), or None for a
  run frozen before it finished an epoch.

  The runs differ only in strategy, objective and seed (`settings.PER_RUN`). The runs of
  one loss setting step, validate and test as one program (`programs.Stacked`, at most
  group_size of them, 0: all), a run alone as itself (`programs.Single`); each seed's
  batches are made once a step, and every run draws the keys it draws alone. Runs left
  at different steps (a rerun may find them so) train apart to their epoch's end, then
  together again. freeze: a run whose loss, gradient or embeddings become non-finite is
  frozen at its last good checkpoint and tested from its best (its results.json says
  why) while the others go on; else FloatingPointError stops training.
  """
  configs = [config for config, _ in runs]
  settings.check_together(configs)
  for config, workdir in runs:
    settings.check(workdir, config)
  with contextlib.ExitStack() as stack:
    for _, workdir in runs:
      stack.enter_context(workdir_lib.in_use(workdir))
    run_settings = [settings.Settings.of(config) for config in configs]
    stack.enter_context(jax.default_matmul_precision(run_settings[0].matmul_precision))
    for each in run_settings:  # a wrong file stops the runs before their data is prepared
      experiment_lib.checked_pretrained_encoders(each)
    corpora = {s.data: corpus_lib.load_data(s.data)  # prepared once each
               for s in run_settings}
    experiments = [experiment_lib.Experiment(s, corpora[s.data]) for s in run_settings]
    if len(runs) > 1:
      programs.check_memory(experiments, group_size)
    members = [_open(experiment, config, workdir, stack, several=len(runs) > 1)
               for experiment, (config, workdir) in zip(experiments, runs)]
    _train(members, group_size, freeze)
    return _test(members, group_size)


def _open(experiment: experiment_lib.Experiment, config: ml_collections.ConfigDict,
          workdir: str, stack: contextlib.ExitStack, several: bool) -> programs.Run:
  """The run of `experiment` (of `config`) in workdir, resumed from its checkpoints if it
  has any, config.json written if it is new; its lines labelled with its name if it is
  one of `several`."""
  for split in (experiment.training_split, experiment.validation_split):
    experiment.batches_per_epoch(split)  # fails now, not in epoch 1
  settings.write(workdir, config)
  checkpoints = stack.enter_context(checkpoints_lib.Checkpoints(workdir))
  restored = checkpoints.resume(experiment.initial_state)
  if restored is None:
    state = experiment.initial_state
    progress = Progress(learning_rate=experiment.settings.optimiser.learning_rate)
  else:
    state, progress = restored[0], Progress.from_json(restored[1])
    logging.info("resuming %s at epoch %d, step %d", workdir, progress.epoch + 1,
                 int(state.step))
  log = stack.enter_context(metrics_log.MetricsLog(workdir, progress.epoch))
  run = programs.Run(experiment, workdir, checkpoints, log, state, progress)
  run.label = f"{run.name}: " if several else ""
  return run


def _train(runs: list, group_size: int, freeze: bool) -> None:
  """Trains the runs to their end: each time, the runs furthest behind through the rest
  of their epoch, so that they meet the others at an epoch's start. With
  schedule_from_untrained, a new run first gives the untrained model's validation loss
  to the schedule and the stopper. Asked to stop (StopRequests), saves every run's
  latest checkpoint (after the step in flight, or the epoch's steps if they are done)
  and raises Stopped."""
  options = runs[0].experiment.settings.optimiser
  if options.schedule_from_untrained:
    for run in runs:
      if not run.progress.validation_results:  # a new run
        run.progress = run.progress.after_validation(run.experiment.validation_loss(
            run.state, 0), options)
        run.state = steps.set_learning_rate(run.state, run.progress.learning_rate)
  with StopRequests() as stop:
    try:
      while any(run.training for run in runs):
        behind = min(run.position for run in runs if run.training)
        _train_epoch([run for run in runs if run.training and run.position == behind],
                     group_size, freeze, stop)
        if stop.received:  # its raise was lost (in a garbage-collection callback, say)
          raise Interrupted()
    except Interrupted:
      stop.at_steps = True  # record, not raise, a second signal while saving
      raise _save_and_stop(runs, stop) from None


def _save_and_stop(runs: list, stop: StopRequests) -> Stopped:
  """Saves the latest checkpoint of every unfrozen run whose latest does not hold its
  step and progress already; returns the Stopped error that says how to resume."""
  for run in runs:
    run.checkpoints.wait()  # the saves in flight, before the latest are read
  for run in runs:
    now = (int(run.state.step), run.progress.to_json())
    if not run.frozen and (run.checkpoints.step("latest"),
                           run.checkpoints.progress("latest")) != now:
      run.checkpoints.save("latest", run.state, now[1])
  for run in runs:
    run.checkpoints.wait()
  def point(run):
    progress = run.progress
    epoch = progress.epoch + (1 if progress.step_in_epoch else 0)  # at an epoch's end: that one
    return f"after step {int(run.state.step)} (epoch {epoch})"
  if len(runs) == 1:
    return stop.stopped(f"training stopped {point(runs[0])}, saved in "
                        f"{runs[0].checkpoints.root}/latest: rerun the same command to resume "
                        "from there")
  points = {}  # point -> the names of the runs stopped there
  for run in runs:
    if not run.frozen:
      points.setdefault(point(run), []).append(run.name)
  stopped = f"the {sum(map(len, points.values()))} runs stopped"
  saved, resume = "each saved in its workdir's checkpoints/latest", "resume them from there"
  if len(points) == 1:
    return stop.stopped(f"{stopped} {next(iter(points))}, {saved}: rerun the same command to "
                        f"{resume}")
  each = "; ".join(f"{', '.join(names)} {where}" for where, names in points.items())
  return stop.stopped(f"{stopped} at different points, {saved}: {each}. Rerun the same "
                      f"command to {resume}")


def _train_epoch(runs: list, group_size: int, freeze: bool, stop: StopRequests) -> None:
  """The runs (all at one step of one epoch) through the rest of the epoch's steps, one
  program per loss setting, then each run's validation, schedule and checkpoints.

  Steps are dispatched without waiting for them: the next batch goes to the devices
  while a step runs, and the statistics are read every metrics_every_steps steps
  (and before a checkpoint or a stop), where the NaN check runs; the latest checkpoint
  is saved every checkpoint_every_steps steps.
  """
  experiment = runs[0].experiment
  options, saving = experiment.settings.optimiser, experiment.settings.checkpoints
  split = experiment.training_split
  steps_per_epoch = experiment.steps_per_epoch()
  epoch, start = runs[0].progress.epoch + 1, runs[0].progress.step_in_epoch
  active = [programs.of(members) for members in programs.grouped(runs, group_size)]
  made, relations = {}, {}  # seed -> its batches and their relations, once for its runs
  for run in runs:
    if run.seed not in made:
      batches = run.experiment.train_batches(split, experiment_lib.epoch_seed(run.seed, epoch))
      made[run.seed] = input_pipeline.as_numpy(batches.take(steps_per_epoch).skip(start))
      relations[run.seed] = run.experiment.relations.add

  def seed_batches():
    for batches in zip(*made.values()):
      yield {seed: relations[seed](batch, split) for seed, batch in zip(made, batches)}
  queued = parallel.prefetch(seed_batches(), lambda batches: (
      batches, {program: program.put(batches) for program in active}))
  desc = f"epoch {epoch}/{options.num_epochs}" + (f", {len(runs)} runs" if len(runs) > 1 else "")
  began, first_step = time.perf_counter(), int(runs[0].state.step) + 1
  stop.at_steps = True
  with tqdm.tqdm(queued, total=steps_per_epoch, initial=start, desc=desc, unit="batch") as bar:
    for step, (batches, put) in enumerate(bar, first_step):
      for program in active:
        program.step(put[program] if program in put else program.put(batches), step)
      done = start + step - first_step + 1
      asked = stop.asked(step)
      save = done % saving.every_steps == 0 and done < steps_per_epoch
      if asked or save or len(active[0].unread) == saving.metrics_every_steps:
        active = _read(active, epoch, freeze)
        if not active:  # every run frozen
          break
        if len(runs) == 1:
          bar.set_postfix(loss=f"{runs[0].progress.statistic_means()['loss']:.4f}")
      if asked:
        for program in active:
          program.unstack()
        raise Interrupted()  # every run saved where it stands, these and the others
      if save:
        for program in active:
          program.unstack()
          for run in program.runs:
            run.checkpoints.save("latest", run.state, run.progress.to_json())
  active = _read(active, epoch, freeze)
  for program in active:
    program.unstack()
  stop.at_steps = False
  seconds = time.perf_counter() - began
  for program in active:
    for run, validated in zip(program.runs, program.validate(epoch)):
      if isinstance(validated, FloatingPointError):
        if not freeze:
          raise validated
        run.freeze(f"{validated} after epoch {epoch}; this run is frozen, its checkpoints "
                   f"kept in {run.checkpoints.root}")
        continue
      end_epoch(run, seconds, validated)


def _read(active: list, epoch: int, freeze: bool) -> list:
  """Reads every program's statistics into its runs' progress (`check_statistics`);
  returns the programs without their frozen runs (a program left with none is dropped).
  Without freeze, a non-finite loss or gradient raises FloatingPointError."""
  kept = []
  for program in active:
    frozen = []
    for run, read in zip(program.runs, program.read()):
      try:
        run.progress = check_statistics(run.progress, read, epoch, run.checkpoints)
      except FloatingPointError as error:
        if not freeze:
          raise
        run.freeze(str(error).replace("; stopped.", "; this run is frozen."))
        frozen.append(run)
    if not frozen:
      kept.append(program)
      continue
    program.unstack()  # the frozen runs' states are not saved again
    going = [run for run in program.runs if not run.frozen]
    if going:
      kept.append(programs.of(going))
  return kept


def _test(runs: list, group_size: int) -> list:
  """Tests each run's best checkpoint, the runs of each loss setting embedding the test
  split in one pass and scoring it in one program per block; returns each run's results
  (written to its results.json), or None for a run frozen before its first epoch ended."""
  scored = {}
  for group in programs.grouped([run for run in runs if run.checkpoints.step("best") is not None],
                                group_size):
    scored.update(zip(group, programs.test_scores(
        group, lambda run: best_state(run.experiment, run.checkpoints))))
  results = []
  for run in runs:
    if run not in scored:
      logging.warning("%s: frozen before its first epoch ended, so it has no results", run.name)
      results.append(None)
    else:
      results.append(evaluate_best(run.experiment, run.checkpoints, run.workdir,
                                   frozen=run.frozen, scored=scored[run]))
  return results



def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Tests the best checkpoint in workdir without training."""
  with workdir_lib.in_use(workdir), jax.default_matmul_precision(config.matmul_precision):
    with checkpoints_lib.Checkpoints(workdir) as checkpoints:
      return evaluate_best(experiment_lib.Experiment.of(settings.Settings.of(config)),
                           checkpoints, workdir)
