"""What an encoder's `load(path)` returns."""

from typing import Any, Callable, NamedTuple


class Loaded(NamedTuple):
  """an encoder, its variables, and embed(inputs) -> (frames or words [B, T, D] with their mask
  [B, T], clips or sentences [B, D])"""
  module: Any
  variables: Any
  embed: Callable
