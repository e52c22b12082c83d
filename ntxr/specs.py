"""Every strategy and objective by name, with what each needs, in plain Python: the flags,
the settings' checks, the sweep and the per-anchor reference loop read them without JAX.

The kernels register against these specs: `ntxr.sampling` gives each strategy its
selector and `ntxr.objectives` each objective its loss; a kernel of a name not specified
here, or a name specified here without a kernel, stops their import. A strategy or
objective added at run time (`sampling.register`, `objectives.register`) is specified
here as it registers.
"""

import dataclasses
import math
from typing import ClassVar, Mapping, Optional, Union

MATRICES = ("cross", "audio", "text")  # the score matrices [N, N] a strategy may read
# How the reference loop picks an anchor's negatives from its pool: every member, a uniform
# draw, the highest or lowest score, or the score closest to the positive's.
PICKS = ("all", "random", "argmax", "argmin", "closest")


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A way of choosing the triplet loss's negatives.

  Attributes:
    name: what --strategy and --config.strategy call it.
    needs: the score matrix selection reads: "cross" (s_cross[a, t]), "audio" or "text"
      (within one modality, symmetric), or None.
    pick: how the per-anchor reference loop (`ntxr.bench.reference`) picks from each
      pool: one of PICKS, argmax, argmin and closest over the scores `needs` names;
      None for a strategy the loop does not know.
    needs_key: selection draws random numbers.
  """
  name: str
  needs: Optional[str]
  pick: Optional[str] = None
  needs_key: bool = False
  field: ClassVar[str] = "strategy"  # the config field and ntxr.main flag naming it

  def __post_init__(self):
    if self.needs not in (None, *MATRICES) or self.pick not in (None, *PICKS):
      raise ValueError(f"strategy {self.name!r}: needs must be one of {MATRICES} or None "
                       f"and pick one of {PICKS} or None, not {self.needs!r}, {self.pick!r}")


@dataclasses.dataclass(frozen=True)
class Objective:
  """A training objective.

  Attributes:
    name: what --objective and --config.objective call it.
    takes_strategy: one negative per anchor, chosen by a strategy (the triplet loss);
      the others score the whole pool of the cross matrix.
    needs_relevance: reads the relevance of other clips' captions (from caption
      similarity: --config.similarity).
    learnt: the objective's learnt scalars and their initial values.
  """
  name: str
  takes_strategy: bool = False
  needs_relevance: bool = False
  learnt: Mapping[str, float] = dataclasses.field(default_factory=dict)
  field: ClassVar[str] = "objective"  # the config field and ntxr.main flag naming it


# In the order the flags, the sweep's table and its figures list them.
STRATEGIES: dict[str, Strategy] = {s.name: s for s in [
    Strategy("full_batch", needs=None, pick="all"),
    Strategy("random", needs=None, pick="random", needs_key=True),
    Strategy("semihard_cross", needs="cross", pick="closest"),
    Strategy("hard_cross", needs="cross", pick="argmax"),
    Strategy("easy_text", needs="text", pick="argmin"),
    Strategy("hard_text", needs="text", pick="argmax"),
    Strategy("easy_audio", needs="audio", pick="argmin"),
    Strategy("hard_audio", needs="audio", pick="argmax"),
]}
OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("triplet", takes_strategy=True),
    Objective("infonce"),
    Objective("hn_nce"),
    Objective("soft", needs_relevance=True),
    Objective("siglip", learnt={"log_inverse_temperature": math.log(10.0), "bias": -10.0}),
]}


def add(spec: Union[Strategy, Objective]) -> None:
  """Adds a strategy or objective under its name; a taken name is refused."""
  table = STRATEGIES if spec.field == "strategy" else OBJECTIVES
  if spec.name in table:
    raise ValueError(f"a {spec.field} named {spec.name!r} exists already")
  table[spec.name] = spec


def check_registered(specified: Mapping[str, object], registered: Mapping[str, object]
                     ) -> None:
  """Raises ImportError naming the names of `specified` (STRATEGIES or OBJECTIVES) that
  `registered`, their kernels' registry, lacks."""
  missing = [name for name in specified if name not in registered]
  if missing:
    raise ImportError(f"specified in ntxr/specs.py without a kernel: {missing}")


def objectives_without_strategy() -> list:
  """The names of the objectives that take no strategy, in OBJECTIVES' order."""
  return [name for name, objective in OBJECTIVES.items() if not objective.takes_strategy]


def run_name(objective: str, strategy: str) -> str:
  """A run's setting in a word: the strategy of an objective that takes one (the triplet
  loss), else the objective."""
  return strategy if OBJECTIVES[objective].takes_strategy else objective


def run_settings() -> dict:
  """What a run trains with, by the name that names the run (`run_name`, a
  sweep's folders and rows): each strategy, then each objective that takes none."""
  return {**STRATEGIES, **{name: OBJECTIVES[name] for name in objectives_without_strategy()}}
