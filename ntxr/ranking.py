"""Metrics of rankings, in NumPy: from scores, or from each query's ranked hits.

Conventions (docs/design.md, evaluation): per query with n relevant items, R@k is the
share of them in the top k, HR@k whether any is, AP@k (sum over the relevant items at
0-based ranks r_i < k, in rank order i = 1, 2, ..., of i / (r_i + 1)) / min(n, k), the
usual truncated AP, or / n as the DCASE 2025 baseline divides (the same while n <= k),
mAP the mean of full average precision, nDCG@k against graded gains. Ties rank the lower
index first.
"""

import numpy as np

KS = (1, 5, 10)
# What each direction reports: text-to-audio has one relevant clip per caption, so its
# R@k equals HR@k; audio-to-text reports both conventions.
T2A = tuple(f"R@{k}" for k in KS) + ("mAP@10", "mAP")
A2T = tuple(f"R@{k}" for k in KS) + tuple(f"HR@{k}" for k in KS) + ("mAP@10", "mAP")
# Several relevant clips per query (DCASE 2025, which ranks systems by mAP@16).
MULTI = ("mAP@16", "mAP@10") + tuple(f"R@{k}" for k in KS) + tuple(f"HR@{k}" for k in KS)
NDCG_KS = (10, 16)


def ranked_metrics(hits: np.ndarray, count: np.ndarray, ks=KS, ap_at=(10,),
                   full: bool = True, divide_by_all_relevant: bool = False) -> dict:
  """Metrics of rankings given as hits, each query's items in rank order.

  Args:
    hits: [Q, L] bool, whether the item at each 0-based rank is relevant; L may be
      shorter than the ranking (a top-L list): what lies beyond counts as not retrieved.
    count: [Q] each query's number of relevant items (at least 1), ranked or not.
    ks: the R@k and HR@k cut-offs; ap_at: the AP@k cut-offs.
    full: whether hits cover the whole ranking, so that mAP can be reported.
    divide_by_all_relevant: AP@k divides by n, as DCASE 2025 does, not by min(n, k).
  Returns:
    {"R@k", "HR@k" for k in ks, "mAP@k" for k in ap_at, and "mAP" if full}: floats
    averaged over queries.

  Example (relevant items at ranks 0 and 2 of 3, one more relevant item unranked):
    >>> m = ranked_metrics(np.array([[True, False, True]]), np.array([3]), ks=(1, 2),
    ...                    ap_at=(2, 3), full=False)
    >>> m["R@2"], m["HR@1"], round(m["mAP@2"], 4), round(m["mAP@3"], 4)
    (0.3333333333333333, 1.0, 0.5, 0.5556)
  """
  hits, count = np.asarray(hits, bool), np.asarray(count)
  if not count.all():
    raise ValueError(f"query {int(np.argmin(count))} has no relevant item")
  precision = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
  metrics = {}
  for k in ks:
    metrics[f"R@{k}"] = float(np.mean(hits[:, :k].sum(axis=1) / count))
    metrics[f"HR@{k}"] = float(np.mean(hits[:, :k].any(axis=1)))
  for k in ap_at:
    divisor = count if divide_by_all_relevant else np.minimum(count, k)
    metrics[f"mAP@{k}"] = float(np.mean((precision[:, :k] * hits[:, :k]).sum(axis=1) / divisor))
  if full:
    metrics["mAP"] = float(np.mean((precision * hits).sum(axis=1) / count))
  return metrics


def rank_order(score: np.ndarray) -> np.ndarray:
  """[Q, D] scores -> [Q, D] item indices best first (ties: the lower index first);
  FloatingPointError for NaN or infinity."""
  score = np.asarray(score, np.float64)
  if not np.isfinite(score).all():
    raise FloatingPointError("scores hold NaN or infinity")
  return np.argsort(-score, axis=1, kind="stable")


def retrieval_metrics(score: np.ndarray, relevant: np.ndarray, ks=KS, ap_at=(10,)) -> dict:
  """Metrics of ranking each query's items by score (`ranked_metrics`).

  Args:
    score: [Q, D] float, higher is better.
    relevant: [Q, D] bool; every query needs at least one relevant item.
  Returns:
    {"R@k", "HR@k" for k in ks, "mAP@k" for k in ap_at, "mAP"}: floats averaged over
    queries.

  Example:
    >>> m = retrieval_metrics(np.array([[.1, .9, .5]]), np.array([[True, False, True]]))
    >>> m["R@1"], m["HR@5"], round(m["mAP"], 4), round(m["mAP@10"], 4)
    (0.0, 1.0, 0.5833, 0.5833)
  """
  relevant = np.asarray(relevant, bool)
  if np.shape(score) != relevant.shape or relevant.ndim != 2:
    raise ValueError(f"score {np.shape(score)} and relevant {relevant.shape} must be one "
                     f"[Q, D]")
  hits = np.take_along_axis(relevant, rank_order(score), axis=1)
  return ranked_metrics(hits, relevant.sum(axis=1), ks, ap_at)


def ranked_ndcg(gains: np.ndarray, ideal: np.ndarray, ks=NDCG_KS) -> dict:
  """nDCG@k of rankings given as gains in rank order.

  Args:
    gains: [Q, L] the gain of the item at each 0-based rank r, discounted by
      1 / log2(r + 2); items beyond L gain nothing.
    ideal: [Q, G] every gain the query has to give (any order): its best ranking's DCG
      is the denominator. Queries whose ideal DCG is 0 are left out.
  Returns:
    {"nDCG@k" for k in ks, "queries": the number scored}.

  Example (gains 0.5 and 1.0 at ranks 0 and 1; the ideal ranks 1.0 first):
    >>> m = ranked_ndcg(np.array([[0.5, 1.0, 0.0]]), np.array([[1.0, 0.5]]), ks=(2,))
    >>> round(m["nDCG@2"], 4), m["queries"]
    (0.8597, 1)
  """
  gains, ideal = np.asarray(gains, np.float64), -np.sort(-np.asarray(ideal, np.float64))
  dcg = lambda g, k: (g[:, :k] / np.log2(np.arange(g[:, :k].shape[1]) + 2)).sum(axis=1)
  scored = dcg(ideal, ideal.shape[1]) > 0
  metrics = {f"nDCG@{k}": float(np.mean(dcg(gains[scored], k) / dcg(ideal[scored], k)))
             if scored.any() else float("nan") for k in ks}
  return dict(metrics, queries=int(scored.sum()))
