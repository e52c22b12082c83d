"""The benchmark's reference loop computes the kernel's loss, and its jobs and command run."""

import functools
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import bench, ctrl_c, models, sampling, settings, steps, together
from ntxr.bench import __main__ as bench_command
from ntxr.bench import encoder_steps, kernel_parts, kernels, negatives, reference, score_matrices
from ntxr.bench import timing
from ntxr.bench import together_steps, training_loop, training_steps, union_program

# The encoders job and its states start from the publishers' PyTorch modules.
NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed (pip install -e '.[test]')")


@pytest.mark.parametrize("strategy", [s for s in sampling.STRATEGIES if s != "random"])
def test_reference_loop_computes_the_kernel_loss(strategy):
  audio, text, audio_ids = timing.embeddings(12, 9, 4, 8, np.float32)
  audio_ids[3] = audio_ids[2]  # at least one clip with two captions
  loop, *_ = reference.per_anchor_loss(reference.JAX_OPS, audio, text, audio_ids, strategy,
                                       0.5, np.random.default_rng(0))
  kernel = sampling.triplet_loss(audio, text, jax.numpy.asarray(audio_ids), strategy=strategy)
  np.testing.assert_allclose(loop, kernel, rtol=1e-5)


def test_kernel_flops_count_the_selected_pairs():
  # n=4 pairs of a 5-frame clip and a 3-word caption, e=7: one pair is 2*5*3*7 FLOPs.
  assert kernels.kernel_flops("random", 4, 5, 3, 7) == 12 * 210 * 3       # 12 pairs, fwd+2 bwd
  assert kernels.kernel_flops("full_batch", 4, 5, 3, 7) == 16 * 210 * 3   # all 16, fwd+2 bwd
  assert kernels.kernel_flops("hard_cross", 4, 5, 3, 7) == 16 * 210 + 12 * 210 * 3
  # hard_audio: 10 audio-audio pairs (upper triangle with diagonal) of 2*5*5*7 FLOPs.
  assert kernels.kernel_flops("hard_audio", 4, 5, 3, 7) == 10 * 350 + 12 * 210 * 3


def test_matmul_yardstick_is_bounded_whatever_the_flops(monkeypatch):
  # A petaflop of work is timed on at most 8 x 4096 x 4096 outputs, then scaled.
  timed = []
  def one_second(fn, a, b, repeats):
    timed.append((a.shape, b.shape))
    return 1.0
  monkeypatch.setattr(timing, "time_call", one_second)
  seconds = timing.matmul_seconds(1e15, 16, np.float32, repeats=1)
  assert timed == [((8, 4096, 16), (8, 16, 4096))]
  assert seconds == pytest.approx(1e15 / (2 * 16 * 4096 * 4096 * 8))
  assert timing.matmul_seconds(2 * 16 * 64 * 64, 16, np.float32, repeats=1) == 1.0
  assert timed[1] == ((1, 64, 16), (1, 16, 64))


# The encoders job and its states start from the publishers' PyTorch modules.
NEEDS_TORCH = pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                                 reason="PyTorch is not installed (pip install -e '.[test]')")

def test_jobs_give_one_row_each():
  rows = kernels.run([(4, 6, 3, 8)], ["random", "hard_text"], np.float32, repeats=1,
                     loop_max_n=4, torch_loop=False)
  assert [r["strategy"] for r in rows] == ["random", "hard_text"]
  assert all(r["kernel_ms"] > 0 and r["speedup"] > 0 for r in rows)
  assert "| hard_text | 4 | 6 | 3 | 8 |" in kernels.format_table(rows)
  rows = kernel_parts.run([(4, 6, 3, 8)], ["random"], np.float32, repeats=1)
  assert [(r["strategy"], r["N"]) for r in rows] == [("random", 4)]
  assert all(rows[0][f"{part}_ms"] > 0 for part in ("kernel", "forward", "products", "gemm",
                                                      "matmul"))
  assert "| random | 4 | 6 | 3 | 8 |" in kernel_parts.format_table(rows)
  rows = score_matrices.run([("cross", 4, 6, 3, 8), ("audio-audio", 4, 6, 6, 8),
                             ("evaluation", 4, 6, 5, 8)], np.float32, 1)
  assert [r["kind"] for r in rows] == ["cross", "audio-audio", "evaluation"]
  assert all(r["ms"] > 0 and r["matmul_fraction"] > 0 and r["tiling"] == "rows" for r in rows)
  assert "| evaluation | 4 | 6 | 5 | 8 | rows |" in score_matrices.format_table(rows)
  rows = training_steps.run({"narrow": (2, 4, 4, 4, 4)}, [4], repeats=1, torch_too=False,
                            shape=dict(frames=8, words=3, mel_bands=64, vocab=10),
                            dtype="bfloat16")
  assert [(r["width"], r["channels"], r["n"], r["frames"], r["dtype"]) for r in rows] == [
      ("narrow", [2, 4, 4, 4, 4], 4, 8, "bfloat16")]
  assert rows[0]["jax_ms"] > 0 and rows[0]["torch_ms"] is None
  assert "| narrow | (2, 4, 4, 4, 4) | 4 | 8 | bfloat16 |" in training_steps.format_table(rows)
  rows = training_loop.run({"narrow": (2, 4, 4, 4, 4)}, [4], 3,
                           shape=dict(frames=8, words=3, mel_bands=64, vocab=10), repeats=1)
  assert [(r["loop"], r["read_every"], r["prefetch"], r["steps"]) for r in rows] == [
      ("every step", 1, 1, 3), ("every 10, prefetched", 10, 2, 3)]
  assert all(r["loop_ms"] > 0 and r["alone_ms"] > 0 and r["outside_share"] < 1 for r in rows)
  assert "| narrow | 4 | 8 | every step |" in training_loop.format_table(rows)
  rows = together_steps.run({"narrow": (2, 4, 4, 4, 4)}, [2], 4, repeats=1,
                            shape=dict(frames=8, words=3, mel_bands=64, vocab=10),
                            dtype="bfloat16")  # one run's step as the steps job's
  assert [(r["width"], r["runs"], r["n"]) for r in rows] == [("narrow", 2, 4)]
  assert rows[0]["together_ms"] > 0 and rows[0]["speedup"] == pytest.approx(
      2 * rows[0]["alone_ms"] / rows[0]["together_ms"])
  assert "| narrow | 4 | 8 | 2 |" in together_steps.format_table(rows)


def test_the_negatives_job_gives_each_way_on_eight_devices():
  """gather, ring and the local program at two global batches on 8 host devices (a child
  process: XLA reads the device count at start-up), timed at the first only."""
  code = ("import json, os\n"
          "os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'\n"
          "from ntxr.bench import negatives\n"
          "rows = negatives.run([16, 32], ['hard_audio'], (2, 4, 4, 4, 4), dict(frames=8, "
          "words=3, mel_bands=64, vocab=10), 1, 16)\n"
          "print(json.dumps(dict(rows=rows, table=negatives.format_table(rows))))")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.returncode == 0, done.stderr[-3000:]
  found = json.loads(done.stdout.splitlines()[-1])
  rows = found["rows"]
  assert [(r["way"], r["batch"], r["devices"], r["local_batch"]) for r in rows] == [
      (way, batch, 8, batch // 8) for batch in (16, 32) for way in negatives.WAYS]
  assert all((r["ms"] is not None) == (r["batch"] == 16) for r in rows)
  assert all(r["ms"] is None or r["ms"] > 0 for r in rows)
  assert all(negatives.per_device_mib(r) > 0 for r in rows)
  assert "| hard_audio | 32 | 8 | 8 | local |" in found["table"]  # batch, frames, devices
  assert "| 1.00 | - |" in found["table"]


def test_command_writes_json_and_imports_no_tensorflow(tmp_path):
  out = tmp_path / "bench.json"
  code = ("import sys; from absl import app; from ntxr.bench import __main__ as bench\n"
          "bench.define_flags()\n"
          "try: app.run(bench.main)\nexcept SystemExit as e: assert not e.code, e.code\n"
          "assert 'tensorflow' not in sys.modules and 'librosa' not in sys.modules")
  subprocess.run([sys.executable, "-c", code, "--jobs=kernels,steps,encoder_memory",
                  "--shapes=4:6:3:8", "--strategies=random", "--repeats=1",
                  "--device_kind=test-cpu", "--widths=default", "--step_frames=8,16",
                  "--pairs=passt+roberta", "--encoder_batch=4", f"--json={out}"], check=True)
  result = json.loads(out.read_text())
  assert result["device"] == "test-cpu" and [r["strategy"] for r in result["loss"]] == ["random"]
  assert [(r["width"], r["frames"]) for r in result["steps"]] == [("default", 8),
                                                                  ("default", 16)]
  assert [(r["pair"], r["batch"]) for r in result["encoder_memory"]] == [
      ("passt+roberta", 4), ("passt+roberta", 2)]  # --encoder_batch, not the grid's 2


def test_a_malformed_shape_run_count_or_job_costs_one_line(tmp_path):
  assert bench_command.whole_numbers("shapes", ["4:6:3:8", "2:4:3:8"], 4) == [
      (4, 6, 3, 8), (2, 4, 3, 8)]
  for flag, given, per_item, message in [
      ("shapes", ["4:6:3"], 4, "--shapes: '4:6:3' is not N:T:W:E, four positive whole numbers"),
      ("shapes", ["4:6:3:0"], 4, "'4:6:3:0' is not N:T:W:E"),
      ("runs", ["1", "a"], 1, "--runs: 'a' is not a positive whole number"),
      ("step_frames", ["320", "0"], 1, "--step_frames: '0' is not a positive whole number")]:
    with pytest.raises(ValueError, match=re.escape(message)):
      bench_command.whole_numbers(flag, given, per_item)
  for flag, message in [
      ("--shapes=256x1500", "--shapes: '256x1500' is not N:T:W:E, four positive whole numbers"),
      ("--jobs=kernel", "--jobs: unknown ['kernel']; choose from ['kernels', 'parts', "
       "'scores', 'steps', 'loop', 'together', 'union', 'encoder_memory', 'encoders', "
       "'negatives']"),
      ("--jobs=negatives,kernels", "--jobs=negatives runs alone: on a CPU it splits the "
       "host into 8 devices, which the other jobs would step on"),
      ("--step_frames=320,3", "--step_frames: 3 frames are fewer than the 4 the CRNN pools "
       "into one")]:
    done = subprocess.run([sys.executable, "-m", "ntxr.bench", flag,
                           f"--json={tmp_path}/bench.json"], capture_output=True, text=True,
                          check=False)
    assert (done.returncode, done.stderr) == (2, f"error: {message}\n")
  assert not os.listdir(tmp_path)


def test_ctrl_c_costs_one_line_and_writes_nothing(tmp_path):
  """Ctrl-C while the first job measures: status 130, one line, no traceback, and
  neither --json nor --results_dir written."""
  run = subprocess.Popen([sys.executable, "-m", "ntxr.bench", "--jobs=kernels",
                          "--shapes=4:6:3:8", "--strategies=random", "--repeats=100000000",
                          f"--json={tmp_path}/bench.json", f"--results_dir={tmp_path}/results"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"))
  assert run.stdout.readline().startswith("device: ")  # then the job starts
  run.send_signal(signal.SIGINT)
  stderr = run.communicate(timeout=60)[1]
  assert (run.returncode, stderr) == (130, f"{ctrl_c.AGAIN}\n")
  assert not os.listdir(tmp_path)


def test_the_paper_width_is_the_models():
  assert bench.WIDTHS["paper"] == models.PAPER_CHANNELS


def test_the_union_program_steps_each_run_as_its_strategys_own_step():
  """The union job's program (every strategy's selection under lax.switch, vmapped over
  runs) gives each run the loss and parameters that `steps.train_step` with that run's
  strategy gives it; the job's row compares its time with the per-strategy programs'."""
  shape = dict(frames=8, words=3, mel_bands=64, vocab=10)
  strategies = ("random", "hard_cross", "easy_audio")
  model = models.DualEncoder(vocab_size=10, channels=(2, 4, 4, 4, 4))
  states = [steps.create_train_state(model, jax.random.key(r), frames=8, words=3,
                                     mel_bands=64) for r in range(len(strategies))]
  batch = training_steps.random_batch(6, **shape)
  keys = jax.random.split(jax.random.key(1), len(strategies))
  stepped, losses = jax.jit(jax.vmap(union_program.switched_step(strategies)))(
      together.stack(states), together.stack([batch] * len(strategies)), keys,
      jnp.arange(len(strategies)))
  for r, (strategy, state) in enumerate(zip(strategies, states)):
    alone, statistics = jax.jit(functools.partial(
        steps.train_step, loss=settings.Loss(strategy=strategy)))(state, batch, keys[r])
    assert float(losses[r]) == pytest.approx(float(statistics.loss), rel=1e-5)
    # Adam's first step moves a weight by up to the learning rate (1e-3) in the sign of
    # its gradient, so a rounding-level gradient (the input BatchNorm's scale) may step
    # the other way: every weight within two steps, all but one in a thousand to rtol 1e-4.
    ours, theirs = (jax.tree.leaves(params) for params in (
        together.unstack(stepped)[r].params, alone.params))
    assert all(np.abs(a - b).max() <= 2e-3 for a, b in zip(ours, theirs))
    assert np.concatenate([np.isclose(a, b, rtol=1e-4, atol=1e-6).ravel()
                           for a, b in zip(ours, theirs)]).mean() >= 0.999
  rows = union_program.run({"narrow": (2, 4, 4, 4, 4)}, list(strategies[:2]), 1, 4,
                           repeats=1, shape=shape)
  assert [(r["width"], r["strategies"], r["seeds"]) for r in rows] == [("narrow", 2, 1)]
  assert rows[0]["union_of_per_strategy"] == pytest.approx(
      rows[0]["union_ms"] / rows[0]["per_strategy_ms"])
  assert "| narrow | 4 | 8 | 2 | 1 |" in union_program.format_table(rows)


@NEEDS_TORCH
def test_the_encoders_job_times_the_same_step_in_both_frameworks():
  """Each pair's row at a tiny shape: both steps timed, the compiled JAX step's memory, and
  the JAX step's first loss equal to PyTorch's on the same random weights to 1e-4 (measured
  up to 4e-6, on CNN14 + BERT): the job times the same computation in both. In a process
  that compiles as users do: CNN14's step runs 5 to 10 times slower without XLA's LLVM
  optimisations (conftest.py)."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "PYTEST_XDIST_WORKER")}
  code = ("import json; from ntxr import bench; from ntxr.bench import encoder_steps\n"
          "print(json.dumps(encoder_steps.run(list(bench.ENCODER_PAIRS), 'tiny', batch=2, "
          "samples=10240, words=5, repeats=1)))")
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        check=True)
  rows = json.loads(done.stdout.splitlines()[-1])
  assert [(r["pair"], r["audio"], r["text"]) for r in rows] == [
      ("cnn14+bert", "cnn14", "bert"), ("passt+roberta", "passt", "roberta")]
  for row in rows:
    assert (row["batch"], row["samples"], row["seconds"], row["words"], row["device"],
            row["torch_device"]) == (2, 10240, 0.32, 5, timing.device_name(), "cpu")
    assert all(math.isfinite(row[key]) and row[key] > 0 for key in (
        "jax_ms", "torch_ms", "temp_bytes", "argument_bytes", "parameters"))
    assert row["speedup"] == pytest.approx(row["torch_ms"] / row["jax_ms"])
    assert row["jax_loss"] == pytest.approx(row["torch_loss"], rel=1e-4)
    assert row["out_of_memory"] == []
  assert rows[0]["parameters"] > 80e6 > 1e6 > rows[1]["parameters"]  # CNN14 has one size
  assert "| cnn14+bert | tiny | 84.0 | 2 | 0.32 | 5 |" in encoder_steps.format_table(rows)


@NEEDS_TORCH
def test_the_planned_memory_is_the_memory_of_the_step_with_real_weights(monkeypatch):
  """From the modules alone, each pair's state has the shapes and dtypes of the state
  with the publishers' (random) weights; compiled from shapes, the step plans the memory
  of the step compiled with weights and a batch (temp and argument bytes equal), and on a
  device that says what it holds, the largest batch whose memory, affine in the batch
  through the two planned, fits it."""
  described = lambda tree: jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), tree)
  states = {}
  for pair in bench.ENCODER_PAIRS:
    states[pair] = encoder_steps.jax_state(encoder_steps.reference_modules(pair, "tiny"),
                                           pair, "tiny")
    abstract = encoder_steps.abstract_state(pair, "tiny")
    assert described(abstract.params) == described(states[pair].params), pair
    assert described(abstract.batch_stats) == described(states[pair].batch_stats), pair
  pair, shape = "passt+roberta", dict(batch=2, samples=10240, words=5)
  if jax.default_backend() == "cpu":
    assert encoder_steps.device_memory_limit() is None  # a CPU does not say
  monkeypatch.setattr(encoder_steps, "device_memory_limit", lambda: None)  # as a CPU's
  row, half = encoder_steps.plan([pair], "tiny", **shape)
  assert (row["batch"], half["batch"], row["fits_batch"], half["fits_batch"]) == (
      2, 1, None, None)
  need = {r["batch"]: r["temp_bytes"] + r["argument_bytes"] for r in (row, half)}
  # 3 clips' worth above batch 2's need, a byte short of a 4th: batch 5 fits, 6 does not
  monkeypatch.setattr(encoder_steps, "device_memory_limit",
                      lambda: need[2] + 4 * (need[2] - need[1]) - 1)
  monkeypatch.setattr(encoder_steps, "planned_memory",  # the rows above, not compiled again
                      lambda _, __, batch, *unused: {2: row, 1: half}[batch])
  fitted = encoder_steps.plan([pair], "tiny", **shape)
  assert [r["fits_batch"] for r in fitted] == [5, 5]
  memory = jax.jit(encoder_steps.train_step, donate_argnums=0).lower(
      states[pair], encoder_steps.random_batch(**shape, vocab=100)).compile().memory_analysis()
  assert (row["temp_bytes"], row["argument_bytes"]) == (memory.temp_size_in_bytes,
                                                        memory.argument_size_in_bytes)
  assert row["jax_parameters"] == sum(leaf.size for leaf in jax.tree.leaves(
      states[pair].params))
  table = encoder_steps.format_memory_table(fitted[:1])
  assert "| passt+roberta | tiny | 0.3 | 2 | 0.32 | 5 |" in table and table.endswith(" | 5 |")


@NEEDS_TORCH
def test_a_step_out_of_the_devices_memory_is_recorded_and_the_job_goes_on(monkeypatch):
  """PyTorch's OutOfMemoryError or XLA's RESOURCE_EXHAUSTED in a framework's step leaves
  that framework's time and loss empty and names it, while the other is timed; any other
  error stops the job, as does another kind of error that says RESOURCE_EXHAUSTED."""
  import torch  # pylint: disable=import-outside-toplevel
  def raising(error):
    def step():
      raise error
    return step
  time = encoder_steps._median_ms_and_first_loss  # pylint: disable=protected-access
  out_of_memory = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")
  assert time(raising(out_of_memory), repeats=1) == (None, None)
  assert time(raising(jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2147483648 bytes.")),
              repeats=1) == (None, None)
  for error in (jax.errors.JaxRuntimeError("INTERNAL: ptxas exited with non-zero error code"),
                RuntimeError("RESOURCE_EXHAUSTED, said by something else")):
    with pytest.raises(type(error)):
      time(raising(error), repeats=1)
  shape = dict(batch=2, samples=10240, words=5, repeats=1)
  monkeypatch.setattr(encoder_steps, "torch_step", lambda *_: raising(out_of_memory))
  row, = encoder_steps.run(["passt+roberta"], "tiny", **shape)
  assert (row["torch_ms"], row["torch_loss"], row["speedup"], row["out_of_memory"]) == (
      None, None, None, ["PyTorch"])
  assert row["jax_ms"] > 0 and math.isfinite(row["jax_loss"])
  table = encoder_steps.format_table([row])
  assert f"| {row['jax_ms']:.0f} | - | - | " in table
  assert table.endswith(f" | {row['jax_loss']:.5f} / out of memory |")
  monkeypatch.setattr(encoder_steps, "torch_step",
                      lambda *_: raising(RuntimeError("expected scalar type Float")))
  with pytest.raises(RuntimeError, match="expected scalar type"):
    encoder_steps.run(["passt+roberta"], "tiny", **shape)


@NEEDS_TORCH
def test_halving_times_both_frameworks_at_the_batch_pytorch_holds(monkeypatch):
  """With halve, a PyTorch step out of memory at 8 and 4 clips is tried at 2, where both
  frameworks are timed; below 2 nothing is tried and the step is recorded out of memory
  (JAX timed at the last batch tried)."""
  import torch  # pylint: disable=import-outside-toplevel
  tried, step = [], encoder_steps.torch_step
  def out_of_memory():
    raise torch.cuda.OutOfMemoryError("CUDA out of memory")
  def holding(most):  # a torch_step that runs out of memory above `most` clips
    def torch_step(modules, batch, device):
      tried.append(len(batch["waveforms"]))
      return step(modules, batch, device) if tried[-1] <= most else out_of_memory
    return torch_step
  monkeypatch.setattr(encoder_steps, "torch_step", holding(2))
  shape = dict(samples=10240, words=5, repeats=1)
  row, = encoder_steps.run(["passt+roberta"], "tiny", batch=8, halve=True, **shape)
  assert tried == [8, 4, 2] and row["batch"] == 2 and row["out_of_memory"] == []
  assert row["speedup"] > 0 and np.isclose(row["jax_loss"], row["torch_loss"], rtol=1e-4)
  tried.clear()
  row, = encoder_steps.run(["passt+roberta"], "tiny", batch=8, **shape)  # as given
  assert tried == [8] and row["batch"] == 8 and row["out_of_memory"] == ["PyTorch"]
  tried.clear()
  monkeypatch.setattr(encoder_steps, "torch_step", holding(0))  # out of memory at any batch
  row, = encoder_steps.run(["passt+roberta"], "tiny", batch=5, halve=True, **shape)
  assert tried == [5, 2] and row["batch"] == 2 and row["out_of_memory"] == ["PyTorch"]
  assert row["jax_ms"] > 0


@NEEDS_TORCH
def test_every_pytorch_step_runs_first_and_the_jax_states_wait_in_host_memory(monkeypatch):
  """JAX's allocator keeps the device memory it grows to, so the job times every pair's
  PyTorch step before any JAX step, and each JAX state (weights converted included) is
  made in the host's memory: here JAX's first CPU device, another being the default, in
  another process."""
  order = []
  monkeypatch.setattr(encoder_steps, "_time_in_pytorch", lambda pair, *_: (
      order.append(("PyTorch", pair)) or (pair, 1, 2.0, 0.5)))
  monkeypatch.setattr(encoder_steps, "_time_in_jax", lambda state, *_: (
      order.append(("JAX", state)) or (1.0, 0.5, (1, 1))))
  rows = encoder_steps.run(["cnn14+bert", "passt+roberta"], "tiny", batch=2, samples=10240,
                           words=5, repeats=1)
  assert order == [("PyTorch", "cnn14+bert"), ("PyTorch", "passt+roberta"),
                   ("JAX", "cnn14+bert"), ("JAX", "passt+roberta")]
  assert [(r["pair"], r["speedup"]) for r in rows] == [("cnn14+bert", 2.0),
                                                      ("passt+roberta", 2.0)]
  code = ("import jax; jax.config.update('jax_default_device', jax.devices()[1])\n"
          "from ntxr.bench import encoder_steps\n"
          "for pair in ('cnn14+bert', 'passt+roberta'):\n"
          "  state = encoder_steps.jax_state(encoder_steps.reference_modules(pair, 'tiny'), "
          "pair, 'tiny')\n"
          "  held = {device for leaf in jax.tree.leaves(state) if isinstance(leaf, jax.Array)\n"
          "          for device in leaf.devices()}\n"
          "  assert held == {jax.devices()[0]}, (pair, held)")
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                    + " --xla_force_host_platform_device_count=2").strip())
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 0, done.stderr[-2000:]


def test_the_encoders_job_without_its_references_costs_one_line():
  code = ("import sys; sys.modules['hear21passt'] = None\n"  # as if not installed
          "from absl import app; from ntxr import command\n"
          "from ntxr.bench import __main__ as bench\n"
          "bench.define_flags(); app.run(bench.main, flags_parser=command.parse_flags)")
  done = subprocess.run([sys.executable, "-c", code, "--jobs=kernels,encoders",
                         "--pairs=passt+roberta"], capture_output=True, text=True, check=False)
  assert (done.returncode, done.stderr) == (1, (
      "error: the encoders job times the publishers' PyTorch code, which needs hear21passt: "
      "pip install -e '.[test]'\n"))
  assert "|" not in done.stdout  # before any job ran


@pytest.mark.parametrize("flags, batch", [
    (["--jobs=encoder_memory,encoders"], 3),  # the smaller pair's largest batch
    (["--jobs=encoder_memory,encoders", "--encoder_batch=4"], 4),
    (["--jobs=encoders"], 8)])  # the grid's
def test_the_encoders_job_runs_at_the_batch_every_pair_fits(flags, batch):
  """After encoder_memory, the encoders job takes the smallest of the pairs' largest
  batches (its own steps and plans stood in for by what they were given)."""
  code = ("from absl import app; from ntxr import command\n"
          "from ntxr.bench import __main__ as bench, encoder_steps\n"
          "from ntxr.encoders import references\n"
          "bench.GRIDS['cpu']['encoders']['batch'] = 8\n"
          "references.missing = lambda names: []\n"
          "encoder_steps.plan = lambda pairs, sizes, batch, *_, **__: (\n"
          "    print('planned at', batch) or [dict(fits_batch=6), dict(fits_batch=3)])\n"
          "encoder_steps.run = lambda pairs, sizes, batch, *_, halve, **__: (\n"
          "    print('timed at', batch, 'halving' if halve else 'as given') or [])\n"
          "encoder_steps.format_table = encoder_steps.format_memory_table = str\n"
          "bench.define_flags(); app.run(bench.main, flags_parser=command.parse_flags)")
  done = subprocess.run([sys.executable, "-c", code, "--pairs=cnn14+bert,passt+roberta",
                         *flags], capture_output=True, text=True, check=True)
  planned = ["planned at 4"] if "--encoder_batch=4" in flags else (
      ["planned at 8"] if "encoder_memory" in flags[0] else [])
  timed = f"timed at {batch} " + ("as given" if "--encoder_batch=4" in flags else "halving")
  assert [line for line in done.stdout.splitlines() if " at " in line] == [*planned, timed]
