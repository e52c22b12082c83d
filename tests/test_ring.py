"""--config.negatives=ring against gather on 8 (CPU) devices: every strategy and objective,
both scores, the false-negative filters and soft relevance give the same loss, the same
negatives, the same gradients and the same statistics; a few training steps of the
tiny corpus the same losses and parameters.

The comparison runs in a child process started with 8 host devices (XLA reads the
device count once, at start-up); run as a script, this file is that child.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from ntxr import settings
from ntxr.configs import default

G, T, W, E = 32, 6, 5, 8  # the global batch (4 pairs a device), frames, words, width
# Each strategy, then each whole-pool objective, then the filters with one of each.
CASES = ([dict(strategy=name) for name in ("full_batch", "random", "semihard_cross",
                                           "hard_cross", "easy_text", "hard_text",
                                           "easy_audio", "hard_audio")]
         + [dict(objective=name, strategy="") for name in ("infonce", "hn_nce", "soft",
                                                           "siglip")]
         + [dict(strategy="semihard_cross", filter_share_of_positive=0.9,
                 filter_similarity=0.8),
            dict(objective="infonce", strategy="", filter_similarity=0.7),
            dict(objective="siglip", strategy="", filter_share_of_positive=0.9),
            dict(strategy="full_batch", filter_share_of_positive=0.9, filter_similarity=0.8),
            dict(strategy="hard_audio", filter_share_of_positive=0.9)])
# With a cross-batch memory of two slots of G, the newer half written (`ntxr.memory`).
MEMORY_CASES = ([dict(strategy=name) for name in ("full_batch", "random", "semihard_cross",
                                                  "hard_text", "hard_audio")]
                + [dict(objective=name, strategy="") for name in ("infonce", "hn_nce", "soft")]
                + [dict(objective="siglip", strategy="", filter_share_of_positive=0.9),
                   dict(strategy="semihard_cross", filter_share_of_positive=0.9,
                        filter_similarity=0.8)])
EMPTIED = 3  # anchors whose captions are like every other: the similarity filters empty
             # their pools
TRAINED = (dict(strategy="hard_audio"),
           dict(objective="soft", similarity="tfidf", filter_similarity=0.5),
           dict(strategy="semihard_cross", similarity="tfidf", filter_similarity=0.5,
                memory_batches=2))
STEPS = 3


@pytest.fixture(scope="session")
def found(cache_dir, made_once):
  """Every array the child found, by name: computed once for every worker."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  def run_child(out: str) -> None:
    child = subprocess.run([sys.executable, __file__, cache_dir, out], env=env,
                           capture_output=True, text=True, check=False)
    assert child.returncode == 0, child.stderr[-3000:]
  return dict(np.load(made_once("ring-found.npz", run_child)))


@pytest.mark.parametrize("score", ["alignment", "pooled"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_ring_gives_what_gather_gives(found, score, case):
  """The loss within 1e-5, gradients of the embeddings (and of siglip's learnt scalars)
  within 1e-5, the negatives' weights (which negatives, how much each counts) and the
  statistics' terms and shares; anchors whose pool a filter empties included."""
  gather = _gather_equals_ring(found, f"{score}/{case}", CASES[case])
  assert gather["weights"].shape == (2, G, G) and gather["weights"].sum() > 0
  if CASES[case].get("filter_similarity"):
    assert not gather["valid"][:EMPTIED].any()


def _gather_equals_ring(found: dict, prefix: str, fields: dict) -> dict:
  """Asserts every array gather and ring found for `prefix` equal within 1e-5; returns
  gather's by name."""
  gather, ring = ({name.split("/")[-1]: value for name, value in found.items()
                   if name.startswith(f"{way}/{prefix}/")} for way in ("gather", "ring"))
  assert len(gather) == len(ring) > 5
  for name, value in gather.items():
    np.testing.assert_allclose(ring[name], value, rtol=1e-5, atol=1e-5,
                               err_msg=f"{fields} {name}")
  return gather


@pytest.mark.parametrize("case", range(len(MEMORY_CASES)))
def test_ring_with_a_memory_gives_what_gather_gives(found, case):
  """The same with a memory (alignment score): the memory's candidates after the batch's,
  the same on every device."""
  weights = _gather_equals_ring(found, f"memory/{case}", MEMORY_CASES[case])["weights"]
  assert weights.shape == (2, G, 3 * G) and weights[:, :, G:2 * G].sum() > 0
  assert not weights[:, :, 2 * G:].any()  # the slot never written


@pytest.mark.parametrize("trained", range(len(TRAINED)))
def test_training_steps_with_ring_equal_gather(found, trained):
  gather, ring = (found[f"{way}/trained/{trained}/loss"] for way in ("gather", "ring"))
  assert gather.shape == (STEPS,)
  np.testing.assert_allclose(ring, gather, rtol=1e-5)
  names = [n for n in found if n.startswith(f"gather/trained/{trained}/state/")]
  assert names
  for name in names:
    np.testing.assert_allclose(found[name.replace("gather/", "ring/", 1)], found[name],
                               rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("fields", [dict(strategy="semihard_cross"),
                                    dict(objective="infonce", strategy="")])
def test_a_ring_of_one_device_is_the_batch_itself(fields):
  """On one device the ring is one step: the loss and the gradients are gather's."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from ntxr import objectives, parallel, ring, sampling
  mesh = parallel.Devices(jax.devices()[:1]).mesh
  keys = jax.random.split(jax.random.key(4), 2)
  ids = jnp.arange(8) // 2
  audio, text = jax.random.normal(keys[0], (8, T, E)), jax.random.normal(keys[1], (8, W, E))
  masks = jnp.ones((8, T), bool), jnp.ones((8, W), bool)
  loss = settings.Loss(**fields)
  def gather(a, t):
    return objectives.get_objective(loss.objective).loss_and_terms(
        objectives.Embedded(a, t, *masks, ids), loss, pool=sampling.negative_pool(ids),
        relevance=None, learnt={}, key=keys[0])[0]
  def ringed(a, t):
    return ring.rows_loss_and_terms(objectives.Embedded(a, t, *masks, ids), loss, mesh=mesh,
                                    learnt={}, key=keys[0])[0]
  (one, one_grads), (other, other_grads) = (
      jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(audio, text) for fn in (gather, ringed))
  np.testing.assert_allclose(other, one, rtol=1e-6)
  for a, b in zip(other_grads, one_grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # float32 sums in two orders


def test_an_objective_with_its_own_loss_is_refused_by_ring(monkeypatch):
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from ntxr import objectives, parallel, specs, steps
  monkeypatch.setattr(specs, "OBJECTIVES", dict(specs.OBJECTIVES))
  monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))
  objectives.register("mean_score", lambda embedded, setting, **_: (0.0, None),
                      takes_strategy=False)
  embedded = objectives.Embedded(jnp.ones((4, T, E)), jnp.ones((4, W, E)),
                                 jnp.ones((4, T), bool), jnp.ones((4, W), bool),
                                 jnp.arange(4))
  with pytest.raises(ValueError, match="'mean_score' computes its own loss from the whole "
                                       "batch: use --config.negatives=gather"):
    steps.embedded_loss_and_terms(
        embedded, settings.Loss(objective="mean_score", negatives="ring"), learnt={},
        key=jax.random.key(0), mesh=parallel.Devices(jax.devices()[:1]).mesh)
  with pytest.raises(ValueError, match="splits the loss over the devices' mesh: pass mesh="):
    steps.embedded_loss_and_terms(embedded, settings.Loss(negatives="ring"), learnt={},
                                  key=jax.random.key(0))


def test_ring_refuses_what_it_cannot_compute_as_gather():
  config = default.get_config()
  config.update(negatives="ring", objective="siglip", similarity="tfidf",
                filter_share_of_positive=0.9)
  settings.check_values(config)  # siglip's pairs in both filtered pools: ring has them
  config.update(objective="triplet", strategy="random", filter_share_of_positive=0.0)
  other = config.copy_and_resolve_references()
  other.seed = 1
  with pytest.raises(settings.SettingError, match="--config.negatives=gather, or apart"):
    settings.check_together([config, other])
  config.negatives = "rings"
  with pytest.raises(settings.SettingError, match=r"--config\.negatives must be one of"):
    settings.check_values(config)


def _kernels() -> dict:
  """For each case and score, and each memory case, both ways: the loss, the gradients of
  the embeddings, the negatives' weights [2, G, G + M], the terms and the false-negative
  shares."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec
  from ntxr import memory as memory_lib, objectives, parallel, ring, sampling, steps
  mesh = parallel.Devices().mesh
  keys = jax.random.split(jax.random.key(0), 6)
  ids = jax.random.permutation(keys[5], jnp.arange(G) // 2)  # two captions a clip
  audio, text = jax.random.normal(keys[0], (G, T, E)), jax.random.normal(keys[1], (G, W, E))
  audio_mask = jnp.arange(T)[None] < jax.random.randint(keys[2], (G, 1), 1, T + 1)
  text_mask = jnp.arange(W)[None] < jax.random.randint(keys[3], (G, 1), 1, W + 1)
  similarity = jax.random.uniform(keys[4], (G, G))
  similarity = (similarity + similarity.T) / 2  # as every caption similarity
  similarity = similarity.at[:EMPTIED].set(0.95).at[:, :EMPTIED].set(0.95)
  events = jax.random.bernoulli(keys[4], 0.5, (G, 2))
  key = jax.random.key(3)

  stored = jax.random.split(keys[4], 7)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  vectors = unit(jnp.abs(jax.random.normal(stored[5], (G, 4))))  # the captions'
  memory = memory_lib.Memory(  # the older slot never written
      jax.random.normal(stored[0], (2, G, T + 2, E)), jax.random.normal(stored[1], (2, G, W, E)),
      jnp.arange(T + 2) < jax.random.randint(stored[2], (2, G, 1), 1, T + 3),
      jnp.arange(W) < jax.random.randint(stored[3], (2, G, 1), 1, W + 1),
      jax.random.randint(stored[4], (2, G), 0, G), jnp.array([[1] * G, [0] * G]),
      jax.random.bernoulli(stored[4], 0.5, (2, G, 2)),
      unit(jnp.abs(jax.random.normal(stored[6], (2, G, 4)))))

  def gather(audio, text, loss, learnt, memory):  # what the step computes on one batch
    value, terms, shares = steps.embedded_loss_and_terms(
        objectives.Embedded(audio, text, audio_mask, text_mask, ids), loss, learnt=learnt,
        key=key, similarity=similarity, events=events, memory=memory,
        caption_vectors=vectors)
    return value, (terms, shares)

  def ringed(audio, text, loss, learnt, memory):
    rows, same = PartitionSpec(ring.AXIS), PartitionSpec()
    def run(embedded, similarity, events, caption_vectors, memory):
      return ring.loss_and_terms(embedded, loss, learnt=learnt, key=key,
                                 similarity=similarity, events=events, memory=memory,
                                 caption_vectors=caption_vectors)
    value, terms, shares = jax.shard_map(
        run, mesh=mesh, in_specs=(rows, rows, rows, rows, same),
        out_specs=(same, sampling.LossTerms(rows, rows, rows, PartitionSpec(None, ring.AXIS)),
                   same), check_vma=False)(
            objectives.Embedded(audio, text, audio_mask, text_mask, ids), similarity, events,
            vectors, memory)
    return value, (terms, shares)

  found = {}
  runs = [(f"{score}/{case}", dict(score=score, **fields), None)
          for score in ("alignment", "pooled") for case, fields in enumerate(CASES)]
  runs += [(f"memory/{case}", fields, memory) for case, fields in enumerate(MEMORY_CASES)]
  for label, fields, stored_memory in runs:
    loss = settings.Loss(**{**dict(beta=0.5, similarity="tfidf"), **fields})
    learnt = objectives.initial_parameters(loss.objective)
    for way, fn in (("gather", gather), ("ring", ringed)):
      (value, (terms, shares)), grads = jax.jit(jax.value_and_grad(
          lambda a, t, scalars, fn=fn: fn(a, t, loss, scalars, stored_memory),
          argnums=(0, 1, 2), has_aux=True))(audio, text, learnt)
      prefix = f"{way}/{label}"
      found.update({f"{prefix}/loss": value, f"{prefix}/grad_audio": grads[0],
                    f"{prefix}/grad_text": grads[1], f"{prefix}/weights": terms.weights,
                    **{f"{prefix}/grad_{name}": g
                       for name, g in grads[2].get("objective", {}).items()},
                    f"{prefix}/positive": terms.positive,
                    f"{prefix}/negative": terms.negative,
                    f"{prefix}/valid": terms.valid,
                    **{f"{prefix}/{name}": v for name, v in shares.items()}})
  return found


def _training(cache_dir: str) -> dict:
  """For each of TRAINED, both ways: STEPS training steps' losses from one initial state
  on the tiny corpus's first batches of 16, then the parameters (and the memory's text)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from flax import traverse_util
  from ntxr import steps
  sys.path.insert(0, os.path.dirname(__file__))
  from conftest import TINY
  from runs import experiment_of
  found = {}
  for index, fields in enumerate(TRAINED):
    for way in ("gather", "ring"):
      config = default.get_config()
      config.update(dict(TINY, cache_dir=cache_dir, batch_size=16, negatives=way, **fields))
      experiment = experiment_of(config)
      state, losses = experiment.initial_state, []
      batches = experiment.train_batches(experiment.training_split, 0)
      for step, batch in zip(range(STEPS), batches.as_numpy_iterator()):
        state, statistics = experiment.train_step(
            state, experiment.device_batch(batch, experiment.training_split),
            jax.random.key(step))
        losses.append(float(statistics.loss))
      prefix = f"{way}/trained/{index}"
      found[f"{prefix}/loss"] = np.array(losses)
      for name, value in traverse_util.flatten_dict(jax.device_get(state.params)).items():
        found[f"{prefix}/state/{'/'.join(name)}"] = np.asarray(value)
      if steps.memory_of(state) is not None:  # what the steps wrote into it
        found[f"{prefix}/state/memory_text"] = np.asarray(state.memory.text)
  return found


if __name__ == "__main__":
  import jax  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == 8
  np.savez(sys.argv[2], **{k: np.asarray(v) for k, v in
                           {**_kernels(), **_training(sys.argv[1])}.items()})
