"""Runs trained together in one process: the runs of one strategy or objective (its
seeds) step as one program, their states stacked on a runs axis (`ntxr.together`), and
each run keeps its own workdir in the formats `ntxr.train` writes.

  results = train_together.train_together([(config_a, workdir_a), (config_b, workdir_b)])

Runs trained together differ only in strategy, objective and seed. Each seed's batches
are made once per step and read by every run of that seed; the runs of one program read
their seeds' batches padded to the longest (a clip's embedding does not depend on its
padding, `ntxr.models`). Each run has its own random keys (those its separate run
draws), learning rate, plateau schedule, stopper, best checkpoint and results. A
program's runs are validated and tested at once (their states stacked, each seed's
batches made once, the split embedded in one pass), each run's scores and metrics as
`ntxr.train` makes them. A run whose loss, gradient or embeddings become non-finite is
frozen at its last good checkpoint, tested from its best one, and its results.json says
why ("frozen"); the others go on. Killed, a rerun resumes every run
where its checkpoints stand; runs left at different steps train apart until the end of
their epoch, then together again.
"""

import contextlib
import dataclasses
import functools
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ntxr import checkpoints as checkpoints_lib, experiment as experiment_lib
from ntxr import metrics_log, parallel, settings, steps, together, train
from ntxr import workdir as workdir_lib
from ntxr.data import input_pipeline

# The fields that may differ between runs trained together.
PER_RUN = ("strategy", "objective", "seed")


@dataclasses.dataclass(eq=False)  # each run is itself, whatever its fields
class Run:
  """One run trained together with others: its experiment, files, and where it stands
  (its state while it is not stacked in a program)."""
  experiment: experiment_lib.Experiment
  workdir: str
  checkpoints: checkpoints_lib.Checkpoints
  log: metrics_log.MetricsLog
  state: steps.TrainState
  progress: train.Progress
  frozen: Optional[str] = None  # why it stopped training early, if its loss became NaN

  @property
  def name(self) -> str:
    return f"{settings.run_name(self.experiment.config)} seed {self.experiment.config.seed}"

  @property
  def training(self) -> bool:
    return (not self.frozen and not self.progress.stopped_early
            and self.progress.epoch < self.experiment.config.num_epochs)

  @property
  def position(self) -> tuple:
    return self.progress.epoch, self.progress.step_in_epoch

  def freeze(self, why: str) -> None:
    """Stops this run's training early (its loss, gradient or embeddings became
    non-finite), keeping its checkpoints."""
    self.frozen = why
    logging.warning("%s: %s", self.name, why)


@functools.lru_cache(maxsize=None)
def compiled_steps(loss: settings.Loss, runs: int, devices: tuple) -> tuple:
  """(`together.train_step`, its states donated, and `together.eval_loss` for one loss
  setting, jitted over a RunsAndData mesh of the devices; the mesh)."""
  mesh = parallel.RunsAndData(runs, devices)
  return (mesh.jit(functools.partial(together.train_step, loss=loss), donate_argnums=0),
          mesh.jit(functools.partial(together.eval_loss, loss=loss)), mesh)


class Program:
  """The runs of one loss setting stepped as one: their states stacked while the epoch's
  steps run, their statistics read together."""

  def __init__(self, runs: list):
    self.runs = runs
    experiment = runs[0].experiment
    self._step, _, mesh = compiled_steps(experiment.settings.loss, len(runs),
                                         tuple(experiment.devices.mesh.devices.flat))
    self.states = jax.device_put(together.stack([run.state for run in runs]), mesh.runs)
    self.seed_keys = jax.device_put(
        jnp.stack([jax.random.key(run.experiment.config.seed + 1) for run in runs]), mesh.runs)
    self.unread = steps.UnreadStatistics()

  def step(self, batches: dict, step: int) -> None:
    """Dispatches the step numbered `step` on each run's seed's batch ({seed: numpy, with
    its relations})."""
    batch = together.pad_and_stack([batches[run.experiment.config.seed] for run in self.runs])
    keys = jax.vmap(jax.random.fold_in, (0, None))(self.seed_keys, step - 1)
    self.states, statistics = self._step(self.states, batch, keys)
    self.unread.add(step, statistics)

  def unstack(self) -> None:
    """Gives each run its state as the program's steps left it, replicated over its
    experiment's devices as a separate run's is."""
    for run, state in zip(self.runs, together.unstack(self.states)):
      run.state = run.experiment.devices.replicate(state)

  def read_statistics(self, epoch: int) -> list:
    """Adds the unread steps' statistics to each run's progress; returns the runs whose
    loss or gradient became non-finite, frozen (their state is not kept)."""
    frozen = []
    for run, read in zip(self.runs, self.unread.read_runs(len(self.runs))):
      try:
        run.progress = train.check_statistics(run.progress, read, epoch, run.checkpoints)
      except FloatingPointError as error:
        run.freeze(str(error).replace("; stopped.", "; this run is frozen."))
        frozen.append(run)
    return frozen


def check_together(configs: list) -> None:
  """Raises settings.SettingError unless the configs differ only in PER_RUN fields."""
  first = configs[0].to_dict()
  for config in configs[1:]:
    for field, value in config.to_dict().items():
      if field not in PER_RUN and value != first[field]:
        raise settings.SettingError(
            f"runs trained together differ only in {', '.join(PER_RUN)}; --config.{field} "
            f"is {first[field]!r} in one and {value!r} in another")


def device_memory(device: jax.Device) -> Optional[int]:
  """The bytes `device` can hold (its allocator's limit), or None where JAX does not say
  (the CPU)."""
  return (device.memory_stats() or {}).get("bytes_limit")


def run_bytes(experiment: experiment_lib.Experiment) -> tuple:
  """An estimate of one run's bytes while it steps: (its train state: parameters, Adam's
  moments, BatchNorm statistics; its step's: XLA's temporary memory for a step at the
  largest length bucket, and the batch). Compiles that step once, without running it."""
  config = experiment.config
  size, frames = config.batch_size, config.frame_buckets[-1]
  mel_bands = experiment.builder.builder_config.logmel.mel_bands
  batch = experiment.with_relations(dict(
      audio=np.zeros((size, frames, mel_bands), np.float32),
      audio_mask=np.ones((size, frames), bool),
      tokens=np.ones((size, config.max_tokens), np.int32),
      token_mask=np.ones((size, config.max_tokens), bool),
      audio_id=np.arange(size, dtype=np.int32) % 2), experiment.training_split)
  state = experiment.initial_state
  step = jax.jit(functools.partial(steps.train_step, loss=experiment.settings.loss))
  compiled = step.lower(state, batch, jax.random.key(0)).compile()
  state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
  batch_bytes = sum(value.nbytes for value in batch.values())
  return state_bytes, compiled.memory_analysis().temp_size_in_bytes + batch_bytes


def check_memory(experiments: list, group_size: int) -> None:
  """Raises settings.SettingError, before any program of runs together compiles, if the
  estimated bytes of one (`run_bytes` times its runs on each device) exceed 90% of a
  device's memory, naming a group size that fits. Where JAX does not say how much a
  device holds (the CPU), checks nothing. A run's step bytes are split over its
  batch's devices, its state is whole on each."""
  devices = tuple(experiments[0].devices.mesh.devices.flat)
  limit = device_memory(devices[0])
  if limit is None:
    return
  for members in _grouped(experiments, lambda experiment: experiment.settings.loss):
    count = min(group_size or len(members), len(members))
    state_bytes, step_bytes = run_bytes(members[0])
    def need(runs_together, state_bytes=state_bytes, step_bytes=step_bytes):
      mesh = parallel.RunsAndData(runs_together, devices).mesh.shape
      return runs_together // mesh["runs"] * (state_bytes + step_bytes / mesh["data"])
    if need(count) <= 0.9 * limit:
      continue
    fits = max((k for k in range(1, count) if need(k) <= 0.9 * limit), default=0)
    advice = (f"train at most {fits} together (--group_size={fits})" if fits else
              "even one run does not fit: lower --config.batch_size or the longest of "
              "--config.frame_buckets")
    raise settings.SettingError(
        f"{count} runs of {settings.run_name(members[0].config)} trained together need about "
        f"{need(count) / 2**30:.1f} GiB of each device's {limit / 2**30:.1f} GiB: {advice}")


def _grouped(items, key) -> list:
  """The items in groups of equal key(item), groups and items in order."""
  groups = {}
  for item in items:
    groups.setdefault(key(item), []).append(item)
  return list(groups.values())


def _programs_of(runs: list, group_size: int) -> list:
  """The runs in the groups that step, validate and test as one: by loss setting, at
  most group_size runs each (0: no limit)."""
  return [members[first:first + (group_size or len(members))]
          for members in _grouped(runs, lambda run: run.experiment.settings.loss)
          for first in range(0, len(members), group_size or len(members))]


def train_together(runs: list, group_size: int = 0) -> list:
  """Trains [(config, workdir)] together (resuming each workdir's run), then tests each
  run's best checkpoint; returns each run's results (as written to its results.json),
  or None for a run frozen before it finished an epoch. group_size: at most this many
  runs in one program (0: all the runs of a loss setting)."""
  configs = [config for config, _ in runs]
  check_together(configs)
  for config, workdir in runs:
    settings.check(workdir, config)
  with contextlib.ExitStack() as stack:
    stack.enter_context(jax.default_matmul_precision(configs[0].matmul_precision))
    for _, workdir in runs:
      stack.enter_context(workdir_lib.in_use(workdir))
    experiments = [experiment_lib.Experiment(config) for config in configs]
    check_memory(experiments, group_size)
    members = [_open(experiment, workdir, stack)
               for experiment, (_, workdir) in zip(experiments, runs)]
    _train(members, group_size)
    return _test(members, group_size)


def _open(experiment: experiment_lib.Experiment, workdir: str,
          stack: contextlib.ExitStack) -> Run:
  """The run of `experiment` in workdir, resumed from its checkpoints if it has any."""
  config = experiment.config
  for split in (experiment.training_split, experiment.validation_split):
    experiment.batches_per_epoch(split)  # fails now, not in epoch 1
  settings.write(workdir, config)
  checkpoints = stack.enter_context(checkpoints_lib.Checkpoints(workdir))
  restored = checkpoints.resume(experiment.initial_state)
  if restored is None:
    state, progress = experiment.initial_state, train.Progress(learning_rate=config.learning_rate)
  else:
    state, progress = restored[0], train.Progress.from_json(restored[1])
  log = stack.enter_context(metrics_log.MetricsLog(workdir, progress.epoch))
  return Run(experiment, workdir, checkpoints, log, state, progress)


def _train(runs: list, group_size: int) -> None:
  """Trains the runs to their end: each time, the runs furthest behind (a rerun may find
  them at different steps) through the rest of their epoch, so that they meet the others
  at an epoch's start. Asked to stop, saves every run's latest checkpoint and raises
  train.Stopped."""
  options = runs[0].experiment.settings.optimiser
  if options.schedule_from_untrained:
    for run in runs:
      if not run.progress.validation_results:  # a new run
        run.progress = run.progress.after_validation(run.experiment.validation_loss(
            run.state, 0), options)
        run.state = steps.set_learning_rate(run.state, run.progress.learning_rate)
  with train.StopRequests() as stop:
    try:
      while any(run.training for run in runs):
        behind = min(run.position for run in runs if run.training)
        _train_epoch([run for run in runs if run.training and run.position == behind],
                     group_size, stop)
        if stop.received:  # its raise was lost (in a garbage-collection callback, say)
          raise train.Interrupted()
    except train.Interrupted:
      stop.at_steps = True  # record, not raise, a second signal while saving
      raise _save_all_and_stop(runs, stop) from None


def _save_all_and_stop(runs: list, stop: train.StopRequests) -> train.Stopped:
  """Saves every unfrozen run's latest checkpoint; returns the Stopped error that says
  how to resume."""
  for run in runs:
    if not run.frozen:
      run.checkpoints.save("latest", run.state, run.progress.to_json())
  for run in runs:
    run.checkpoints.wait()
  return stop.stopped(f"the {len(runs)} runs stopped, each saved in its workdir's "
                      "checkpoints/latest: rerun the same command to resume them from there")


def _train_epoch(runs: list, group_size: int, stop: train.StopRequests) -> None:
  """The runs (all at one step of one epoch) through the rest of the epoch's steps, one
  Program per loss setting (of at most group_size runs, if given), then each run's
  validation, schedule and checkpoints."""
  experiment = runs[0].experiment
  config, split = experiment.config, experiment.training_split
  steps_per_epoch = experiment.batches_per_epoch(split)
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  epoch, start = runs[0].progress.epoch + 1, runs[0].progress.step_in_epoch
  programs = [Program(members) for members in _programs_of(runs, group_size)]
  batches, relations = {}, {}  # seed -> its batches and their relations, once for its runs
  for run in runs:
    seed = run.experiment.config.seed
    if seed not in batches:
      made = run.experiment.train_batches(split, experiment_lib.epoch_seed(seed, epoch))
      batches[seed] = input_pipeline.as_numpy(made.take(steps_per_epoch).skip(start))
      relations[seed] = run.experiment.with_relations
  began = time.perf_counter()
  stop.at_steps = True
  first_step = int(runs[0].state.step) + 1
  for step_in_epoch in tqdm.trange(start, steps_per_epoch, initial=start, total=steps_per_epoch,
                                   desc=f"epoch {epoch}/{config.num_epochs}, {len(runs)} runs",
                                   unit="batch"):
    step = first_step + step_in_epoch - start
    seed_batches = {seed: relations[seed](next(made), split) for seed, made in batches.items()}
    for program in programs:
      program.step(seed_batches, step)
    done = step_in_epoch + 1
    asked = stop.asked(step)
    save = done % config.checkpoint_every_steps == 0 and done < steps_per_epoch
    if asked or save or len(programs[0].unread) == config.metrics_every_steps:
      programs = _read_statistics(programs, epoch)
      if not programs:  # every run frozen
        break
    if asked:
      for program in programs:
        program.unstack()
      raise _save_all_and_stop(runs, stop)
    if save:
      for program in programs:
        program.unstack()
        for run in program.runs:
          run.checkpoints.save("latest", run.state, run.progress.to_json())
  programs = _read_statistics(programs, epoch)
  for program in programs:
    program.unstack()
  stop.at_steps = False
  seconds = time.perf_counter() - began
  for program in programs:
    for run, validated in zip(program.runs, _validate(program.runs, epoch)):
      if validated is not None:
        run.state, run.progress = train.end_epoch(run.experiment, run.state, run.progress,
                                                  run.checkpoints, run.log, seconds,
                                                  label=f"{run.name}: ", validated=validated)


def _validate(runs: list, epoch: int) -> list:
  """Each run's (validation results, Collapse, seconds: its share of the time) after
  `epoch` epochs, the runs (of one loss setting) validated at once: their states stacked,
  each seed's validation batches made once and the loss of every run's one vmapped
  program, the split embedded in one pass and every run's scores in one program per
  block. None for a run whose validation loss, embeddings or scores are not finite: it
  is frozen."""
  began = time.perf_counter()
  experiment = runs[0].experiment
  split = experiment.validation_split
  states = together.stack([run.state for run in runs])
  _, eval_loss, mesh = compiled_steps(experiment.settings.loss, len(runs),
                                      tuple(experiment.devices.mesh.devices.flat))
  draws = [run.experiment.validation_draws(epoch) for run in runs]
  stacked = jax.device_put(states, mesh.runs)
  keys = jax.device_put(jnp.stack([key for key, _ in draws]), mesh.runs)
  made = {seed: experiment.validation_batches(seed) for _, seed in draws}
  losses = []
  for batches in zip(*made.values()):
    of_seed = {seed: experiment.with_relations(batch, split)
               for seed, batch in zip(made, batches)}
    losses.append(eval_loss(stacked, together.pad_and_stack([of_seed[seed] for _, seed in draws]),
                            keys))
  embedded = experiment.embed_split_runs(states, split)
  validated = []
  for run, loss, split_embedded, s in zip(runs, experiment_lib.mean_loss(losses), embedded,
                                          experiment.runs_scores(embedded)):
    try:
      validated.append(run.experiment.validation_results(
          experiment_lib.finite_validation_loss(loss), split_embedded, s,
          run.progress.statistic_means()))
    except FloatingPointError as error:
      run.freeze(f"{error} after epoch {epoch}; this run is frozen, its checkpoints kept in "
                 f"{run.checkpoints.root}")
      validated.append(None)
  seconds = (time.perf_counter() - began) / len(runs)
  return [None if measured is None else (*measured, seconds) for measured in validated]


def _test(runs: list, group_size: int) -> list:
  """Tests each run's best checkpoint, the runs of each loss setting embedding the test split in
  one pass and scoring it in one program per block; returns each run's results (written to
  its results.json), or None for a run frozen before its first epoch ended."""
  scored = {}
  for group in _programs_of([run for run in runs if run.checkpoints.step("best") is not None],
                            group_size):
    experiment = group[0].experiment
    states = together.stack([train.best_state(run.experiment, run.checkpoints) for run in group])
    embedded = experiment.embed_split_runs(states, experiment.test_split)
    scored.update(zip(group, zip(embedded, experiment.runs_scores(embedded))))
  results = []
  for run in runs:
    if run not in scored:
      logging.warning("%s: frozen before its first epoch ended, so it has no results", run.name)
      results.append(None)
    else:
      results.append(train.evaluate_best(run.experiment, run.checkpoints, run.workdir,
                                         frozen=run.frozen, scored=scored[run]))
  return results


def _read_statistics(programs: list, epoch: int) -> list:
  """Reads every program's statistics; returns the programs without their frozen runs
  (restacked; a program left with none is dropped)."""
  kept = []
  for program in programs:
    if not program.read_statistics(epoch):
      kept.append(program)
      continue
    program.unstack()
    going = [run for run in program.runs if not run.frozen]
    if going:
      kept.append(Program(going))
  return kept
