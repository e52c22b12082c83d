"""ntxr.encoders.bert against transformers' BertModel / RobertaModel and fast tokenizers.

Tokenizers are trained here on the Clotho evaluation captions (a WordPiece vocabulary and a
byte-level BPE, with the `tokenizers` library), and models have random weights, LayerNorm
weights away from 1 and 0: nothing is downloaded. Outputs are compared on real captions
batched with padding, in float32, by max |ntxr - transformers| / max |transformers| < 1e-5.
"""

import ast
import csv
import html
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from tokenizers import implementations

from ntxr.encoders import references as torch_references

from ntxr import encoders
from ntxr.encoders import bert

transformers = torch_references.transformers()

DATA = os.path.join(os.path.dirname(__file__), "data")
TOLERANCE = 1e-5  # max abs difference / max abs value, float32
VOCAB_SIZE = 1000
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40)
SPECIAL_IN_TEXT = "A dog [MASK] barks while <mask> rain falls."


def _real_captions() -> list:
  """A few hundred real captions: every 16th Clotho evaluation caption, the DCASE 2025
  queries written in capitals, Clotho file names with apostrophes (HTML-escaped in the
  file) and the test recordings' names with accents."""
  with open(os.path.join(DATA, "dcase2022", "clotho_evaluation_captions.csv"),
            encoding="utf-8") as f:
    clotho = [row[f"caption_{i}"] for row in csv.DictReader(f) for i in range(1, 6)]
  with open(os.path.join(DATA, "dcase2025", "metadata_eval.csv"), encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  capitals = [row["query"] for row in rows if row["query"].isupper()]
  apostrophes = sorted({html.unescape(name).removesuffix(".wav")
                        for row in rows for name in ast.literal_eval(row["audio_filenames"])
                        if "&#39;" in name})
  accents = [os.path.splitext(name)[0] for name in sorted(os.listdir(
      os.path.join(DATA, "recordings"))) if not name.isascii()]
  assert capitals and apostrophes and accents
  return clotho[::16] + capitals + apostrophes + accents


CAPTIONS = _real_captions()


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _relative(found, expected) -> float:
  expected = np.asarray(expected)
  return float(np.abs(np.asarray(found) - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory) -> dict:
  """{name: folder}: BERT and RoBERTa tokenizers as transformers saves them (tokenizer.json),
  and as vocab.txt / vocab.json + merges.txt alone (a cased BERT one with tokenizer_config's
  do_lower_case false), each with a config.json that names its model type."""
  root = tmp_path_factory.mktemp("tokenizers")
  folders = {name: str(root / name) for name in
             ("bert", "bert_vocab", "bert_vocab_cased", "roberta", "roberta_vocab")}
  for folder in folders.values():
    os.makedirs(folder)
  wordpiece = implementations.BertWordPieceTokenizer(lowercase=True)
  wordpiece.train_from_iterator(CAPTIONS, vocab_size=VOCAB_SIZE,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
  wordpiece.save_model(folders["bert_vocab"])
  shutil.copy(os.path.join(folders["bert_vocab"], "vocab.txt"), folders["bert_vocab_cased"])
  with open(os.path.join(folders["bert_vocab_cased"], "tokenizer_config.json"), "w") as f:
    json.dump({"do_lower_case": False}, f)
  transformers.BertTokenizerFast(
      vocab=os.path.join(folders["bert_vocab"], "vocab.txt")).save_pretrained(folders["bert"])
  bpe = implementations.ByteLevelBPETokenizer()
  bpe.train_from_iterator(CAPTIONS, vocab_size=VOCAB_SIZE,
                          special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
  bpe.save_model(folders["roberta_vocab"])
  transformers.RobertaTokenizerFast(
      vocab=os.path.join(folders["roberta_vocab"], "vocab.json"),
      merges=os.path.join(folders["roberta_vocab"], "merges.txt")).save_pretrained(
          folders["roberta"])
  assert not os.path.exists(os.path.join(folders["bert_vocab"], "tokenizer.json"))
  assert os.path.exists(os.path.join(folders["roberta"], "tokenizer.json"))
  for name, folder in folders.items():
    _config(name.split("_")[0]).save_pretrained(folder)
  return folders


def _config(model_type: str, **sizes):
  if model_type == "bert":
    return transformers.BertConfig(vocab_size=VOCAB_SIZE, **{**SMALL, **sizes})
  return transformers.RobertaConfig(vocab_size=VOCAB_SIZE, pad_token_id=1, bos_token_id=0,
                                    eos_token_id=2, **{**SMALL, **sizes})


def _randomize_layer_norms(model: torch.nn.Module) -> None:
  """LayerNorm weights and biases away from 1 and 0, as a trained file has them."""
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if "LayerNorm" in name or "layer_norm" in name:
        centre = 1.0 if name.endswith("weight") else 0.0
        parameter.copy_(centre + 0.5 * torch.randn(parameter.shape, generator=generator))


def _model_folder(tokenizer_folder: str, folder: str, model_class, config, *,
                  weights: str = "safetensors") -> torch.nn.Module:
  """A random `model_class` saved in `folder` as model.safetensors (save_pretrained) or as
  pytorch_model.bin (torch.save of its state dict), with the tokenizer's files."""
  torch.manual_seed(0)
  model = model_class(config).eval()
  _randomize_layer_norms(model)
  shutil.copytree(tokenizer_folder, folder)
  if weights == "safetensors":
    model.save_pretrained(folder)
  else:
    config.save_pretrained(folder)
    torch.save(model.state_dict(), os.path.join(folder, "pytorch_model.bin"))
  return model


def _reference_tokens(folder: str, captions: list, max_length: int) -> dict:
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
  return tokenizer(captions, padding=True, truncation=True, max_length=max_length,
                   return_tensors="pt")


@pytest.mark.parametrize("name", ["bert", "bert_vocab", "bert_vocab_cased", "roberta",
                                  "roberta_vocab"])
@pytest.mark.parametrize("max_length", [16, 38])
def test_token_ids_equal_transformers_fast_tokenizer(tokenizer_folders, name, max_length):
  folder, model_type = tokenizer_folders[name], name.split("_")[0]
  captions = CAPTIONS + [SPECIAL_IN_TEXT]
  token_ids, mask = bert.tokenize(bert.load_tokenizer(folder, model_type, max_length), captions)
  expected = _reference_tokens(folder, captions, max_length)
  np.testing.assert_array_equal(token_ids, expected["input_ids"].numpy())
  np.testing.assert_array_equal(mask, expected["attention_mask"].numpy().astype(bool))
  assert token_ids.dtype == np.int32 and mask.dtype == bool
  truncated = mask.sum(axis=1) == max_length
  assert (truncated.sum() > 10) == (max_length == 16)  # long captions cut, at 16 only
  if name == "bert_vocab_cased":  # capitals kept: "[UNK]" or other pieces than uncased
    uncased, _ = bert.tokenize(bert.load_tokenizer(tokenizer_folders["bert_vocab"], "bert",
                                                   max_length), captions)
    assert not np.array_equal(token_ids, uncased)


def _embeddings_reference(model, token_ids: torch.Tensor) -> np.ndarray:
  with torch.no_grad():
    return model.embeddings(input_ids=token_ids).numpy()


def _check_parity(loaded, model, folder: str, captions: list, max_length: int) -> None:
  """ntxr's words, both poolings, the pooler and the embeddings against transformers'."""
  tokens = _reference_tokens(folder, captions, max_length)
  with torch.no_grad():
    reference = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
  hidden = reference.last_hidden_state.numpy()
  mask = tokens["attention_mask"].numpy()
  assert mask.min() == 0  # batched with padding
  (words, found_mask), sentences = loaded.embed(captions)
  np.testing.assert_array_equal(found_mask, mask.astype(bool))
  assert words.shape == hidden.shape and words.dtype == jnp.float32
  assert _relative(words, hidden) < TOLERANCE
  assert _relative(sentences, hidden[:, 0]) < TOLERANCE  # "cls", the default
  token_ids = jnp.asarray(tokens["input_ids"].numpy())
  assert _relative(_embeddings(loaded, token_ids),
                   _embeddings_reference(model, tokens["input_ids"])) < TOLERANCE
  if loaded.module.pooler:
    _, pooled = jax.jit(loaded.module.apply)(loaded.variables, token_ids, mask.astype(bool))
    assert _relative(pooled, reference.pooler_output.numpy()) < TOLERANCE


def _embeddings(loaded, token_ids, **kwargs):
  """The loaded encoder's embeddings (its front end) alone: [B, W] -> [B, W, D]."""
  module = loaded.module
  embeddings = bert.BertEmbeddings(
      vocab_size=module.vocab_size, hidden_size=module.hidden_size,
      max_positions=module.max_positions, type_vocab_size=module.type_vocab_size,
      layer_norm_eps=module.layer_norm_eps, dropout=module.hidden_dropout,
      pad_token_id=module.pad_token_id, position_ids_from_padding=module.position_ids_from_padding)
  return embeddings.apply({"params": loaded.variables["params"]["embeddings"]}, token_ids,
                          **kwargs)


MODELS = {"bert": transformers.BertModel, "roberta": transformers.RobertaModel}


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_outputs_equal_transformers(tokenizer_folders, tmp_path, model_type, weights):
  folder = str(tmp_path / "model")
  model = _model_folder(tokenizer_folders[model_type], folder, MODELS[model_type],
                        _config(model_type), weights=weights)
  loaded = bert.load(folder)
  assert loaded.module.pooler and loaded.module.num_layers == 2
  max_length = bert.max_tokens(loaded.module)
  assert max_length == (40 if model_type == "bert" else 38)
  captions = CAPTIONS if weights == "safetensors" else CAPTIONS[-128:]  # the file read once
  for start in range(0, len(captions), 128):
    _check_parity(loaded, model, folder, captions[start:start + 128], max_length)


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_mean_pooling_is_sentence_berts_masked_mean(tokenizer_folders, tmp_path, model_type):
  folder = str(tmp_path / "model")
  model = _model_folder(tokenizer_folders[model_type], folder, MODELS[model_type],
                        _config(model_type))
  loaded = bert.load(folder, pooling="mean", max_length=16)
  tokens = _reference_tokens(folder, CAPTIONS, 16)
  with torch.no_grad():
    hidden = model(**tokens).last_hidden_state
  weights = tokens["attention_mask"].unsqueeze(-1).float()
  expected = ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)).numpy()
  (words, mask), sentences = loaded.embed(CAPTIONS)
  assert words.shape[1] == 16 and mask.sum(axis=1).max() == 16
  assert _relative(sentences, expected) < TOLERANCE
  assert _relative(words, hidden.numpy()) < TOLERANCE


@pytest.mark.parametrize("model_type,model_class,prefix", [
    ("bert", transformers.BertForPreTraining, "bert."),
    ("roberta", transformers.RobertaForMaskedLM, "roberta.")])
def test_loads_pretraining_files_with_their_prefix_and_heads(tokenizer_folders, tmp_path,
                                                             model_type, model_class, prefix):
  folder = str(tmp_path / "model")
  model = _model_folder(tokenizer_folders[model_type], folder, model_class,
                        _config(model_type, hidden_act="gelu_new"))
  keys = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
  assert any(key.startswith(prefix) for key in keys)
  assert any(key.startswith(("cls.", "lm_head.")) for key in keys)
  loaded = bert.load(folder)
  assert loaded.module.hidden_act == "gelu_new"
  assert loaded.module.pooler == (model_type == "bert")  # RobertaForMaskedLM has no pooler
  _check_parity(loaded, getattr(model, model_type), folder, CAPTIONS[:64], 38)


def test_real_roberta_base_size(tokenizer_folders, tmp_path):
  """RoBERTa-base's sizes (the DCASE 2024/2025 baselines' text encoder): 12 layers of 768,
  50265 words, 514 positions, one token type, LayerNorm eps 1e-5."""
  folder = str(tmp_path / "model")
  config = transformers.RobertaConfig(
      vocab_size=50265, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
      intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1,
      layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0, eos_token_id=2)
  model = _model_folder(tokenizer_folders["roberta"], folder, transformers.RobertaModel, config)
  loaded = bert.load(folder)
  assert bert.max_tokens(loaded.module) == 512
  _check_parity(loaded, model, folder, CAPTIONS[::40], 512)


def test_dropout_follows_the_config_in_training(tokenizer_folders, tmp_path):
  folder = str(tmp_path / "model")
  _model_folder(tokenizer_folders["bert"], folder, transformers.BertModel,
                _config("bert", hidden_dropout_prob=0.25, attention_probs_dropout_prob=0.5))
  loaded = bert.load(folder)
  module = loaded.module
  assert (module.hidden_dropout, module.attention_dropout) == (0.25, 0.5)
  token_ids, mask = bert.tokenize(bert.load_tokenizer(folder, "bert", 40), CAPTIONS[:32])
  rngs = {"dropout": jax.random.PRNGKey(3)}
  evaluated = _embeddings(loaded, token_ids)
  trained = _embeddings(loaded, token_ids, train=True, rngs=rngs)
  kept = np.asarray(trained != 0)
  assert abs(1 - kept.mean() - 0.25) < 0.01  # the embeddings' dropout: hidden_dropout_prob
  np.testing.assert_allclose(np.asarray(trained)[kept], np.asarray(evaluated)[kept] / 0.75,
                             rtol=1e-6)
  run = lambda module, train: module.apply(loaded.variables, token_ids, mask, train=train,
                                           rngs=rngs)[0]
  still = module.clone(hidden_dropout=0.0, attention_dropout=0.0)
  np.testing.assert_array_equal(run(still, True), run(module, False))
  attention_only = module.clone(hidden_dropout=0.0)
  assert not np.allclose(run(attention_only, True), run(module, False))  # attention's


def _write_weights(folder: str, state_dict: dict) -> None:
  safetensors.numpy.save_file(state_dict, os.path.join(folder, "model.safetensors"))


def test_legacy_layer_norm_names_load_the_same(tokenizer_folders, tmp_path):
  folder = str(tmp_path / "model")
  _model_folder(tokenizer_folders["bert"], folder, transformers.BertModel, _config("bert"))
  loaded = bert.load(folder)
  state_dict = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
  _write_weights(folder, {key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
      "LayerNorm.bias", "LayerNorm.beta"): value for key, value in state_dict.items()})
  legacy = bert.load(folder)
  jax.tree.map(np.testing.assert_array_equal, legacy.variables, loaded.variables)


@pytest.fixture(scope="module")
def small_bert(tokenizer_folders, tmp_path_factory) -> str:
  folder = str(tmp_path_factory.mktemp("small") / "bert")
  _model_folder(tokenizer_folders["bert"], folder, transformers.BertModel, _config("bert"))
  return folder


def _edited_copy(small_bert: str, tmp_path, edit) -> tuple:
  """A copy of small_bert whose state dict `edit` changed: (folder, its weights file)."""
  folder = str(tmp_path / "edited")
  shutil.copytree(small_bert, folder)
  state_dict = safetensors.numpy.load_file(os.path.join(folder, "model.safetensors"))
  edit(state_dict)
  _write_weights(folder, state_dict)
  return folder, os.path.join(folder, "model.safetensors")


def _one_line_error(error, *parts) -> None:
  message = str(error.value)
  assert "\n" not in message, message
  for part in parts:
    assert part in message, (part, message)


KEY = "encoder.layer.1.attention.self.query.weight"


def test_wrong_key_is_refused(small_bert, tmp_path):
  folder, file = _edited_copy(small_bert, tmp_path, lambda sd: sd.update(
      {"encoder.layer.1.attention.self.extra.weight": sd[KEY]}))
  with pytest.raises(ValueError) as error:
    bert.load(folder)
  _one_line_error(error, file, "'encoder.layer.1.attention.self.extra.weight'", "(32, 32)",
                  "https://huggingface.co/")


@pytest.mark.parametrize("key, shape", [(KEY, "(32, 32)"),
                                        (KEY.replace("weight", "bias"), "(32,)")])
def test_missing_key_is_refused(small_bert, tmp_path, key, shape):
  folder, file = _edited_copy(small_bert, tmp_path, lambda sd: sd.pop(key))
  with pytest.raises(ValueError) as error:
    bert.load(folder)
  _one_line_error(error, file, repr(key), shape, "missing", "https://huggingface.co/")


def test_a_parameter_given_twice_is_refused(small_bert, tmp_path):
  """A file with a LayerNorm's weight under its name and its legacy name (gamma)."""
  norm = "encoder.layer.0.output.LayerNorm"
  folder, file = _edited_copy(small_bert, tmp_path, lambda sd: sd.update(
      {f"{norm}.gamma": sd[f"{norm}.weight"] + 1}))
  with pytest.raises(ValueError) as error:
    bert.load(folder)
  _one_line_error(error, file, "names a parameter that another key gave already")


def test_wrong_shape_is_refused(small_bert, tmp_path):
  folder, file = _edited_copy(small_bert, tmp_path, lambda sd: sd.update(
      {"encoder.layer.0.intermediate.dense.weight": np.zeros((32, 64), np.float32)}))
  with pytest.raises(ValueError) as error:
    bert.load(folder)
  _one_line_error(error, file, "'encoder.layer.0.intermediate.dense.weight'", "(32, 64)",
                  "expected (64, 32)", "https://huggingface.co/")


def test_unknown_model_type_is_refused(small_bert, tmp_path):
  folder = str(tmp_path / "gpt2")
  shutil.copytree(small_bert, folder)
  transformers.GPT2Config().save_pretrained(folder)
  with pytest.raises(ValueError) as error:
    bert.load(folder)
  _one_line_error(error, os.path.join(folder, "config.json"), "'gpt2'", "('bert', 'roberta')")


@pytest.mark.parametrize("setting,value,named", [
    ("hidden_act", "silu", "'gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu'"),
    ("position_embedding_type", "relative_key", "'absolute'")])
def test_config_the_encoder_does_not_compute_is_refused(small_bert, tmp_path, setting, value,
                                                        named):
  folder = str(tmp_path / "model")
  shutil.copytree(small_bert, folder)
  path = os.path.join(folder, "config.json")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  with open(path, "w", encoding="utf-8") as f:
    json.dump({**config, setting: value}, f)
  with pytest.raises(ValueError) as error:
    bert.load(folder)
  _one_line_error(error, path, f"{setting} {value!r}", named)


@pytest.mark.parametrize("missing,named", [
    ("config.json", ["config.json"]),
    ("model.safetensors", ["model.safetensors", "pytorch_model.bin"]),
    ("vocab.txt", ["vocab.txt", "tokenizer.json"])])
def test_missing_file_is_named(small_bert, tmp_path, missing, named):
  folder = str(tmp_path / "model")
  shutil.copytree(small_bert, folder)
  if missing == "vocab.txt":  # a folder whose tokenizer is vocab.txt alone, without it
    os.remove(os.path.join(folder, "tokenizer.json"))
  else:
    os.remove(os.path.join(folder, missing))
  with pytest.raises(FileNotFoundError) as error:
    bert.load(folder)
  _one_line_error(error, os.path.join(folder, named[0]), *named[1:], "https://huggingface.co/")


def test_pooling_and_max_length_are_checked(small_bert):
  with pytest.raises(ValueError, match="pooling must be one of"):
    bert.load(small_bert, pooling="max")
  with pytest.raises(ValueError, match=r"max_length must be in \[3, 40\], not 41"):
    bert.load(small_bert, max_length=41)


def test_encoders_load_by_name_checks_the_model_type(small_bert):
  """ntxr.encoders.load("bert", folder) is bert.load's encoder; "roberta" of a BERT folder
  and an unknown name are refused in one line."""
  by_name, direct = encoders.load("bert", small_bert), bert.load(small_bert)
  captions = CAPTIONS[:4]
  (words, mask), sentences = by_name.embed(captions)
  (expected_words, expected_mask), expected_sentences = direct.embed(captions)
  np.testing.assert_array_equal(mask, expected_mask)
  np.testing.assert_array_equal(words, expected_words)
  np.testing.assert_array_equal(sentences, expected_sentences)
  with pytest.raises(ValueError, match=f"^{small_bert}: its config.json declares model_type "
                     "'bert', not 'roberta': load it as 'bert'$"):
    encoders.load("roberta", small_bert)
  with pytest.raises(ValueError, match=r"no encoder 'clap': choose from \['cnn14', 'passt', "
                     r"'bert', 'roberta'\]"):
    encoders.load("clap", small_bert)
