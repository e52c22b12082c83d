"""What the training loop (`ntxr.train`) steps, validates and tests as one: a run alone
(`Single`), or the runs of one loss setting stacked on a runs axis (`Stacked`, see
`ntxr.together`). The loop drives both the same way:

  program = programs.of(runs)              # Single for one run, Stacked for several
  batch = program.put({seed: numpy batch with its relations})
  program.step(batch, step)                # dispatched, not waited for
  reads = program.read()                   # per run, [(step, {statistic: float})]
  program.unstack()                        # each run's state its own again
  program.validate(epoch)                  # per run, its validation or why it failed

A Single program is the run's own jitted step, data-parallel over its experiment's
devices, with no runs axis (vmapping one run costs the CPU 1.2x a step). A Stacked
program steps R runs as one vmapped program over a (runs, data) mesh; each run keeps its
own keys, learning rate and batches (its seed's, padded to the program's longest).
"""

import dataclasses
import functools
import time
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from ntxr import checkpoints as checkpoints_lib, experiment as experiment_lib
from ntxr import metrics_log, parallel, settings, steps, together

@dataclasses.dataclass(eq=False)  # each run is itself, whatever its fields
class Run:
  """One run of the loop: its experiment, files, and where it stands (its state while
  it is not stacked in a program). `label` starts its printed lines (its name, where
  several train at once)."""
  experiment: experiment_lib.Experiment
  workdir: str
  checkpoints: checkpoints_lib.Checkpoints
  log: metrics_log.MetricsLog
  state: steps.TrainState
  progress: Any  # ntxr.train's Progress (train imports this module)
  label: str = ""
  frozen: Optional[str] = None  # why it stopped training early, if its loss became NaN

  @property
  def name(self) -> str:
    return f"{self.experiment.settings.run_name} seed {self.seed}"

  @property
  def seed(self) -> int:
    return self.experiment.settings.seed

  @property
  def steps_key(self) -> jax.Array:
    """The key step k's draws fold k - 1 into, alone or stacked with other runs."""
    return jax.random.key(self.seed + 1)

  @property
  def training(self) -> bool:
    return (not self.frozen and not self.progress.stopped_early
            and self.progress.epoch < self.experiment.settings.optimiser.num_epochs)

  @property
  def position(self) -> tuple:
    return self.progress.epoch, self.progress.step_in_epoch

  def freeze(self, why: str) -> None:
    """Stops this run's training early (its loss, gradient or embeddings became
    non-finite), keeping its checkpoints."""
    self.frozen = why
    logging.warning("%s: %s", self.name, why)


class Single:
  """One run's program: its experiment's step on its seed's batch."""

  def __init__(self, run: Run):
    self.runs = [run]
    self.unread = steps.UnreadStatistics()
    self._key = run.steps_key

  def put(self, seed_batches: dict) -> dict:
    """The run's seed's batch (numpy, with its relations) sharded over its devices."""
    run, = self.runs
    return run.experiment.devices.shard(seed_batches[run.seed])

  def step(self, batch: dict, step: int) -> None:
    """Dispatches the step numbered `step` on a batch `put` made."""
    run, = self.runs
    run.state, statistics = run.experiment.train_step(
        run.state, batch, jax.random.fold_in(self._key, step - 1))
    self.unread.add(step, statistics)

  def read(self) -> list:
    return [self.unread.read()]

  def unstack(self) -> None:
    """Nothing to do: the run's state is its own."""

  def validate(self, epoch: int) -> list:
    """[(validation, Collapse, seconds)] after `epoch` epochs, or [FloatingPointError]
    where the validation loss or scores are not finite."""
    run, = self.runs
    start = time.perf_counter()
    try:
      validation, collapse = run.experiment.validate(run.state,
                                                     run.progress.statistic_means(), epoch)
    except FloatingPointError as error:
      return [error]
    return [(validation, collapse, time.perf_counter() - start)]



@functools.lru_cache(maxsize=None)
def stacked_steps(loss: settings.Loss, runs: int, devices: tuple) -> tuple:
  """(`together.train_step`, its states donated, and `together.eval_loss` for one loss
  setting, jitted over a RunsAndData mesh of the devices; the mesh)."""
  mesh = parallel.RunsAndData(runs, devices)
  return (mesh.jit(functools.partial(together.train_step, loss=loss), donate_argnums=0),
          mesh.jit(functools.partial(together.eval_loss, loss=loss)), mesh)


class Stacked:
  """The runs of one loss setting stepped as one: their states stacked while the epoch's
  steps run, their statistics read together."""

  def __init__(self, runs: list):
    self.runs = runs
    experiment = runs[0].experiment
    self._step, self._eval_loss, self._mesh = stacked_steps(
        experiment.settings.loss, len(runs), tuple(experiment.devices.mesh.devices.flat))
    self.states = jax.device_put(together.stack([run.state for run in runs]), self._mesh.runs)
    self.seed_keys = jax.device_put(jnp.stack([run.steps_key for run in runs]),
                                    self._mesh.runs)
    self.unread = steps.UnreadStatistics()

  def put(self, seed_batches: dict) -> dict:
    """Each run's seed's batch (numpy, with its relations), padded and stacked [R, ...]."""
    return together.pad_and_stack([seed_batches[run.seed] for run in self.runs])

  def step(self, batch: dict, step: int) -> None:
    """Dispatches the step numbered `step` of every run on a batch `put` made."""
    keys = jax.vmap(jax.random.fold_in, (0, None))(self.seed_keys, step - 1)
    self.states, statistics = self._step(self.states, batch, keys)
    self.unread.add(step, statistics)

  def read(self) -> list:
    return self.unread.read_runs(len(self.runs))

  def unstack(self) -> None:
    """Gives each run its state as the program's steps left it, replicated over its
    experiment's devices as a run alone's is."""
    for run, state in zip(self.runs, together.unstack(self.states)):
      run.state = run.experiment.devices.replicate(state)

  def validate(self, epoch: int) -> list:
    """Each run's (validation, Collapse, seconds: its share of the time) after `epoch`
    epochs, or the FloatingPointError of a run whose validation loss or scores are not
    finite; the runs validated at once: their states stacked, each seed's validation
    batches made once and every run's loss one vmapped program, the split embedded in
    one pass and every run's scores in one program per block."""
    began = time.perf_counter()
    experiment = self.runs[0].experiment
    split = experiment.validation_split
    states = together.stack([run.state for run in self.runs])
    draws = [run.experiment.validation_draws(epoch) for run in self.runs]
    stacked = jax.device_put(states, self._mesh.runs)
    made = {seed: experiment.validation_batches(seed) for _, seed in draws}
    losses = []
    for index, batches in enumerate(zip(*made.values())):
      of_seed = {seed: experiment.relations.add(batch, split)
                 for seed, batch in zip(made, batches)}
      keys = jnp.stack([jax.random.fold_in(key, index) for key, _ in draws])  # as apart
      losses.append(self._eval_loss(
          stacked, together.pad_and_stack([of_seed[seed] for _, seed in draws]),
          jax.device_put(keys, self._mesh.runs)))
    evaluation = experiment.evaluation
    embedded = evaluation.embed_split_runs(states, split)
    validated = []
    for run, loss, split_embedded, s in zip(self.runs, experiment_lib.mean_loss(losses),
                                            embedded, evaluation.runs_scores(embedded)):
      try:
        validated.append(run.experiment.evaluation.validation_results(
            experiment_lib.finite_validation_loss(loss), split_embedded, s,
            run.progress.statistic_means()))
      except FloatingPointError as error:
        validated.append(error)
    seconds = (time.perf_counter() - began) / len(self.runs)
    return [v if isinstance(v, FloatingPointError) else (*v, seconds) for v in validated]


def of(runs: list):
  """The program of `runs` (of one loss setting): Single for one, else Stacked."""
  return Single(runs[0]) if len(runs) == 1 else Stacked(runs)


def test_scores(runs: list, best_state: Callable) -> list:
  """Each run's (test split embedded by its best checkpoint, best_state(run), their
  scores [clips, captions]) for runs of one loss setting: the split embedded in one
  pass, every run's scores in one program per block. [None] for a run alone, which
  tests itself (`Evaluation.test`)."""
  if len(runs) == 1:
    return [None]
  evaluation = runs[0].experiment.evaluation
  states = together.stack([best_state(run) for run in runs])
  embedded = evaluation.embed_split_runs(states, evaluation.test_split)
  return list(zip(embedded, evaluation.runs_scores(embedded)))


def _by_loss(experiments: list, items: list) -> list:
  """The items (one per experiment) in groups of one loss setting, in order."""
  groups = {}
  for experiment, item in zip(experiments, items):
    groups.setdefault(experiment.settings.loss, []).append(item)
  return list(groups.values())


def grouped(runs: list, group_size: int) -> list:
  """The runs in the groups that step, validate and test as one: by loss setting, at
  most group_size runs each (0: no limit), groups and runs in order."""
  return [members[first:first + (group_size or len(members))]
          for members in _by_loss([run.experiment for run in runs], runs)
          for first in range(0, len(members), group_size or len(members))]


def run_bytes(experiment: experiment_lib.Experiment) -> tuple:
  """An estimate of one run's bytes while it steps: (its train state: parameters, Adam's
  moments, BatchNorm statistics; its step's: XLA's temporary memory for a step at the
  largest length bucket, and the batch). Compiles that step once, without running it."""
  data = experiment.settings.data
  size, frames = experiment.settings.optimiser.batch_size, data.frame_buckets[-1]
  batch = experiment.relations.add(dict(
      audio=np.zeros((size, frames, experiment.corpus.feature_width), np.float32),
      audio_mask=np.ones((size, frames), bool),
      tokens=np.ones((size, data.max_tokens), np.int32),
      token_mask=np.ones((size, data.max_tokens), bool),
      audio_id=np.arange(size, dtype=np.int32) % 2), experiment.training_split)
  state = experiment.initial_state
  step = jax.jit(functools.partial(steps.train_step, loss=experiment.settings.loss,
                                   mesh=experiment.devices.mesh))
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
  limit = parallel.device_memory(devices[0])
  if limit is None:
    return
  for members in _by_loss(experiments, experiments):
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
        f"{count} runs of {members[0].settings.run_name} trained together need about "
        f"{need(count) / 2**30:.1f} GiB of each device's {limit / 2**30:.1f} GiB: {advice}")
