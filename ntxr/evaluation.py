"""A run's splits embedded, scored and measured: the validation split's retrieval
metrics and collapse diagnostics, the test split's metrics, DCASE files and how the
ranking agrees with people's judgements. The metrics themselves are `ntxr.evaluate`'s.

  evaluation = Evaluation(settings, corpus, devices)
  split = evaluation.embed_split(state, "validation")       # evaluate.SplitEmbeddings
  metrics, collapse = evaluation.validation_results(loss, split, scores, training)
  metrics, submission, matrix = evaluation.test(state)
"""

import dataclasses
from typing import Optional

from absl import logging
import numpy as np

from ntxr import dcase, embedder as embedder_lib, evaluate, parallel, relevance, settings
from ntxr import steps
from ntxr.data import corpus as corpus_lib


class Evaluation:
  """The evaluation of one setting's splits on a prepared corpus. Making one reads the
  judgements of the test split (people's relevance file or ratings), so that a bad file
  stops a run before it trains."""

  def __init__(self, run_settings: settings.Settings, corpus: corpus_lib.Corpus,
               devices: parallel.Devices):
    self.settings, self.corpus, self.devices = run_settings, corpus, devices
    data = run_settings.data
    self.test_split = data.splits[2]
    relevance_file = data.relevance_file or corpus.relevance_file
    self.relevant = relevance.read_dcase2025(relevance_file) if relevance_file else None
    # What each judged metric is judged against, for results.json: the built-in corpus
    # writes its own relevance file from its clips' events.
    built_in = relevance_file == corpus.relevance_file and corpus.events is not None
    self.judged_against = dict(
        t2a_multi="built-in corpus events" if built_in else relevance_file,
        t2a_graded=data.graded_relevance_dir)
    self.rated = None
    if data.graded_relevance_dir:
      self.rated = relevance.read_tau(data.graded_relevance_dir, self.test_split).ratings

  def embedder(self, state: steps.TrainState, runs: bool = False) -> embedder_lib.Embedder:
    """Embeds clips and captions with `state` (with runs: the stacked states of runs
    trained together, a RunsEmbedder), as the corpus is shaped."""
    data = self.settings.data
    kind = embedder_lib.RunsEmbedder if runs else embedder_lib.Embedder
    return kind(state, self.devices, tokenizer=self.corpus.tokenizer,
                frame_buckets=data.frame_buckets, max_tokens=data.max_tokens,
                batch_size=self.settings.optimiser.eval_batch_size)

  def embed_split(self, state: steps.TrainState, split: str) -> evaluate.SplitEmbeddings:
    """Every clip and caption of a split embedded, in order."""
    return self.embedder(state).split(self.corpus.clips(split))

  def embed_split_runs(self, states: steps.TrainState, split: str) -> list:
    """`embed_split` by each of the R runs whose states are stacked (one pass over the
    split): their R SplitEmbeddings, in the runs' order."""
    return self.embedder(self.devices.replicate(states), runs=True).splits(
        self.corpus.clips(split))

  def runs_scores(self, splits: list) -> np.ndarray:
    """[R, clips, captions]: the split embedded by R runs (`embed_split_runs`, or one
    run's `embed_split` alone) scored, all runs in one program per block; unchecked
    (`evaluate.finite_scores`)."""
    return evaluate.runs_scores(splits, self.settings.loss.score)

  def validation_results(self, loss: float, split: evaluate.SplitEmbeddings, s: np.ndarray,
                         training: dict) -> tuple:
    """(validation {"loss", "t2a", "a2t"}, Collapse) from the validation loss, the split's
    embeddings and their scores s [clips, captions]; FloatingPointError if either is not
    finite. training: the epoch's mean TrainingStatistics, for Collapse."""
    metrics = evaluate.both_directions(evaluate.finite_scores(split, s), split.clip_ids,
                                       split.caption_ids)
    collapse = evaluate.collapse_diagnostics(
        split.audio, split.audio_mask, split.text, split.text_mask, training,
        dataclasses.asdict(self.settings.collapse))
    return dict(loss=loss, **metrics), collapse

  def test(self, state: steps.TrainState) -> tuple:
    """(test-split metrics, score histogram and what the judged metrics were judged
    against, its DCASE Submission or None when the split has fewer clips than a
    submission ranks, and its DCASE 2025 score matrix (a Submission of the judged
    captions) or None without a relevance file)."""
    split = self.embed_split(state, self.test_split)
    return self.test_results(split, self.runs_scores([split])[0])

  def test_results(self, split: evaluate.SplitEmbeddings, s: np.ndarray) -> tuple:
    """`test`'s results from the test split's embeddings and their scores s [clips,
    captions]; FloatingPointError if either is not finite."""
    s = evaluate.finite_scores(split, s)
    names = self.corpus.captions(self.test_split)
    texts, file_names = [c for _, captions in names for c in captions], [f for f, _ in names]
    submission = None
    if len(names) >= dcase.RANKED:
      submission = dcase.Submission(texts, file_names, s.T)
    metrics = dict(evaluate.both_directions(s, split.clip_ids, split.caption_ids),
                   score_histogram=evaluate.score_histogram(s, split.clip_ids,
                                                            split.caption_ids))
    judged, matrix = self._judged_by_people(texts, file_names, s.T)
    return dict(metrics, **judged, judged_against={
        name: self.judged_against[name] for name in judged}), submission, matrix

  def _judged_by_people(self, texts: list, file_names: list, s: np.ndarray) -> tuple:
    """({"t2a_multi", "t2a_graded"} as measured, the DCASE 2025 score matrix or None)
    from the test split's scores s [captions, clips]; only the judged captions that are
    the split's count (a warning says how many are not)."""
    row = relevance.first_rows(texts)
    judged, matrix = {}, None
    relevant = self._in_split("t2a_multi", self.relevant, row)
    if relevant:
      rows = s[[row[text] for text in relevant]]
      judged["t2a_multi"] = relevance.multi_relevance_metrics(
          relevant, relevance.ranked_by_score(list(relevant), file_names, rows))
      matrix = dcase.Submission(list(relevant), file_names, rows)
    rated = self._in_split("t2a_graded", self.rated, row)
    if rated:
      judged["t2a_graded"] = relevance.graded_metrics(rated, relevance.ranked_by_score(
          list(rated), file_names, s[[row[text] for text in rated]]))
    return judged, matrix

  def _in_split(self, name: str, judged: Optional[dict], captions: dict) -> dict:
    """The entries of `judged` ({caption: judgement} or None) whose caption is one of the
    test split's `captions`; a warning names how many are not."""
    known = {text: value for text, value in (judged or {}).items() if text in captions}
    if len(known) < len(judged or {}):
      logging.warning("%s: %d of the %d judged captions are not captions of the %s split; "
                      "the other %d are scored", name, len(judged) - len(known), len(judged),
                      self.test_split, len(known))
    return known
