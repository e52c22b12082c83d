"""The cross-batch memory (--config.memory_batches): the loss against a loop over each
anchor's pool of the batch and the memory, gradients included; what a step writes into
it; its checkpoint and resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntxr import false_negatives, memory as memory_lib, objectives, scores, settings, steps
from runs import experiment_of, params_of, stop_at_step_12

G, T, W, E, K = 6, 5, 4, 3, 2  # batch, frames, words, width, memory slots
STORED_FRAMES = 7  # the memory's clips are longer than the batch's
D, KINDS = 4, 3  # the caption vectors' width, the event kinds
STRATEGIES = ("full_batch", "semihard_cross", "hard_cross", "easy_text", "hard_text",
              "easy_audio", "hard_audio")


def _sequences(key, n, frames):
  keys = jax.random.split(key, 4)
  return (jax.random.normal(keys[0], (n, frames, E)), jax.random.normal(keys[1], (n, W, E)),
          jnp.arange(frames)[None] < jax.random.randint(keys[2], (n, 1), 1, frames + 1),
          jnp.arange(W)[None] < jax.random.randint(keys[3], (n, 1), 1, W + 1))


def _unit_vectors(key, shape):
  """Non-negative unit caption vectors, as TF-IDF's."""
  x = jnp.abs(jax.random.normal(key, shape))
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _example():
  """(batch, memory, the batch's caption vectors [G, D], its clips' events [G, KINDS]): a
  batch of G pairs (two clips with two captions each) and a memory of K slots, the
  newest written (two of its entries of the batch's clips), the other never written
  but holding other entries, which must count for nothing."""
  ids = jnp.array([0, 0, 1, 2, 3, 3])
  batch = objectives.Embedded(*_sequences(jax.random.key(0), G, T), ids)
  audio, text, audio_mask, text_mask = (
      x.reshape((K, G) + x.shape[1:]) for x in _sequences(jax.random.key(1), K * G,
                                                          STORED_FRAMES))
  stored_ids = jnp.array([[1, 3, 7, 8, 8, 9], [0, 4, 5, 6, 2, 2]])
  age = jnp.array([[1] * G, [0] * G])
  events = jax.random.bernoulli(jax.random.key(4), 0.5, (G + K * G, KINDS))
  memory = memory_lib.Memory(
      audio, text, audio_mask, text_mask, stored_ids, age,
      events=events[G:].reshape(K, G, KINDS),
      caption_vectors=_unit_vectors(jax.random.key(3), (K, G, D)))
  return batch, memory, _unit_vectors(jax.random.key(2), (G, D)), events[:G]


def _candidates(batch, memory, vectors, events):
  """Every candidate, the batch's then the memory's written entries: (audio, text, masks,
  ids, caption vectors, events), the batch's frames padded to the memory's."""
  pad = lambda x: jnp.pad(x, [(0, 0), (0, STORED_FRAMES - T)] + [(0, 0)] * (x.ndim - 2))
  written = np.flatnonzero(np.asarray(memory.age).reshape(-1) > 0)
  stored = [x.reshape((-1,) + x.shape[2:])[written] for x in (
      memory.audio, memory.text, memory.audio_mask, memory.text_mask, memory.audio_ids,
      memory.caption_vectors, memory.events)]
  mine = (pad(batch.audio), batch.text, pad(batch.audio_mask), batch.text_mask,
          batch.audio_ids, vectors, events)
  return tuple(jnp.concatenate([m, s]) for m, s in zip(mine, stored))


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
  union = np.sum(a | b)
  return np.sum(a & b) / union if union else 0.0


def _loop_loss(audio, text, memory, loss: settings.Loss, learnt: dict):
  """The loss of the batch's first n = len(audio) pairs by a loop over anchors, each
  anchor's pool every written candidate of another clip, less those the filters drop
  (captions more alike than the bound, by the vectors' cosine or the events' Jaccard;
  scores above the share of the anchor's positive), chosen by numpy's first arg-min or
  arg-max (the lowest index); soft's targets from the same caption similarity."""
  example, _, vectors, events = _example()
  n = len(audio)
  batch = objectives.Embedded(audio, text, *(x[:n] for x in example[2:]))
  every_audio, every_text, every_audio_mask, every_text_mask, ids, every_vector, every_event = (
      _candidates(batch, memory, vectors[:n], events[:n]))
  every_event = np.asarray(every_event)
  scorer = scores.get_scorer(loss.score)
  s = scorer.matrix(every_audio, every_text, every_audio_mask, every_text_mask)
  frozen = np.asarray(jax.lax.stop_gradient(s), np.float64)
  alike = (np.array([[_jaccard(every_event[i], e) for e in every_event] for i in range(n)])
           if loss.similarity == "events" else np.asarray(every_vector[:n] @ every_vector.T))
  share = loss.filter_share_of_positive
  above = lambda i, j, bound: share and (frozen[i, j] > share * bound
                                         or frozen[j, i] > share * bound)
  hinge = lambda negative, positive: jax.nn.relu(negative - positive + loss.margin)
  temperature, bias = loss.temperature, 0.0  # siglip's are learnt: 1 / temperature, bias
  if "log_inverse_temperature" in learnt:
    temperature, bias = jnp.exp(-learnt["log_inverse_temperature"]), learnt["bias"]
  a2t, t2a, siglip = [], [], 0.0
  for i in range(n):
    pool = [j for j in range(len(ids)) if ids[j] != ids[i]
            and not (loss.filter_similarity and alike[i, j] > loss.filter_similarity)
            and not above(i, j, frozen[i, i])]
    positive = s[i, i]
    if loss.objective == "triplet" and not pool:  # an emptied pool adds 0
      a2t.append(0.0)
    elif loss.objective == "triplet" and loss.strategy == "full_batch":
      a2t.append(jnp.mean(jnp.stack([hinge(s[j, i], positive) for j in pool]))
                 + jnp.mean(jnp.stack([hinge(s[i, j], positive) for j in pool])))
    elif loss.objective == "triplet":
      if loss.strategy.endswith("_cross"):
        by_text, by_audio = frozen[pool, i], frozen[i, pool]
        if loss.strategy == "semihard_cross":
          by_text, by_audio = (-np.abs(x - frozen[i, i]) for x in (by_text, by_audio))
        audio_negative, text_negative = (pool[int(np.argmax(x))] for x in (by_text, by_audio))
      else:
        x, mask = ((every_audio, every_audio_mask) if loss.strategy.endswith("audio")
                   else (every_text, every_text_mask))
        x = jax.lax.stop_gradient(x)
        within = np.asarray(scorer.matrix(x[i:i + 1], x[np.array(pool)], mask[i:i + 1],
                                          mask[np.array(pool)]))[0]
        audio_negative = text_negative = pool[int(np.argmax(
            within if loss.strategy.startswith("hard") else -within))]
      a2t.append(hinge(s[audio_negative, i], positive) + hinge(s[i, text_negative], positive))
    elif loss.objective in ("infonce", "hn_nce", "soft"):
      own = [j for j in range(n) if ids[j] == ids[i]]
      targets = np.array([1.0] * len(own) + [
          float(jax.nn.sigmoid(loss.relevance_slope * alike[i, j] - loss.relevance_offset))
          if loss.objective == "soft" else 0.0 for j in pool])
      targets /= targets.sum()
      for direction, row in ((a2t, s[i] / temperature), (t2a, s[:, i] / temperature)):
        candidates = row[np.array(own + pool)]
        hardness = loss.beta * jax.lax.stop_gradient(row[np.array(pool)])  # hn_nce's weights
        log_weights = jnp.concatenate([jnp.zeros(len(own)), np.log(len(pool)) + hardness
                                       - jax.nn.logsumexp(hardness)])
        direction.append(-jnp.sum(targets * (
            candidates - jax.nn.logsumexp(candidates + log_weights))))
    else:  # siglip: audio i with every caption, each memory clip with caption i; a
      # negative pair in both pools (candidate j's bounded by its own positive)
      paired = [j for j in pool if not above(i, j, frozen[j, j])]
      sign = lambda j: 1.0 if j < n and ids[j] == ids[i] else -1.0
      pairs = [(s[i, j], sign(j)) for j in range(len(ids)) if sign(j) > 0 or j in paired]
      pairs += [(s[j, i], -1.0) for j in paired if j >= n]
      siglip += sum(jax.nn.log_sigmoid(y * (z / temperature + bias)) for z, y in pairs)
  if loss.objective == "triplet":
    return jnp.mean(jnp.stack(a2t))
  if loss.objective in ("infonce", "hn_nce", "soft"):
    return (jnp.mean(jnp.stack(a2t)) + jnp.mean(jnp.stack(t2a))) / 2
  return -siglip / n


COMPARED = dict(similarity="tfidf", relevance_slope=4.0, relevance_offset=2.0)
CASES = ([dict(strategy=name) for name in STRATEGIES]
         + [dict(objective="infonce", strategy=""), dict(objective="siglip", strategy=""),
            dict(objective="hn_nce", strategy="", beta=0.5),
            dict(objective="soft", strategy="", **COMPARED),
            dict(strategy="hard_cross", filter_similarity=0.75, **COMPARED),
            dict(objective="infonce", strategy="", filter_similarity=0.75, **COMPARED),
            dict(strategy="hard_cross", similarity="events", filter_similarity=0.4),
            dict(objective="soft", strategy="", similarity="events"),
            dict(strategy="semihard_cross", filter_share_of_positive=0.5),
            dict(objective="siglip", strategy="", filter_share_of_positive=0.5)])


def _named(case: dict) -> str:
  return "_".join([case.get("objective", case["strategy"]), case.get("similarity", "")]
                  + ["filtered"] * bool(case.get("filter_similarity"))
                  + ["share"] * bool(case.get("filter_share_of_positive"))).replace("__", "_")


def _loss_and_weights(loss: settings.Loss, rows: int = G):
  """(loss, gradients of the batch's first `rows` pairs' embeddings, the negatives'
  weights) with the memory, and the loop's loss and gradients."""
  batch, memory, vectors, events = _example()
  batch = objectives.Embedded(*(x[:rows] for x in batch))
  learnt = objectives.initial_parameters(loss.objective).get("objective", {})
  similarity = (false_negatives.event_similarity(np.asarray(events[:rows]))
                if loss.similarity == "events" else np.asarray(vectors[:rows] @ vectors[:rows].T))
  def with_memory(audio, text):
    value, terms, _ = steps.embedded_loss_and_terms(
        batch._replace(audio=audio, text=text), loss, learnt=learnt, key=jax.random.key(0),
        memory=memory, similarity=jnp.asarray(similarity, jnp.float32), events=events[:rows],
        caption_vectors=vectors[:rows])
    return value, terms.weights
  (value, weights), grads = jax.value_and_grad(with_memory, argnums=(0, 1), has_aux=True)(
      batch.audio, batch.text)
  expected, expected_grads = jax.value_and_grad(_loop_loss, argnums=(0, 1))(
      batch.audio, batch.text, memory, loss, learnt)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for got, want in zip(grads, expected_grads):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  return np.asarray(weights), memory


@pytest.mark.parametrize("score", ["alignment", "pooled"])
@pytest.mark.parametrize("case", CASES, ids=_named)
def test_the_loss_with_a_memory_is_a_loop_over_the_batch_and_the_memory(case, score):
  """Loss and gradients within 1e-5 of the loop; the memory's empty slot and the anchors'
  own clips' entries are never negatives, and the memory's negatives carry weight; the
  memory's captions compared by their vectors or events, the batch's by the host's
  similarity."""
  loss = settings.Loss(score=score, **case)
  weights, memory = _loss_and_weights(loss)
  assert weights.shape == (2, G, G + K * G)
  assert not weights[:, :, 2 * G:].any()  # the slot never written
  stored_ids = np.asarray(memory.audio_ids[0])
  own = np.asarray(_example()[0].audio_ids)[:, None] == stored_ids[None, :]
  assert not weights[:, :, G:2 * G][:, own].any()
  assert weights[:, :, G:2 * G].sum() > 0


@pytest.mark.parametrize("case", [dict(strategy="semihard_cross"), dict(strategy="full_batch"),
                                  dict(objective="siglip", strategy="")], ids=_named)
def test_a_short_last_batch_with_a_memory_is_the_loop(case):
  """A batch of 4 pairs before a memory of slots of 6: its candidates are its 4, then the
  memory's."""
  weights, _ = _loss_and_weights(settings.Loss(**case), rows=4)
  assert weights.shape == (2, 4, 4 + K * G) and weights[:, :, 4:4 + G].sum() > 0


def test_the_filters_drop_some_of_the_memory():
  """The cases' bounds bite on the memory's written slot (else the loop tests would not
  tell a filter that ignores the memory)."""
  batch, memory, vectors, events = _example()
  assert (np.asarray(vectors @ memory.caption_vectors[0].T) > 0.75).any()
  jaccard = np.asarray(false_negatives.event_similarity(np.asarray(events),
                                                        np.asarray(memory.events[0])))
  assert (jaccard > 0.4).any()
  weights, _ = _loss_and_weights(settings.Loss(strategy="semihard_cross"))
  filtered, _ = _loss_and_weights(settings.Loss(strategy="semihard_cross",
                                                filter_share_of_positive=0.5))
  assert (weights[:, :, G:2 * G] > 0).sum() != (filtered[:, :, G:2 * G] > 0).sum()


def test_random_draws_from_the_memory_too_and_never_the_anchors_own_clip():
  batch, memory, _, _ = _example()
  loss = settings.Loss(strategy="random")
  chosen = sum(np.asarray(steps.embedded_loss_and_terms(
      batch, loss, learnt={}, key=jax.random.key(k), memory=memory)[1].weights)
               for k in range(40))
  stored_ids = np.asarray(memory.audio_ids).reshape(-1)
  every_id = np.concatenate([np.asarray(batch.audio_ids), stored_ids])
  allowed = ((every_id[None, :] != np.asarray(batch.audio_ids)[:, None])
             & np.concatenate([np.ones(G, bool), np.asarray(memory.age).reshape(-1) > 0]))
  assert not chosen[:, ~allowed].any()
  assert (chosen[:, allowed] > 0).mean() > 0.8  # 40 draws reach nearly every candidate


def test_an_empty_memory_changes_nothing():
  batch, memory, _, _ = _example()
  memory = memory.replace(age=jnp.zeros_like(memory.age))
  for loss in (settings.Loss(strategy="semihard_cross"), settings.Loss(strategy="hard_audio"),
               settings.Loss(objective="infonce", strategy="")):
    alone = steps.embedded_loss_and_terms(batch, loss, learnt={}, key=jax.random.key(0))[0]
    with_memory = steps.embedded_loss_and_terms(batch, loss, learnt={}, key=jax.random.key(0),
                                                memory=memory)[0]
    np.testing.assert_allclose(with_memory, alone, rtol=1e-6)


def test_push_writes_the_newest_slot_and_ages_the_others():
  batch, memory, vectors, _ = _example()
  events = jnp.array([[True, False, True]] * G)
  short = objectives.Embedded(*(x[:4] for x in batch))  # a short last batch
  pushed = memory_lib.push(memory, short, events[:4], vectors[:4])
  np.testing.assert_array_equal(pushed.caption_vectors[0, :4], vectors[:4])
  np.testing.assert_array_equal(pushed.audio_ids[0, :4], batch.audio_ids[:4])
  np.testing.assert_array_equal(pushed.age, [[1, 1, 1, 1, 0, 0], [2] * G])
  np.testing.assert_array_equal(pushed.audio_ids[1], memory.audio_ids[0])
  np.testing.assert_array_equal(pushed.audio[0, :4, :T], batch.audio[:4])
  assert not pushed.audio_mask[0, :, T:].any() and not pushed.audio[0, :, T:].any()
  np.testing.assert_array_equal(pushed.events[0], [[True, False, True]] * 4
                                + [[False, False, False]] * 2)
  again = memory_lib.push(pushed, batch, events, vectors)  # the oldest slot drops out
  np.testing.assert_array_equal(again.age, [[1] * G, [2, 2, 2, 2, 0, 0]])
  np.testing.assert_array_equal(again.audio_ids[1, :4], batch.audio_ids[:4])
  long_clips = batch._replace(audio=jnp.zeros((G, STORED_FRAMES + 1, E)))
  with pytest.raises(ValueError, match="longer than the longest length bucket"):
    memory_lib.push(memory, long_clips, events, vectors)


def test_a_step_writes_its_batch_into_the_memory(tiny_config):
  """After each step the memory's newest slot holds what the step's loss embedded (the
  same dropout), its ids, event kinds and caption vectors, the slot before it the
  previous batch's; the training batches carry caption vectors whatever the objective
  (runs trained together share a seed's batches), the validation batches none (their
  loss uses the batch alone)."""
  experiment = experiment_of(tiny_config(memory_batches=2, similarity="tfidf",
                                         objective="infonce"))
  state = experiment.initial_state
  assert state.memory.audio_ids.shape == (2, 8) and not state.memory.age.any()
  batches = experiment.train_batches(experiment.training_split, 0).as_numpy_iterator()
  seen = []
  loss_and_terms = jax.jit(lambda params, variables, batch, key: (
      steps._loss_and_terms(  # pylint: disable=protected-access
          params, variables, state.apply_fn, batch, key, train=True,
          loss=experiment.settings.loss)))
  for step, batch in zip(range(3), batches):
    batch = experiment.device_batch(batch, experiment.training_split)
    _, (_, _, _, embedded) = loss_and_terms(state.params, state.variables(), batch,
                                            jax.random.key(step))
    state, _ = experiment.train_step(state, batch, jax.random.key(step))
    seen.append((jax.device_get(batch), jax.device_get(embedded)))
  memory = jax.device_get(state.memory)
  np.testing.assert_array_equal(memory.age, [[1] * 8, [2] * 8])
  for slot, (batch, embedded) in enumerate(seen[::-1][:2]):
    np.testing.assert_array_equal(memory.audio_ids[slot], batch["audio_id"])
    np.testing.assert_array_equal(memory.events[slot], batch["events"])
    np.testing.assert_array_equal(memory.caption_vectors[slot], batch["caption_vectors"])
    frames = embedded.audio.shape[1]
    np.testing.assert_array_equal(memory.audio_mask[slot, :, :frames], embedded.audio_mask)
    np.testing.assert_allclose(memory.audio[slot, :, :frames], embedded.audio, atol=1e-5)
    np.testing.assert_allclose(memory.text[slot], embedded.text, atol=1e-5)
  assert batch["caption_vectors"].shape == (8, experiment.corpus.tokenizer.vocab_size)
  validation = next(iter(experiment.validation_batches(0)))
  assert "caption_vectors" not in experiment.device_batch(validation,
                                                          experiment.validation_split)


def test_the_memory_is_checkpointed_and_a_resumed_run_ends_as_if_never_stopped(
    tiny_config, tmp_path, monkeypatch):
  """SIGTERM after step 12 saves the state with its memory; the rerun resumes it and
  ends with the straight run's parameters and memory (a memory rebuilt empty would not)."""
  from ntxr import train  # pylint: disable=import-outside-toplevel
  config = tiny_config(memory_batches=2, strategy="hard_cross")
  straight, stopped = tmp_path / "straight", tmp_path / "stopped"
  train.train_and_evaluate(config, str(straight))
  stop_at_step_12(config, stopped, monkeypatch)
  train.train_and_evaluate(config, str(stopped))
  for field in ("params", "memory"):
    (step_a, a), (step_b, b) = (params_of(str(path), field=field)
                                for path in (straight, stopped))
    assert step_a == step_b == 30
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)
  assert a["age"].min() == 1


def test_a_run_without_a_memory_saves_the_fields_its_checkpoints_always_held(tiny_config):
  """Checkpoints written before the memory existed hold these fields, and restore only
  into a tree of them; a run with a memory adds its own."""
  def fields(state):
    return list(dict.fromkeys(path[0].name for path, _ in
                              jax.tree_util.tree_flatten_with_path(state)[0]))
  state = experiment_of(tiny_config()).initial_state
  assert steps.memory_of(state) is None
  assert fields(state) == ["step", "params", "opt_state", "batch_stats"]
  assert fields(experiment_of(tiny_config(memory_batches=1)).initial_state) == [
      "step", "params", "opt_state", "batch_stats", "memory"]
