"""Word vocabulary and word2vec-format vectors, against files written by hand here."""

import re
import struct

import numpy as np
import pytest

from ntxr.data import input_pipeline, tokenizer, word_vectors

VECTORS = {"dog": [1.0, 2.0, 3.0], "Rain": [-1.5, 0.25, 4.0], "rain": [0.5, 0.5, 0.5],
           "Bird": [7.0, 8.0, 9.0], "BIRD": [0.5, -1.0, 2.0], "zzz": [0.0, 0.0, 1.0]}


def write_text(path, vectors):
  lines = [f"{len(vectors)} 3"] + [f"{w} " + " ".join(map(str, v)) for w, v in vectors.items()]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_binary(path, vectors, newline):
  with open(path, "wb") as f:
    f.write(f"{len(vectors)} 3\n".encode())
    for word, vector in vectors.items():
      f.write(word.encode() + b" " + struct.pack("<3f", *vector) + (b"\n" if newline else b""))


def words(tmp_path):
  path = tokenizer.train_words(["A dog barks, rain falls.", "Rain and a bird."],
                               str(tmp_path / "words.txt"))
  return tokenizer.WordTokenizer(path)


def test_word_vocabulary_orders_by_count_then_alphabet(tmp_path):
  tok = words(tmp_path)
  assert tok.words == ["<pad>", "<unk>", "a", "rain", "and", "barks", "bird", "dog", "falls"]
  assert tok.encode("A dog, a CAT!").tolist() == [2, 7, 2, tokenizer.UNK_ID]
  assert tok.encode("").tolist() == []


@pytest.mark.parametrize("form", ["text", "binary", "binary_newline"])
def test_read_word2vec_aligns_rows_to_the_vocabulary(tmp_path, form):
  tok = words(tmp_path)
  path = tmp_path / "vectors"
  if form == "text":
    write_text(path, VECTORS)
  else:
    write_binary(path, VECTORS, newline=form == "binary_newline")
  table, missing = word_vectors.read_word2vec(str(path), tok.words)
  assert table.shape == (9, 3) and table.dtype == np.float32
  np.testing.assert_array_equal(table[tok.ids["dog"]], VECTORS["dog"])
  np.testing.assert_array_equal(table[tok.ids["rain"]], VECTORS["rain"])  # exact beats "Rain"
  np.testing.assert_array_equal(table[tok.ids["bird"]], VECTORS["Bird"])  # first lower-case match
  np.testing.assert_array_equal(table[tokenizer.PAD_ID], 0)
  assert missing == ["<unk>", "a", "and", "barks", "falls"]
  assert np.all(np.abs(table[tok.ids["a"]]) > 0)  # random, never zero


def test_word2vec_format_is_detected(tmp_path):
  write_text(tmp_path / "t", VECTORS)
  write_binary(tmp_path / "b", VECTORS, newline=True)
  assert not word_vectors._is_binary(str(tmp_path / "t"))
  assert word_vectors._is_binary(str(tmp_path / "b"))


@pytest.mark.parametrize("content, message", [
    ("three 3\n", ":1: expected a word2vec header"),
    ("2 3\ndog 1 2 3\n", ":3: file ends; the header promised 2"),
    ("1 3\ndog 1 2\n", ":2: 'dog' has 2 values, expected 3"),
    ("1 3\ndog 1 x 3\n", ":2: 'dog'"),
    ("1 3\ndog 1 nan 3\n", ":2: 'dog' has a non-finite value"),
])
def test_bad_text_vectors_name_file_and_line(tmp_path, content, message):
  path = tmp_path / "bad.txt"
  path.write_text(content)
  with pytest.raises(ValueError, match=f"bad.txt{message}"):
    word_vectors.read_word2vec(str(path), ["<pad>", "<unk>", "dog"], binary=False)


def test_truncated_binary_vectors_are_reported(tmp_path):
  path = tmp_path / "cut.bin"
  write_binary(path, VECTORS, newline=True)
  path.write_bytes(path.read_bytes()[:-7])
  with pytest.raises(ValueError, match="cut.bin: record 6 .*'zzz'.* inside its vector"):
    word_vectors.read_word2vec(str(path), ["<pad>", "<unk>", "dog"], binary=True)
  with pytest.raises(FileNotFoundError, match="nowhere.bin"):
    word_vectors.read_word2vec(str(tmp_path / "nowhere.bin"), ["dog"])


def test_word_tokens_flow_through_the_input_pipeline(tmp_path):
  import tensorflow as tf
  tok = words(tmp_path)
  clips = tf.data.Dataset.from_tensors(dict(
      logmel=tf.zeros([10, 64]), audio_id=tf.constant(4, tf.int64),
      captions=tf.constant(["a dog", "bird and rain"])))
  batch = next(input_pipeline.as_numpy(
      input_pipeline.caption_batches(clips, tok, batch_size=2, max_tokens=4)))
  np.testing.assert_array_equal(batch["tokens"], [[2, 7, 0, 0], [6, 4, 3, 0]])
  np.testing.assert_array_equal(batch["token_mask"], batch["tokens"] > 0)


@pytest.mark.parametrize("lines", [["<pad>", "<unk>", "dog"],  # no cleaning named
                                   ["# cleaning: ntxr", "dog", "rain"],  # no reserved words
                                   ["# cleaning: shouting", "<pad>", "<unk>"]])  # unknown
def test_a_hand_made_word_list_is_refused_naming_the_file(tmp_path, lines):
  path = tmp_path / "words.txt"
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  with pytest.raises(ValueError, match=re.escape(f"{path}: not a word vocabulary")):
    tokenizer.WordTokenizer(str(path))


def test_sentencepiece_learns_and_encodes_cleaned_captions(tmp_path):
  texts = ["A DOG barks loudly!", "Rain falls, a dog barks.", "Birds sing; rain FALLS."] * 30
  tok = tokenizer.Tokenizer(tokenizer.train(texts, str(tmp_path / "spm.model"), 40))
  pieces = [tok.processor.id_to_piece(i) for i in range(tok.vocab_size)]
  assert not [p for p in pieces if p != p.lower() or any(c in p for c in "!,.;")]
  assert tok.encode("A DOG, barks!").tolist() == tok.encode("a dog barks").tolist()


def test_paper_cleaning_keeps_hyphenated_words_and_the_vocabulary_says_so(tmp_path):
  path = tokenizer.train_words(["A walkie-talkie crackles.", "Rain, on a tin-roof!"],
                               str(tmp_path / "words.txt"), cleaning="paper")
  tok = tokenizer.WordTokenizer(path)
  assert "walkie-talkie" in tok.words and "tin-roof" in tok.words
  assert tok.encode("The walkie-talkie").tolist() == [tokenizer.UNK_ID, tok.ids["walkie-talkie"]]
  ntxr_tok = tokenizer.WordTokenizer(tokenizer.train_words(
      ["A walkie-talkie crackles."], str(tmp_path / "ntxr.txt")))
  assert "walkie" in ntxr_tok.words and "walkie-talkie" not in ntxr_tok.words


def test_hyphenated_word_gets_its_parts_mean_and_missing_words_share_one_unit_vector(tmp_path):
  vocabulary = ["<pad>", "<unk>", "walkie-talkie", "dog", "zorp", "blip", "tin-roof"]
  write_text(tmp_path / "v", {"walkie": [1.0, 0.0, 2.0], "talkie": [3.0, 2.0, 0.0],
                              "dog": [0.0, 5.0, 1.0], "tin": [1.0, 1.0, 1.0]})
  table, missing = word_vectors.read_word2vec(str(tmp_path / "v"), vocabulary, missing="one_unk")
  np.testing.assert_allclose(table[2], [2.0, 1.0, 1.0])
  assert missing == ["<unk>", "zorp", "blip", "tin-roof"]  # a part missing: no mean
  np.testing.assert_array_equal(table[1], table[4])
  np.testing.assert_array_equal(table[4], table[5])
  np.testing.assert_allclose(np.linalg.norm(table[4]), 1.0, rtol=1e-6)
  for found in table[2:4]:  # no closer to a found word than a cosine of 0.25, either way
    assert abs(found @ table[4]) <= 0.25 * np.linalg.norm(found)
  random_table, _ = word_vectors.read_word2vec(str(tmp_path / "v"), vocabulary)
  assert not np.array_equal(random_table[4], random_table[5])


def test_the_authors_variants_stand_in_as_their_script_does_and_nothing_else(tmp_path):
  found = {"A": [1.0, 0.0, 0.0], "Axe": [0.0, 2.0, 0.0], "ambulate": [0.0, 0.0, 3.0],
           "walkie": [1.0, 1.0, 0.0], "talkie": [3.0, 1.0, 2.0], "dog": [0.5, 0.5, 0.5],
           "Cat": [9.0, 9.0, 9.0]}
  write_text(tmp_path / "v", found)
  vocabulary = ["<pad>", "<unk>", "a", "axe", "ambulates", "walkie-talkie", "dog", "cat"]
  table, missing = word_vectors.read_word2vec(str(tmp_path / "v"), vocabulary,
                                              missing="one_unk", variants="authors")
  # word2vec_embeddings.py: exact look-ups, then each hand-made variant's mean; every
  # other word the file lacks is UNK (no case rule: "cat" is not "Cat").
  expected, unknown = {}, []
  for token in vocabulary[1:]:
    try:
      expected[token] = np.asarray(found[token])
    except KeyError:
      unknown.append(token)
  for token, variants in word_vectors.AUTHORS_VARIANTS.items():
    if token in unknown:
      expected[token] = np.mean([found[v] for v in variants], axis=0)
      unknown.remove(token)
  assert missing == unknown == ["<unk>", "cat"]
  for row, token in enumerate(vocabulary):
    if token in expected:
      np.testing.assert_allclose(table[row], expected[token], rtol=1e-6)
  rules, rules_missing = word_vectors.read_word2vec(str(tmp_path / "v"), vocabulary)
  np.testing.assert_allclose(rules[7], found["Cat"])
  assert rules_missing == ["<unk>", "ambulates"]
