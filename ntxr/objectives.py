"""Training objectives, one registry: the triplet loss and the whole-pool objectives (JAX only).

`OBJECTIVES` maps a name to an `Objective` (each specified in `ntxr.specs`), which turns a
batch's embeddings into a loss and its `LossTerms`. "triplet" is the paper's: one negative
per anchor, chosen by a negative-sampling strategy (`ntxr.sampling`); the others score
every negative in the pool, each a public function in optax's style (`infonce`, `hn_nce`,
`soft`, `siglip`).

Notation: s[a, t] = score(audio a, text t) [N, N]; P[a, t] = audio_ids[a] ==
audio_ids[t], the diagonal included; z = s / temperature. Audio anchor a is scored
over its row, caption anchor t over its column; an anchor's candidates are its
positives (P) and the negatives in its pool (by default every caption or clip of
another clip; the false-negative filter may remove some). Padding rows (valid False)
are neither anchors nor candidates, and an anchor whose pool is empty adds 0. Each
loss averages over the valid anchors.
"""

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from ntxr import sampling, scores, specs

Array = jax.Array


class Pools(NamedTuple):
  """Each anchor's negatives: text [N, N] bool, pool of caption anchor t over clips a
  (pools.text[t, a]); audio [N, N] bool, pool of audio anchor a over captions t."""
  text: Array
  audio: Array


def default_pools(audio_ids: Array) -> Pools:
  """Every candidate of another clip: [N] -> Pools."""
  other = sampling.negative_pool(audio_ids)
  return Pools(other, other)


class Embedded(NamedTuple):
  """A batch as the encoders give it: audio [N, T, E] and text [N, W, E] embeddings,
  their masks [N, T] and [N, W] bool, and audio_ids [N] int."""
  audio: Array
  text: Array
  audio_mask: Array
  text_mask: Array
  audio_ids: Array


@dataclasses.dataclass(frozen=True)
class WholePool:
  """A whole-pool objective's functions of the cross scores s [N, N].

  Attributes:
    loss: (s, audio_ids, *, temperature, bias, beta, relevance, pools, valid) -> the scalar
      loss: its public function with the keywords it reads (`contrastive_loss`).
    negative_logits: (z [N, N] rows anchors, pool, *, beta, bias) -> the log of each
      negative's share of the gradient, up to a row constant (`LossTerms.weights`).
  """
  loss: Callable[..., Array]
  negative_logits: Callable[..., Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """A registered training objective.

  Attributes:
    spec: its name, whether a strategy chooses its negatives, whether it reads relevance,
      its learnt scalars (`specs.Objective`).
    loss_and_terms: (embedded: Embedded, setting: settings.Loss, *, pool [N, N] bool,
      relevance [N, N] or None, learnt: dict, key) -> (scalar loss, sampling.LossTerms).
    whole_pool: a whole-pool objective's functions of the cross scores; None for the
      triplet loss.
  """
  spec: specs.Objective
  loss_and_terms: Callable[..., tuple]
  whole_pool: Optional[WholePool] = None

  @property
  def needs_relevance(self) -> bool:
    return self.spec.needs_relevance


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, loss_and_terms: Callable[..., tuple], **attributes) -> None:
  """Adds a new objective under `name`, specified in `ntxr.specs` as it registers
  (`attributes`: takes_strategy, needs_relevance, learnt); a taken name is refused."""
  spec = specs.Objective(name, **attributes)
  specs.add(spec)
  _add(Objective(spec, loss_and_terms))


def _add(objective: Objective) -> None:
  """Adds an objective to OBJECTIVES; once a name."""
  if objective.spec.name in OBJECTIVES:
    raise ValueError(f"an objective named {objective.spec.name!r} is registered already")
  OBJECTIVES[objective.spec.name] = objective


def _spec_of(name: str) -> specs.Objective:
  """The spec of the objective `name` in `ntxr.specs`; ValueError if it has none."""
  if name not in specs.OBJECTIVES:
    raise ValueError(f"objective {name!r} is not specified in ntxr/specs.py")
  return specs.OBJECTIVES[name]


def get_objective(name: str) -> Objective:
  """The registered objective called `name`; ValueError listing the names otherwise."""
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective {name!r}; choose from {list(OBJECTIVES)}")
  return OBJECTIVES[name]


def initial_parameters(objective: str) -> dict:
  """The objective's learnt scalars for a train state's params ({"objective": {...}}),
  or {} for an objective that learns none."""
  learnt = get_objective(objective).spec.learnt
  if not learnt:
    return {}
  return {"objective": {k: jnp.asarray(v, jnp.float32) for k, v in learnt.items()}}


def _triplet(embedded: Embedded, setting, *, pool, key, **_) -> tuple:
  return sampling.triplet_loss_and_terms(
      embedded.audio, embedded.text, embedded.audio_ids, strategy=setting.strategy,
      margin=setting.margin, key=key, audio_mask=embedded.audio_mask,
      text_mask=embedded.text_mask, score=setting.score, pool=pool)


_add(Objective(_spec_of("triplet"), _triplet))


def _cross_entropy(z: Array, targets: Array, log_weights: Array, candidates: Array) -> Array:
  """Per anchor row [n]: -sum_j targets_ij log(w_ij e^z_ij / sum_k w_ik e^z_ik), the
  softmax over candidates [n, G] bool; targets rows sum to 1."""
  some = candidates.any(axis=1, keepdims=True)  # rows without any stay finite
  logits = jnp.where(candidates, z + log_weights, jnp.where(some, -jnp.inf, 0.0))
  log_softmax = z - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  return -jnp.sum(jnp.where(targets > 0, targets * log_softmax, 0), axis=1)


def _normalised(relevance: Array, candidates: Array) -> Array:
  """relevance [N, N] >= 0 restricted to each row's candidates, rows summing to 1."""
  kept = jnp.where(candidates, relevance, 0)
  return kept / jnp.maximum(kept.sum(axis=1, keepdims=True), 1e-12)


def hard_negative_log_weights(z: Array, pool: Array, beta: float) -> Array:
  """log w [N, N]: 0 off the pool, log(|pool| softmax_pool(beta z)) on it (no gradient)."""
  z = jax.lax.stop_gradient(z)
  logits = jnp.where(pool, beta * z, -jnp.inf)
  log_share = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  count = jnp.maximum(pool.sum(axis=1, keepdims=True), 1)
  return jnp.where(pool, log_share + jnp.log(count), 0.0)


class AnchorRows(NamedTuple):
  """One direction's anchors over their G candidates: z [n, G] scaled scores, targets
  [n, G] >= 0, positives [n, G] bool, pool [n, G] bool, valid [n] bool (padding False).
  A whole batch gives the audio anchors' rows of s and the caption anchors' rows of s.T
  (`_directions`); a device of a sharded batch its own anchors' rows (`ntxr.ring`)."""
  z: Array
  targets: Array
  positives: Array
  pool: Array
  valid: Array


def softmax_rows(audio: AnchorRows, text: AnchorRows, *, log_weights=None,
                 mean=sampling.masked_mean) -> Array:
  """(audio anchors' + caption anchors') / 2 of the mean cross-entropy between the targets
  (normalised over each anchor's candidates) and the softmax of z with log_weights(z,
  pool) added inside it; an anchor's candidates are its positives and its pool, and
  anchors are the valid rows with a pool. mean(values [n], mask [n]): the anchors' mean
  (over a sharded batch, every device's)."""
  def direction(rows):
    candidates = rows.positives | rows.pool
    weights = jnp.zeros_like(rows.z) if log_weights is None else log_weights(rows.z, rows.pool)
    return mean(_cross_entropy(rows.z, _normalised(rows.targets, candidates), weights,
                               candidates), rows.valid & rows.pool.any(axis=1))
  return (direction(audio) + direction(text)) / 2


def _directions(z: Array, targets: Array, positives: Array, pools: Pools,
                valid: Array) -> tuple:
  """The whole batch's (audio anchors', caption anchors') AnchorRows."""
  return (AnchorRows(z, targets, positives, pools.audio, valid),
          AnchorRows(z.T, targets.T, positives.T, pools.text, valid))


def _prepared(s_cross: Array, audio_ids: Array, temperature, pools: Optional[Pools],
              valid: Optional[Array], relevance: Optional[Array] = None) -> tuple:
  """Checks the arguments of a whole-pool objective; (z, positives, pools, valid)."""
  if s_cross.ndim != 2 or s_cross.shape[0] != s_cross.shape[1]:
    raise ValueError(f"s_cross must be [N, N], got {s_cross.shape}")
  n = s_cross.shape[0]
  if audio_ids.shape != (n,) or not jnp.issubdtype(audio_ids.dtype, jnp.integer):
    raise ValueError(f"audio_ids must be an integer vector [{n}], got {audio_ids.dtype} "
                     f"{audio_ids.shape}")
  if relevance is not None and relevance.shape != (n, n):
    raise ValueError(f"relevance must be [{n}, {n}], got {relevance.shape}")
  valid = jnp.ones(n, bool) if valid is None else valid
  both_valid = valid[:, None] & valid[None, :]  # padding is no anchor's candidate
  pools = default_pools(audio_ids) if pools is None else pools
  pools = Pools(pools.text & both_valid, pools.audio & both_valid)
  positives = (audio_ids[:, None] == audio_ids[None, :]) & both_valid
  return s_cross.astype(jnp.float32) / temperature, positives, pools, valid


def infonce(s_cross: Array, audio_ids: Array, *, temperature=0.05,
            pools: Optional[Pools] = None, valid: Optional[Array] = None) -> Array:
  """InfoNCE with several positives per anchor, both directions.

  l(t) = -(1/|P_t|) sum_{a in P_t} log softmax(z[:, t])[a] over caption anchor t's
  candidates, the same over rows for audio anchors; the loss is (mean_t l_t2a +
  mean_a l_a2t) / 2.

  Args:
    s_cross: [N, N] float, s_cross[a, t] = score(audio a, text t).
    audio_ids: [N] int, equal exactly when two captions belong to the same clip.
    temperature: z = s_cross / temperature (a traced value is fine: it may be learnt).
    pools: the anchors' negatives (default: `default_pools(audio_ids)`), padding left out.
    valid: [N] bool, False for padding rows (default: all valid).

  Returns:
    The scalar loss.

  References:
    Oord, Li, Vinyals, "Representation Learning with Contrastive Predictive Coding",
    2018; Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (several positives).

  Example:
    >>> s = jnp.array([[1., 0.], [0., 1.]])
    >>> round(float(infonce(s, jnp.array([0, 1]), temperature=1.0)), 4)  # -log(e/(e+1))
    0.3133
  """
  z, positives, pools, valid = _prepared(s_cross, audio_ids, temperature, pools, valid)
  return softmax_rows(*_directions(z, positives.astype(z.dtype), positives, pools, valid))


def hn_nce(s_cross: Array, audio_ids: Array, *, temperature=0.05, beta: float = 0.0,
           pools: Optional[Pools] = None, valid: Optional[Array] = None) -> Array:
  """InfoNCE with each negative j weighted inside the softmax by its hardness,
  w_j = |pool| exp(beta z_j) / sum_k exp(beta z_k) (no gradient through w).

  Args:
    s_cross, audio_ids, temperature, pools, valid: as `infonce`.
    beta: hardness; 0 is `infonce`, above 0 weights the higher-scored negatives more.

  Returns:
    The scalar loss.

  References:
    Robinson et al., "Contrastive Learning with Hard Negative Samples", ICLR 2021;
    Radenovic et al., "Filtering, Distillation, and Hard Negatives for Vision-Language
    Pre-Training", CVPR 2023 (HN-NCE).

  Example:
    >>> s = jnp.array([[1., 0.], [0., 1.]])
    >>> round(float(hn_nce(s, jnp.array([0, 1]), temperature=1.0, beta=2.0)), 4)
    0.3133
  """
  z, positives, pools, valid = _prepared(s_cross, audio_ids, temperature, pools, valid)
  return softmax_rows(*_directions(z, positives.astype(z.dtype), positives, pools, valid),
                      log_weights=lambda z, pool: hard_negative_log_weights(z, pool, beta))


def soft(s_cross: Array, audio_ids: Array, relevance: Array, *, temperature=0.05,
         pools: Optional[Pools] = None, valid: Optional[Array] = None) -> Array:
  """Cross-entropy of the softmaxes against soft targets: each anchor's relevance over
  its candidates, normalised to sum to 1; relevance = P is `infonce`.

  Args:
    s_cross, audio_ids, temperature, pools, valid: as `infonce`.
    relevance: [N, N] float >= 0, relevance[a, t] of caption t to clip a (1 on P).

  Returns:
    The scalar loss.

  References:
    Xie, Khorrami, Rasanen, Virtanen, "Crowdsourcing and Evaluating Text-Based Audio
    Retrieval Relevances", DCASE 2023 (graded relevance of other clips' captions).

  Example:
    >>> s, ids = jnp.array([[1., 0.], [0., 1.]]), jnp.array([0, 1])
    >>> round(float(soft(s, ids, jnp.eye(2), temperature=1.0)), 4)  # infonce
    0.3133
    >>> round(float(soft(s, ids, jnp.ones((2, 2)), temperature=1.0)), 4)  # both equal
    0.8133
  """
  if relevance is None:
    raise ValueError("objective 'soft' needs relevance= [N, N]")
  z, positives, pools, valid = _prepared(s_cross, audio_ids, temperature, pools, valid,
                                         relevance)
  return softmax_rows(*_directions(z, relevance, positives, pools, valid))


def siglip(s_cross: Array, audio_ids: Array, *, temperature=0.1, bias=-10.0,
           pools: Optional[Pools] = None, valid: Optional[Array] = None) -> Array:
  """The sigmoid loss: every (clip, caption) pair is a binary decision,
  -(1/N) sum_{a,t} log sigmoid(y[a, t] (z[a, t] + bias)), y = +1 on P and -1 on the
  other candidates (pairs in both anchors' pools).

  Args:
    s_cross, audio_ids, pools, valid: as `infonce`.
    temperature: z = s_cross / temperature; SigLIP learns 1 / temperature from 10.
    bias: the logit bias, learnt from -10.

  Returns:
    The scalar loss.

  References:
    Zhai, Mustafa, Kolesnikov, Beyer, "Sigmoid Loss for Language Image Pre-Training",
    ICCV 2023.

  Example:
    >>> s = jnp.array([[1., 0.], [0., 1.]])  # -(2 log sig(1) + 2 log sig(0)) / 2
    >>> round(float(siglip(s, jnp.array([0, 1]), temperature=1.0, bias=0.0)), 4)
    1.0064
  """
  z, positives, pools, valid = _prepared(s_cross, audio_ids, temperature, pools, valid)
  pairs = positives | (pools.audio & pools.text.T)
  return -siglip_log_likelihood(z, positives, pairs, bias) / jnp.maximum(valid.sum(), 1)


def siglip_log_likelihood(z: Array, positives: Array, pairs: Array, bias) -> Array:
  """sum over the pairs [n, G] bool of log sigmoid(y (z + bias)), y = +1 on positives
  [n, G] bool and -1 elsewhere: `siglip`'s sum over some audio anchors' rows."""
  signs = jnp.where(positives, 1.0, -1.0)
  return jnp.sum(jnp.where(pairs, jax.nn.log_sigmoid(signs * (z + bias)), 0))


def _whole_pool(name: str) -> WholePool:
  """The whole-pool functions of the objective `name`; ValueError naming those that have
  them otherwise."""
  whole_pool = OBJECTIVES[name].whole_pool if name in OBJECTIVES else None
  if whole_pool is None:
    raise ValueError(f"unknown objective {name!r}; the whole-pool ones are "
                     f"{[n for n, o in OBJECTIVES.items() if o.whole_pool]}")
  return whole_pool


def contrastive_loss(s_cross: Array, audio_ids: Array, *, objective: str,
                     temperature: float = 0.05, bias: float = 0.0, beta: float = 0.0,
                     relevance: Optional[Array] = None, pools: Optional[Pools] = None,
                     valid: Optional[Array] = None) -> Array:
  """The whole-pool `objective` by name ("infonce", "hn_nce", "soft" or "siglip") with
  the keywords it reads (bias: siglip's; beta: hn_nce's; relevance: soft's).

  Example:
    >>> s = jnp.array([[1., 0.], [0., 1.]])
    >>> round(float(contrastive_loss(s, jnp.array([0, 1]), objective="infonce",
    ...                              temperature=1.0)), 4)
    0.3133
  """
  return _whole_pool(objective).loss(s_cross, audio_ids, temperature=temperature, bias=bias,
                                     beta=beta, relevance=relevance, pools=pools, valid=valid)


def pool_weights(logits: Array, pool: Array) -> Array:
  """Softmax of logits [N, N] over each row's pool; 0 for rows without one."""
  logits = jnp.where(pool, logits, -jnp.inf)
  peak = jnp.max(jnp.where(pool.any(axis=1, keepdims=True), logits, 0), axis=1, keepdims=True)
  exp = jnp.where(pool, jnp.exp(logits - peak), 0)
  return exp / jnp.maximum(exp.sum(axis=1, keepdims=True), 1e-30)


def whole_pool_loss_and_terms(s_cross: Array, audio_ids: Array, learnt: dict, *,
                              objective: str, temperature: float, beta: float,
                              relevance: Optional[Array] = None,
                              pools: Optional[Pools] = None) -> tuple:
  """(loss, sampling.LossTerms) of a training batch. learnt: the objective's
  parameters (initial_parameters), which replace temperature and bias where present.
  The terms hold the positives, each anchor's mean pool score, and the weights each
  anchor's negatives carry."""
  temperature, bias = learnt_scalars(learnt, temperature)
  pools = default_pools(audio_ids) if pools is None else pools
  loss = contrastive_loss(s_cross, audio_ids, objective=objective, temperature=temperature,
                          bias=bias, beta=beta, relevance=relevance, pools=pools)
  s = jax.lax.stop_gradient(s_cross)
  return loss, pool_terms(objective, sampling.whole_rows(s, True, s.shape[0]), pools,
                          temperature=temperature, beta=beta, bias=bias)


def learnt_scalars(learnt: dict, temperature) -> tuple:
  """(temperature, bias): the objective's learnt ones where it has them (siglip's),
  else the setting's temperature and no bias."""
  if "log_inverse_temperature" in learnt:
    temperature = jnp.exp(-learnt["log_inverse_temperature"])
  return temperature, learnt.get("bias", 0.0)


def pool_terms(objective: str, rows: sampling.Rows, pools: Pools, *, temperature, beta,
               bias) -> sampling.LossTerms:
  """A whole-pool objective's LossTerms from its anchors' rows of the cross scores (no
  gradient) and pools' rows: the positives, each anchor's mean pool score, and the
  weight each negative carries [2, n, G]."""
  logits = _whole_pool(objective).negative_logits
  frozen = jax.lax.stop_gradient(temperature)
  hyper = dict(beta=beta, bias=jax.lax.stop_gradient(bias))
  weights = jnp.stack([
      pool_weights(logits(rows.by_text / frozen, pools.text, **hyper), pools.text),
      pool_weights(logits(rows.by_audio / frozen, pools.audio, **hyper), pools.audio)])
  negative = jnp.stack([sampling.masked_mean(rows.by_text, pools.text, axis=1),
                        sampling.masked_mean(rows.by_audio, pools.audio, axis=1)], axis=1)
  valid = pools.text.any(axis=1) | pools.audio.any(axis=1)
  return sampling.LossTerms(rows.positive, negative, valid, weights)


def _add_whole_pool(name: str, loss: Callable[..., Array],
                    negative_logits: Callable[..., Array]) -> None:
  """Registers the specified whole-pool objective `name` (`WholePool(loss,
  negative_logits)`): its loss_and_terms is the cross score matrix of the embeddings, with
  gradient, then `whole_pool_loss_and_terms`."""
  def loss_and_terms(embedded: Embedded, setting, *, pool, relevance, learnt, **_):
    s_cross = scores.get_scorer(setting.score).matrix(
        embedded.audio, embedded.text, embedded.audio_mask, embedded.text_mask)
    return whole_pool_loss_and_terms(
        s_cross, embedded.audio_ids, learnt, objective=name, temperature=setting.temperature,
        beta=setting.beta, relevance=relevance, pools=Pools(pool, pool))
  _add(Objective(_spec_of(name), loss_and_terms, WholePool(loss, negative_logits)))


_add_whole_pool(
    "infonce", lambda s, ids, *, temperature, pools, valid, **_: infonce(
        s, ids, temperature=temperature, pools=pools, valid=valid),
    lambda z, pool, **_: z)
_add_whole_pool(
    "hn_nce", lambda s, ids, *, temperature, beta, pools, valid, **_: hn_nce(
        s, ids, temperature=temperature, beta=beta, pools=pools, valid=valid),
    lambda z, pool, *, beta, **_: z + hard_negative_log_weights(z, pool, beta))
_add_whole_pool(
    "soft", lambda s, ids, *, temperature, relevance, pools, valid, **_: soft(
        s, ids, relevance, temperature=temperature, pools=pools, valid=valid),
    lambda z, pool, **_: z)
_add_whole_pool(
    "siglip", lambda s, ids, *, temperature, bias, pools, valid, **_: siglip(
        s, ids, temperature=temperature, bias=bias, pools=pools, valid=valid),
    lambda z, pool, *, bias, **_: jax.nn.log_sigmoid(z + bias))
specs.check_registered(specs.OBJECTIVES, OBJECTIVES)
