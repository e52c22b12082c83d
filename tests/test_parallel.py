"""One global batch on 1 and on 8 (CPU) devices: the same loss, negatives and parameters,
for one run and for two runs stepped together on a (runs, data) mesh; batches put on the
devices ahead of their steps.

The comparison runs in a child process started with 8 host devices (XLA reads the
device count once, at start-up); run as a script, this file is that child.
"""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

# One strategy per way of selecting: the cross matrix, random draws, a within-modality
# matrix (over sharded frames), and the whole pool; then objectives over the whole pool,
# with learnt scalars (siglip) and with caption similarity, relevance and the filter (soft).
# Two halves, one child process each, so that two test workers share the compiling.
HALVES = (("semihard_cross", "random", "easy_audio"), ("full_batch", "siglip", "soft"))
OBJECTIVE_SETTINGS = {"siglip": dict(objective="siglip"),
                      "soft": dict(objective="soft", similarity="tfidf",
                                   filter_share_of_positive=0.95)}
STEPS = 3
TOGETHER_RATES = (1e-3, 2e-3)  # two runs stepped together, each its own learning rate


@pytest.mark.parametrize("size, expected", [
    (1, ["put 0", "use 0", "put 1", "use 1", "put 2", "use 2"]),
    (2, ["put 0", "put 1", "use 0", "put 2", "use 1", "use 2"]),
    (4, ["put 0", "put 1", "put 2", "use 0", "use 1", "use 2"])])
def test_prefetch_puts_batches_ahead_of_their_use(size, expected):
  from ntxr import parallel  # pylint: disable=import-outside-toplevel
  events = []
  def put(batch):
    events.append(f"put {batch}")
    return batch
  for batch in parallel.prefetch(range(3), put, size):
    events.append(f"use {batch}")
  assert events == expected
  with pytest.raises(ValueError, match="at least 1, not 0"):
    next(parallel.prefetch(range(3), put, 0))


@pytest.mark.parametrize("strategies", HALVES)
def test_eight_devices_give_what_one_gives(strategies, cache_dir, tmp_path):
  out = tmp_path / "steps.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  child = subprocess.run([sys.executable, __file__, cache_dir, str(out), *strategies],
                         env=env, capture_output=True, text=True, check=False)
  assert child.returncode == 0, child.stderr[-3000:]
  found = dict(np.load(out))
  assert found["device_counts"].tolist() == [1, 8]
  assert str(found["refused"]) == ("--config.batch_size 12 does not split over 8 devices: "
                                   "make it a multiple of 8")
  for strategy in strategies:
    one, eight = (lambda name, d=d: found[f"{strategy}/{d}/{name}"] for d in (1, 8))
    np.testing.assert_allclose(eight("loss"), one("loss"), rtol=1e-5)
    assert np.all(np.diff(one("loss")) != 0)  # three different batches, three losses
    if strategy not in ("full_batch", *OBJECTIVE_SETTINGS):
      assert_same_negatives(strategy, eight("negatives"), one("negatives"),
                            {m: one(m) for m in ("s_cross", "s_audio", "s_text")})
    params = assert_same_parameters(found, strategy)
    moved = [np.abs(found[k] - found[k.replace("/params/", "/initial/")]).max() for k in params]
    assert max(moved) > 1e-3  # the steps did update the parameters
  if "easy_audio" in strategies:  # two runs together: on 8 devices, two groups of four
    assert found["together/mesh"].tolist() == [2, 4]
    np.testing.assert_allclose(found["together/8/loss"], found["together/1/loss"], rtol=1e-5)
    assert np.all(found["together/1/loss"][:, 0] != found["together/1/loss"][:, 1])
    assert_same_parameters(found, "together", rates=TOGETHER_RATES)
    np.testing.assert_allclose(found["together/8/eval_loss"], found["together/1/eval_loss"],
                               rtol=1e-4)
    np.testing.assert_allclose(found["together/8/words"], found["together/1/words"], atol=1e-4)
    assert found["together/1/words"].shape[-1] == 2 * 16  # two runs' embed_dim side by side


def assert_same_parameters(found, prefix, rates=(1e-3,)) -> list:
  """The parameters under PREFIX/8/params/ are those under PREFIX/1/params/ (stacked
  runs': each run's learning rate in `rates`); returns the latter's keys.

  Adam moves a weight by about the learning rate times g / |g| whatever the gradient's
  size, so where a gradient is at rounding level the eight devices' reductions, summing
  in another order, can change its steps by a share of the rate: every weight within a
  tenth of its run's rate, all but one in a thousand to rtol 1e-4."""
  params = sorted(k for k in found if k.startswith(f"{prefix}/1/params/"))
  assert len(params) > 10
  close = []
  for key in params:
    eight_devices, one_device = found[key.replace("/1/", "/8/")], found[key]
    tenth = np.reshape(rates, (-1,) + (1,) * (one_device.ndim - 1)) / 10  # by run
    assert np.all(np.abs(eight_devices - one_device) <= tenth), (
        key, np.abs(eight_devices - one_device).max())
    close.append(np.isclose(eight_devices, one_device, rtol=1e-4, atol=1e-6).ravel())
  assert np.concatenate(close).mean() >= 0.999
  return params


def assert_same_negatives(strategy, found, expected, matrices):
  """found == expected [2, N] (audio negative per text anchor, text negative per audio
  anchor), except where two candidates tie (within float noise) on the selecting score."""
  from ntxr import sampling  # pylint: disable=g-import-not-at-top
  needs = sampling.get_strategy(strategy).needs
  assert (found == expected).mean() >= 0.75
  for row, anchor in zip(*np.nonzero(found != expected)):
    assert needs is not None, "random negatives must match exactly"
    if needs == "cross":  # s_cross[audio, text]
      score = lambda j: (matrices["s_cross"][j, anchor] if row == 0
                         else matrices["s_cross"][anchor, j])
    else:
      score = lambda j: matrices[f"s_{needs}"][anchor, j]
    assert abs(score(found[row, anchor]) - score(expected[row, anchor])) < 1e-5, (
        strategy, row, anchor)


def _steps(cache_dir: str, strategies) -> dict:
  """For each strategy, on 1 device and on all: the losses of STEPS train steps, the
  initial model's selected negatives on the first batch, and the final parameters; for
  easy_audio also those of two runs stepped together (each its own learning rate, key
  and batch)."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import traverse_util  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from ntxr import sampling, scores, settings, steps
  from ntxr import programs, together
  from ntxr.configs import default  # pylint: disable=g-import-not-at-top
  from ntxr.data import input_pipeline  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import TINY  # pylint: disable=g-import-not-at-top
  from runs import experiment_of  # pylint: disable=g-import-not-at-top

  def select(strategy):
    def negatives(state, batch, key):
      audio, text = state.apply_fn(state.variables(), batch, train=False)
      scorer = scores.get_scorer("alignment")
      matrices = dict(s_cross=scorer.matrix(audio, text, batch["audio_mask"],
                                            batch["token_mask"]),
                      s_audio=scorer.symmetric(audio, batch["audio_mask"]),
                      s_text=scorer.symmetric(text, batch["token_mask"]))
      chosen = sampling.select_negatives(matrices["s_cross"], batch["audio_id"],
                                         strategy=strategy, key=key, s_audio=matrices["s_audio"],
                                         s_text=matrices["s_text"])
      return dict(matrices, negatives=jax.numpy.stack([chosen.audio[:, 0], chosen.text[:, 0]]))
    return negatives

  flat = lambda tree: {"/".join(k): np.asarray(v) for k, v in
                       traverse_util.flatten_dict(jax.device_get(tree)).items()}

  def two_runs_together(experiment, state, batches, devices):
    step, eval_loss, mesh = programs.stacked_steps(experiment.settings.loss, 2, devices)
    states = jax.device_put(together.stack([steps.set_learning_rate(state, rate)
                                            for rate in TOGETHER_RATES]), mesh.runs)
    keys = jax.device_put(jax.numpy.stack([jax.random.key(1), jax.random.key(2)]), mesh.runs)
    losses = []
    for i, batch in enumerate(batches):
      both = together.pad_and_stack([experiment.relations.add(b, "development")
                                     for b in (batch, batches[(i + 1) % len(batches)])])
      states, statistics = step(states, both, jax.vmap(jax.random.fold_in, (0, None))(keys, i))
      losses.append(np.asarray(statistics.loss))
    # Validated together: the vmapped loss on the mesh, the captions embedded side by side.
    embedder = experiment.evaluation.embedder(experiment.devices.replicate(states), runs=True)
    words, _ = embedder.captions(experiment.corpus.captions("development")[0][1])
    prefix = f"together/{len(devices)}"
    return {f"{prefix}/loss": np.array(losses), "together/mesh": np.array(
        [mesh.mesh.shape["runs"], mesh.mesh.shape["data"]]),
            f"{prefix}/eval_loss": np.asarray(eval_loss(states, both, keys)),
            f"{prefix}/words": words,
            **{f"{prefix}/params/{k}": v for k, v in flat(states.params).items()}}
  found = dict(device_counts=np.array([1, len(jax.devices())]))
  key = jax.random.key(7)
  for strategy in strategies:
    config = default.get_config()
    config.update(dict(TINY, cache_dir=cache_dir, batch_size=16,
                       **OBJECTIVE_SETTINGS.get(strategy, dict(strategy=strategy))))
    for devices in (jax.devices()[:1], jax.devices()):
      experiment = experiment_of(config, devices)
      prefix = f"{strategy}/{len(devices)}"
      batches = list(itertools.islice(
          input_pipeline.as_numpy(experiment.train_batches("development", 0)), STEPS))
      state = experiment.initial_state
      for name, value in flat(state.params).items():
        found[f"{prefix}/initial/{name}"] = value
      if strategy == "easy_audio":
        found.update(two_runs_together(experiment, state, batches, tuple(devices)))
      if strategy not in ("full_batch", *OBJECTIVE_SETTINGS):
        selected = experiment.devices.jit(select(strategy))(
            state, experiment.devices.shard(batches[0]), key)
        found.update({f"{prefix}/{name}": np.asarray(v) for name, v in selected.items()})
      losses = []
      for i, batch in enumerate(batches):
        state, metrics = experiment.train_step(
            state, experiment.device_batch(batch, "development"), jax.random.fold_in(key, i))
        losses.append(float(metrics.loss))
      found[f"{prefix}/loss"] = np.array(losses)
      for name, value in flat(state.params).items():
        found[f"{prefix}/params/{name}"] = value
  config.batch_size = 12  # 12 pairs cannot split over 8 devices: said before anything runs
  try:
    experiment_of(config)
  except settings.SettingError as error:
    found["refused"] = np.array(str(error))
  return found


if __name__ == "__main__":
  np.savez(sys.argv[2], **_steps(sys.argv[1], sys.argv[3:]))
