"""A sentencepiece tokenizer trained on the development captions, cached by the data."""

import os

import numpy as np
import sentencepiece as spm

from ntxr.data import clotho

PAD_ID, UNK_ID = 0, 1


def train(captions: list, model_path: str, vocab_size: int) -> str:
  """Trains on cleaned captions unless `model_path` exists; returns model_path.

  The model is written under a temporary prefix and renamed into place, so an
  interrupted run leaves no model a later run would load.
  """
  if os.path.exists(model_path):
    return model_path
  prefix = f"{model_path}.partial-{os.getpid()}"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([clotho.clean_text(c) for c in captions]),
      model_prefix=prefix, vocab_size=vocab_size, pad_id=PAD_ID, unk_id=UNK_ID,
      bos_id=-1, eos_id=-1, hard_vocab_limit=False, model_type="unigram",
      minloglevel=2)
  os.replace(prefix + ".model", model_path)
  os.remove(prefix + ".vocab")
  return model_path


class Tokenizer:
  """Cleaned caption -> int32 piece ids (never PAD_ID)."""

  def __init__(self, model_path: str):
    self.processor = spm.SentencePieceProcessor(model_file=model_path)

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, caption: str) -> np.ndarray:
    return np.asarray(self.processor.encode(clotho.clean_text(caption)), np.int32)
