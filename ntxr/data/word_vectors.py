"""Word vectors for a vocabulary from a word2vec-format file (the paper's frozen
GoogleNews vectors), with the authors' rules for the words the file lacks."""

import os

import numpy as np

from ntxr.data import tokenizer

# The authors' hand-made variants for the Clotho words word2vec lacks
# (preprocessing/word2vec_embeddings.py): a word gets the mean of its variants' vectors.
AUTHORS_VARIANTS = {
    "axe": ("Axe",), "a": ("A",), "ambulates": ("ambulate",), "of": ("Of",),
    "travelling": ("traveling",), "tictacking": ("ticktock",), "and": ("And",),
    "ribbiting": ("ribbit",), "quirking": ("quirk",), "to": ("To",),
    "walkie-talkie": ("walkie", "talkie"),
}


def _records(path: str, binary: bool):
  """Yields (line_number, word, vector bytes or text fields) after the header."""
  with open(path, "rb") as f:
    header = f.readline().split()
    if len(header) != 2 or not all(h.isdigit() for h in header):
      raise ValueError(f"{path}:1: expected a word2vec header 'count dimension', "
                       f"got {b' '.join(header)[:60]!r}")
    count, dim = map(int, header)
    yield count, dim
    for index in range(count):
      line = index + 2
      if binary:
        word = b""
        while (char := f.read(1)) != b" ":
          if not char:
            raise ValueError(f"{path}: record {index + 1}: file ends inside a word; "
                             f"the header promised {count} vectors")
          word += char
        values = f.read(4 * dim)
        if len(values) != 4 * dim:
          raise ValueError(f"{path}: record {index + 1} ({word.strip()!r}): file ends "
                           f"inside its vector")
        yield line, word.strip(), values
      else:
        fields = f.readline().rstrip().split(b" ")
        if fields == [b""]:
          raise ValueError(f"{path}:{line}: file ends; the header promised {count} vectors")
        yield line, fields[0], fields[1:]


def _is_binary(path: str) -> bool:
  """A text file's second line is a word and decimal numbers; a binary one is not."""
  with open(path, "rb") as f:
    f.readline()
    first = f.readline(1 << 16)
  try:
    fields = first.decode("utf-8").split()
    [float(x) for x in fields[1:]]
  except (UnicodeDecodeError, ValueError):
    return True
  return len(fields) < 2


def read_word2vec(path: str, words: list, *, binary=None, seed: int = 0,
                  missing: str = "random", variants: str = "rules"):
  """Vectors for `words` from a word2vec-format file (binary or text).

  Args:
    path: a `.bin` (C binary: header, then word, space, float32 x dim) or text file
      (header, then one 'word v1 .. vdim' per line); `binary=None` detects which.
    words: the vocabulary, e.g. `WordTokenizer.words`.
    seed: seeds the vectors of words the file lacks.
    missing: what a word the file lacks gets: "random" (a small random vector of its
      own) or "one_unk" (the authors' one UNK vector: unit norm, drawn around the found
      vectors' mean until its cosine with each of them is at most 0.25).
    variants: what stands in for a word the file lacks. "rules": the file's first entry
      equal to it in lower case, else, for a hyphenated word, the mean of its parts'
      vectors when the file has them all. "authors": the mean of its variants' vectors
      in AUTHORS_VARIANTS, and nothing else.

  Returns:
    (table [len(words), dim] float32, missing: list of words not in the file). A word
    matches exactly first. Row tokenizer.PAD_ID is zero.
  """
  if missing not in ("random", "one_unk"):
    raise ValueError(f"missing must be 'random' or 'one_unk', not {missing!r}")
  if variants not in ("rules", "authors"):
    raise ValueError(f"variants must be 'rules' or 'authors', not {variants!r}")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: word vectors not found")
  binary = _is_binary(path) if binary is None else binary
  records = _records(path, binary)
  _, dim = next(records)
  if variants == "rules":
    parts = {w: w.split("-") for w in words if "-" in w.strip("-")}
  else:
    parts = {w: AUTHORS_VARIANTS[w] for w in words if w in AUTHORS_VARIANTS}
  lookup = list(dict.fromkeys([*words, *(p for ps in parts.values() for p in ps if p)]))
  wanted = {w: i for i, w in enumerate(lookup)}
  table = np.zeros((len(lookup), dim), np.float32)
  found = {}  # row -> True for an exact match, False for a lower-case one
  for line, raw, values in records:
    try:
      word = raw.decode("utf-8")
    except UnicodeDecodeError:
      continue  # byte-truncated multi-byte words appear in real files; never wanted
    exact = word in wanted
    row = wanted.get(word, wanted.get(word.lower()) if variants == "rules" else None)
    if row is None or found.get(row) is True or (row in found and not exact):
      continue
    if binary:
      vector = np.frombuffer(values, "<f4")
    else:
      if len(values) != dim:
        raise ValueError(f"{path}:{line}: {word!r} has {len(values)} values, expected {dim}")
      try:
        vector = np.asarray(values, np.float32)
      except ValueError as error:
        raise ValueError(f"{path}:{line}: {word!r}: {error}") from None
    if not np.all(np.isfinite(vector)):
      raise ValueError(f"{path}:{line}: {word!r} has a non-finite value")
    table[row], found[row] = vector, exact
  for word, pieces in parts.items():
    rows = [wanted[p] for p in pieces if p]
    if wanted[word] not in found and all(r in found for r in rows):
      table[wanted[word]], found[wanted[word]] = table[rows].mean(axis=0), False
  table, found = table[:len(words)], [i for i in found if i < len(words)]
  rows = [i for i in range(len(words)) if i not in found and i != tokenizer.PAD_ID]
  rng = np.random.default_rng(seed)
  if missing == "one_unk":
    table[rows] = _unknown_vector(table[found], rng)
  else:
    scale = float(np.std(table[found])) if found else 1.0
    table[rows] = rng.normal(0, scale, (len(rows), dim))
  return table, [words[i] for i in rows]


def _unknown_vector(vectors: np.ndarray, rng: np.random.Generator, tries: int = 1000):
  """The authors' UNK vector: unit norm, mean + std * normal of the unit-normalised
  `vectors` [K, dim], redrawn until its |cosine| with every row is at most 0.25 (the
  draw with the lowest such maximum after `tries`)."""
  units = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
  mean, std = units.mean(axis=0), units.std(axis=0)
  best, best_cosine = None, np.inf
  for _ in range(tries):
    candidate = mean + std * rng.standard_normal(vectors.shape[1])
    candidate /= np.linalg.norm(candidate)
    cosine = float(np.abs(units @ candidate).max(initial=0.0))
    if cosine < best_cosine:
      best, best_cosine = candidate, cosine
    if cosine <= 0.25:
      break
  return best.astype(np.float32)
