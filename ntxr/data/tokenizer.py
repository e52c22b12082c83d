"""Caption tokenizers cached by the data.

Three vocabularies share one interface (`vocab_size`, `encode`), with PAD_ID = 0:
  - sentencepiece pieces trained on the development captions (the default);
  - whole words of the cleaned development captions, for word vectors such as the
    paper's frozen Word2Vec (`word_vectors.read_word2vec` aligns a word2vec file to them);
  - a pretrained text encoder's own tokenizer, read from its folder (`PretrainedTokenizer`).
"""

import collections
import os

import numpy as np
import sentencepiece as spm

from ntxr import files
from ntxr.data import captions

PAD_ID, UNK_ID = 0, 1
_RESERVED = ("<pad>", "<unk>")
_HEADER = "# cleaning: "


def padded_ids(tokenizer, caption: str, length: int) -> np.ndarray:
  """A caption's token ids [length] int32: truncated, or padded with PAD_ID.

  Example:
    >>> import tempfile
    >>> words = WordTokenizer(train_words(["a dog barks"], tempfile.mkdtemp() + "/w.txt"))
    >>> padded_ids(words, "A dog", 4).tolist(), padded_ids(words, "a dog barks a", 2).tolist()
    ([2, 4, 0, 0], [2, 4])
  """
  ids = tokenizer.encode(caption)[:length]
  return np.pad(ids, (0, length - len(ids)), constant_values=PAD_ID).astype(np.int32)


def train(texts: list, model_path: str, vocab_size: int, cleaning: str = "ntxr") -> str:
  """Trains sentencepiece on cleaned captions unless `model_path` exists; returns it."""
  clean = captions.TEXT_CLEANING[cleaning]
  if os.path.exists(model_path):
    return model_path
  prefix = files.partial_path(model_path)  # renamed into place when complete
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([clean(c) for c in texts]),
      model_prefix=prefix, vocab_size=vocab_size, pad_id=PAD_ID, unk_id=UNK_ID,
      bos_id=-1, eos_id=-1, hard_vocab_limit=False, model_type="unigram",
      minloglevel=2)
  os.replace(prefix + ".model", model_path)
  os.remove(prefix + ".vocab")
  return model_path


def train_words(texts: list, vocab_path: str, cleaning: str = "ntxr") -> str:
  """Writes every word of the cleaned captions, most frequent first, unless it exists.

  Ties are ordered alphabetically, so the file is the same on every run. The first line
  names the cleaning, so the tokenizer reading it cleans captions the same way.
  """
  if os.path.exists(vocab_path):
    return vocab_path
  clean = captions.TEXT_CLEANING[cleaning]
  counts = collections.Counter(word for caption in texts for word in clean(caption).split())
  words = sorted(counts, key=lambda w: (-counts[w], w))
  files.write_text(vocab_path, "\n".join([f"{_HEADER}{cleaning}", *_RESERVED, *words]) + "\n")
  return vocab_path


class _Uncut:
  """A tokenizer whose `encode` keeps every token (the input pipeline cuts)."""

  def length(self, caption: str) -> int:
    """The caption's tokens."""
    return len(self.encode(caption))


class Tokenizer(_Uncut):
  """Cleaned caption -> int32 sentencepiece ids (never PAD_ID)."""

  def __init__(self, model_path: str, cleaning: str = "ntxr"):
    self.processor = spm.SentencePieceProcessor(model_file=model_path)
    self.clean = captions.TEXT_CLEANING[cleaning]

  @property
  def vocab_size(self) -> int:
    return self.processor.get_piece_size()

  def encode(self, caption: str) -> np.ndarray:
    return np.asarray(self.processor.encode(self.clean(caption)), np.int32)


class PretrainedTokenizer:
  """Caption -> int32 ids of a BERT or RoBERTa folder's own tokenizer (special tokens
  added, cut to max_tokens keeping the last), each its checkpoint's id + 1 so that 0 pads
  whatever the checkpoint's padding id (`models.PretrainedText` takes the 1 away)."""

  def __init__(self, folder: str, max_tokens: int):
    from ntxr.encoders import bert  # pylint: disable=import-outside-toplevel  (JAX)
    config = bert.read_config(folder)
    self.tokenizer = bert.load_tokenizer(folder, config["model_type"], max_tokens)
    self.whole = bert.load_tokenizer(folder, config["model_type"], max_tokens)
    self.whole.no_truncation()
    self.vocab_size = config["vocab_size"] + 1

  def encode(self, caption: str) -> np.ndarray:
    return np.asarray(self.tokenizer.encode(caption).ids, np.int32) + 1

  def length(self, caption: str) -> int:
    """The caption's tokens before the cut at max_tokens."""
    return len(self.whole.encode(caption).ids)


class WordTokenizer(_Uncut):
  """Cleaned caption -> int32 word ids; words outside the vocabulary map to UNK_ID.

  Example:
    >>> import tempfile
    >>> path = train_words(["A dog barks.", "a dog"], tempfile.mkdtemp() + "/w.txt")
    >>> WordTokenizer(path).encode("The dog, barking!").tolist()
    [1, 3, 1]
  """

  def __init__(self, vocab_path: str):
    with open(vocab_path, encoding="utf-8") as f:
      header, *self.words = f.read().split("\n")[:-1]
    cleaning = header[len(_HEADER):]
    if not header.startswith(_HEADER) or cleaning not in captions.TEXT_CLEANING or tuple(
        self.words[:2]) != _RESERVED:
      raise ValueError(f"{vocab_path}: not a word vocabulary (a '{_HEADER}NAME' line, then "
                       f"{_RESERVED})")
    self.clean = captions.TEXT_CLEANING[cleaning]
    self.ids = {word: i for i, word in enumerate(self.words)}

  @property
  def vocab_size(self) -> int:
    return len(self.words)

  def encode(self, caption: str) -> np.ndarray:
    return np.asarray([self.ids.get(w, UNK_ID) for w in self.clean(caption).split()],
                      np.int32)
