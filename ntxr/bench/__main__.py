"""Benchmarks of the hot paths (JAX and NumPy; PyTorch only with --torch_loop and in the
encoders job).

  python -m ntxr.bench                                   # loss kernels and score matrices
  python -m ntxr.bench --grid=accelerator --json=bench.json
  python -m ntxr.bench --jobs=steps --torch_loop --repeats=3
  python -m ntxr.bench --jobs=loop --widths=default --repeats=5
  python -m ntxr.bench --jobs=parts --strategies=random,hard_text,semihard_cross
  python -m ntxr.bench --jobs=together --grid=accelerator --widths=default,paper
  python -m ntxr.bench --jobs=union --widths=default --union_seeds=2
  python -m ntxr.bench --jobs=encoder_memory --grid=accelerator --pairs=passt+roberta
  python -m ntxr.bench --jobs=encoders --grid=accelerator --pairs=passt+roberta --encoder_batch=8
  python -m ntxr.bench --jobs=negatives --strategies=semihard_cross,hard_audio

On an accelerator, the jobs docs/benchmarks/ keeps (--results_dir=docs/benchmarks each;
encoders also needs the test extra's reference packages):

  python -m ntxr.bench --grid=accelerator --jobs=kernels,scores --torch_loop
  python -m ntxr.bench --grid=accelerator --jobs=steps,loop,together --torch_loop \\
      --step_frames=320,1600 --widths=default,paper
  python -m ntxr.bench --grid=accelerator --jobs=encoder_memory,encoders
  python -m ntxr.bench --grid=accelerator --jobs=negatives

After encoder_memory in the same command, the encoders job runs at the largest batch, up
to the grid's, that encoder_memory finds every pair fits. Without --encoder_batch (which
sets the batch), a pair's batch is halved while PyTorch's step runs out of memory.

Jobs (--jobs, comma-separated): kernels (ntxr/bench/kernels.py), parts (kernel_parts.py:
where a kernel's time goes), scores (score_matrices.py), steps (training_steps.py), loop
(training_loop.py: the training loop's time outside the step), together
(together_steps.py: R runs' steps as one vmapped program), union (union_program.py: an
ablation's strategies as one program over their union against one program per strategy,
for --strategies), encoders (encoder_steps.py: a pretrained encoder pair's training step
against the publishers' PyTorch code, for --pairs; needs the test extra's PyTorch
packages; a framework that runs out of memory is recorded so), encoder_memory
(encoder_steps.py: the memory XLA plans for that step at the grid's sizes and batch (or
--encoder_batch) and half that batch, compiled from shapes and not run, so a CPU states
what `--grid=accelerator`'s step needs, and a device the largest batch it holds),
negatives (negatives.py: a step's memory per device and time with --config.negatives
gather and ring, for --strategies; run alone, it splits a CPU into 8 devices). Each
prints a Markdown table; --json writes every row with the device and the command line,
and --results_dir one file per job, named by device kind and job, as docs/benchmarks/
keeps them (`ntxr.bench.results`; `python -m ntxr.bench.page` makes docs/benchmarks.md
from them).
"""

import os
import sys

from ntxr import ctrl_c

if __name__ == "__main__":  # first: a Ctrl-C while the imports below load costs one line
  ctrl_c.exit_at_once(ctrl_c.AGAIN)

# pylint: disable=wrong-import-position
from absl import app
from absl import flags

from ntxr import cli, command, files, specs
from ntxr.bench import ENCODER_PAIRS, SHAPE, WIDTHS, results
# pylint: enable=wrong-import-position

GRIDS = {
    # kernels: (N, T, W, E); scores: (kind, N, T, W, E); steps: batch sizes; encoders:
    # the encoders' sizes (encoder_steps.SIZES), batch, samples at 32 kHz and tokens.
    "cpu": dict(
        kernels=[(32, 250, 12, 300), (32, 500, 15, 300), (64, 250, 12, 300),
                 (32, 1600, 20, 300)],  # the last: Clotho's longest clips, padded
        scores=[("cross", 64, 250, 12, 300), ("cross", 256, 500, 20, 300),
                ("audio-audio", 32, 500, 500, 300), ("evaluation", 96, 1500, 20, 300)],
        steps=[32], together=[1, 2, 4], union_seeds=1,
        encoders=dict(sizes="tiny", batch=2, samples=32000, words=16),
        negatives=dict(batches=[256, 1024, 4096], timed_up_to=256)),
    "accelerator": dict(
        kernels=[(32, 250, 12, 300), (32, 500, 15, 300), (32, 1600, 20, 300),
                 (128, 500, 20, 300), (256, 500, 20, 300), (1024, 250, 12, 300)],
        scores=[("cross", 256, 500, 20, 300), ("audio-audio", 256, 1500, 1500, 300),
                ("evaluation", 1045, 1500, 20, 300)],
        steps=[32, 256], together=[1, 4, 8, 16, 24], union_seeds=3,
        encoders=dict(sizes="published", batch=32, samples=320000, words=32),
        negatives=dict(batches=[256, 1024, 4096], timed_up_to=4096)),
}
JOBS = ("kernels", "parts", "scores", "steps", "loop", "together", "union", "encoder_memory",
        "encoders", "negatives")  # the order they run in
HOST_DEVICES = 8  # the negatives job's devices on a CPU

FLAGS = flags.FLAGS


def define_flags() -> None:
  """This command's flags (defined where it starts, not on import)."""
  cli.define_strategies(default_all=True)
  cli.define_json()
  flags.DEFINE_list("jobs", ["kernels", "scores"], f"which of {JOBS} to run")
  flags.DEFINE_enum("grid", "cpu", sorted(GRIDS),
                    "shape grid: 'cpu' fits 2 cores; 'accelerator' is paper scale")
  flags.DEFINE_string("shapes", None, "kernel shapes N:T:W:E,... instead of the grid's")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                    "embedding dtype of the kernels and score matrices; the "
                    "encoders' compute dtype of the training steps")
  flags.DEFINE_integer("repeats", 10, "timed calls per measurement", lower_bound=1)
  flags.DEFINE_integer("loop_max_n", 64,
                    "largest N at which the per-anchor loop is timed")
  flags.DEFINE_bool("torch_loop", False,
                    "also time the authors' structure in PyTorch (on its GPU "
                    "where it sees one, else the CPU)")
  flags.DEFINE_list("widths", list(WIDTHS),
                    f"CRNN widths of the training-step job, of {list(WIDTHS)}")
  flags.DEFINE_list("step_frames", [str(SHAPE["frames"])],
                    "frames per clip of the jobs that train (steps, loop, together, union, "
                    "negatives): each job runs at each")
  flags.DEFINE_integer("loop_steps", 30, "steps per loop in the loop job",
                    lower_bound=2)
  flags.DEFINE_list("runs", None, "run counts of the together job (default: the grid's)")
  flags.DEFINE_integer("union_seeds", None, "runs per strategy in the union job (default: "
                       "the grid's)", lower_bound=1)
  flags.DEFINE_list("pairs", list(ENCODER_PAIRS),
                    f"encoder pairs of the encoders and encoder_memory jobs, of "
                    f"{list(ENCODER_PAIRS)}")
  flags.DEFINE_integer("encoder_batch", None, "batch of the encoders and encoder_memory "
                       "jobs (default: the grid's; the encoders job after encoder_memory "
                       "on a device: the largest up to it that every pair fits; unset, a "
                       "pair's is halved while PyTorch runs out of memory)",
                       lower_bound=2)
  flags.DEFINE_string("device_kind", None,
                    "device name for the output (default: JAX's)")
  flags.DEFINE_string("results_dir", None,
                    "write each job's rows to DIR/<device>_<job>.json, "
                    "replacing that file (docs/benchmarks keeps them)")


def whole_numbers(flag: str, given: list, per_item: int = 1) -> list:
  """The positive whole numbers of list flag `flag` (`given`, its items), each item
  `per_item` of them joined by ":" (a tuple then); ValueError naming a malformed item."""
  parsed = []
  for item in given:
    numbers = item.split(":")
    if len(numbers) != per_item or not all(n.isdigit() and int(n) > 0 for n in numbers):
      form = "N:T:W:E, four" if per_item == 4 else "a"
      raise ValueError(f"--{flag}: {item!r} is not {form} positive whole number"
                       + ("s" if per_item > 1 else ""))
    parsed.append(tuple(int(n) for n in numbers) if per_item > 1 else int(numbers[0]))
  return parsed


def main(argv):
  command.start(argv)
  for name, given, known in (("jobs", FLAGS.jobs, JOBS),
                             ("widths", FLAGS.widths, WIDTHS),
                             ("pairs", FLAGS.pairs, ENCODER_PAIRS)):
    unknown = sorted(set(given) - set(known))
    if unknown:
      command.exit_with(f"--{name}: unknown {unknown}; choose from {list(known)}", 2)
  try:
    strategies = cli.chosen("strategies", list(specs.STRATEGIES), list(specs.STRATEGIES))
    shapes = whole_numbers("shapes", FLAGS.shapes.split(","), 4) if FLAGS.shapes else None
    runs = whole_numbers("runs", FLAGS.runs) if FLAGS.runs else None
    step_frames = whole_numbers("step_frames", FLAGS.step_frames)
    if min(step_frames) < 4:
      raise ValueError(f"--step_frames: {min(step_frames)} frames are fewer than the 4 the "
                       "CRNN pools into one")
    step_shapes = [dict(SHAPE, frames=frames) for frames in step_frames]
  except ValueError as error:
    command.exit_with(error, 2)
  if "negatives" in FLAGS.jobs:
    if len(FLAGS.jobs) > 1:
      command.exit_with("--jobs=negatives runs alone: on a CPU it splits the host into "
                        f"{HOST_DEVICES} devices, which the other jobs would step on", 2)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                               f"platform_device_count={HOST_DEVICES}").strip()
  torch_too = FLAGS.torch_loop or "encoders" in FLAGS.jobs
  if torch_too:  # PyTorch shares the GPU: JAX allocates as it goes, not 75% at once
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  # pylint: disable=import-outside-toplevel  (JAX loads after --help and the flags' checks)
  import jax.numpy as jnp
  from ntxr.bench import (encoder_steps, kernel_parts, kernels, negatives, score_matrices,
                          timing, together_steps, training_loop, training_steps,
                          union_program)
  from ntxr.encoders import references
  if "encoders" in FLAGS.jobs:  # before any job runs
    lacking = references.missing(e for pair in FLAGS.pairs for e in ENCODER_PAIRS[pair])
    if lacking:
      command.exit_with(f"the encoders job times the publishers' PyTorch code, which needs "
                        f"{', '.join(lacking)}: pip install -e '.[test]'", 1)
  grid, dtype = GRIDS[FLAGS.grid], jnp.dtype(FLAGS.dtype)
  device = FLAGS.device_kind or timing.device_name()
  about = results.provenance(device, sys.argv[1:])
  if torch_too:
    about["torch_device"] = str(timing.torch_device())
  report = dict(about)
  print(f"device: {device}" + (f", PyTorch on {about['torch_device']}" if torch_too
                                else "") + "\n")
  shapes = shapes or grid["kernels"]
  encoders = dict(grid["encoders"], batch=FLAGS.encoder_batch or grid["encoders"]["batch"])
  widths = {name: WIDTHS[name] for name in FLAGS.widths}
  def at_each_length(job):  # the rows of job(shape) at each --step_frames
    return lambda: [row for shape in step_shapes for row in job(shape)]

  jobs = {  # job: (its key in --json, its rows, its table)
      "kernels": ("loss", lambda: kernels.run(shapes, strategies, dtype, FLAGS.repeats,
                                              FLAGS.loop_max_n, FLAGS.torch_loop),
                  kernels.format_table),
      "parts": ("parts", lambda: kernel_parts.run(shapes, strategies, dtype,
                                                  FLAGS.repeats), kernel_parts.format_table),
      "scores": ("scores", lambda: score_matrices.run(grid["scores"], dtype, FLAGS.repeats),
                 score_matrices.format_table),
      "steps": ("steps", at_each_length(lambda shape: training_steps.run(
          widths, grid["steps"], FLAGS.repeats, FLAGS.torch_loop, shape=shape,
          dtype=FLAGS.dtype)), training_steps.format_table),
      "loop": ("loop", at_each_length(lambda shape: training_loop.run(
          widths, grid["steps"], FLAGS.loop_steps, shape=shape, repeats=FLAGS.repeats,
          dtype=FLAGS.dtype)), training_loop.format_table),
      "together": ("together", at_each_length(lambda shape: together_steps.run(
          widths, runs or grid["together"], grid["steps"][0],
          FLAGS.repeats, shape=shape, dtype=FLAGS.dtype)), together_steps.format_table),
      "union": ("union", at_each_length(lambda shape: union_program.run(
          widths, strategies, FLAGS.union_seeds or grid["union_seeds"], grid["steps"][0],
          FLAGS.repeats, shape=shape, dtype=FLAGS.dtype)), union_program.format_table),
      "encoders": ("encoders", lambda: encoder_steps.run(
          FLAGS.pairs, **dict(encoders, batch=FLAGS.encoder_batch or
                              encoder_steps.batch_every_pair_fits(
                                  report.get("encoder_memory", []), encoders["batch"])),
          repeats=FLAGS.repeats, device=device, halve=FLAGS.encoder_batch is None),
                   encoder_steps.format_table),
      "encoder_memory": ("encoder_memory", lambda: encoder_steps.plan(
          FLAGS.pairs, **encoders, device=device), encoder_steps.format_memory_table),
      "negatives": ("negatives", at_each_length(lambda shape: negatives.run(
          grid["negatives"]["batches"], strategies, widths[next(iter(widths))], shape,
          FLAGS.repeats, grid["negatives"]["timed_up_to"])), negatives.format_table),
  }
  for job in JOBS:
    if job not in FLAGS.jobs:
      continue
    key, run, table = jobs[job]
    try:
      report[key] = run()
    except ValueError as error:  # a job this machine cannot run
      command.exit_with(error, 1)
    print(table(report[key]) + "\n")
    if FLAGS.results_dir:  # each job's file as soon as it is measured
      print(results.write(FLAGS.results_dir, job, report[key], about) + "\n")
  if FLAGS.json:
    files.write_json(FLAGS.json, report)

if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=command.parse_flags)
