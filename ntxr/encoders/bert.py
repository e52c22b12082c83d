"""BERT and RoBERTa text encoders in Flax Linen, as Hugging Face transformers computes them.

`load(folder)` reads a Hugging Face model folder (config.json, model.safetensors or
pytorch_model.bin, the tokenizer's own files) and returns `Loaded(module, variables, embed)`,
embed(captions) -> ((words [B, W, D], mask [B, W]), sentences [B, D]). Words are the last
hidden states (at padded tokens as transformers computes them there: the mask says which
count); a sentence is the first token's last hidden state ("cls", as the DCASE 2024/2025
baselines use RoBERTa) or the masked mean over tokens ("mean", as Sentence-BERT).

The encoder: word + position + token type embeddings, LayerNorm; post-LN layers of masked
self-attention and a feed-forward block; an optional pooler (tanh of a dense layer on the first
token). RoBERTa's position ids start after its padding id and skip padding; BERT's count from 0.
"""

import functools
import json
import os
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from tokenizers import models, normalizers, pre_tokenizers, processors

from ntxr.encoders import checkpoint_files
from ntxr.encoders.loaded import Loaded

Array = jax.Array
PUBLISHED = ("https://huggingface.co/MODEL (e.g. google-bert/bert-base-uncased, "
             "FacebookAI/roberta-base)")
MODEL_TYPES = ("bert", "roberta")
POOLINGS = ("cls", "mean")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ACTIVATIONS = {"gelu": functools.partial(nn.gelu, approximate=False),
               "gelu_new": functools.partial(nn.gelu, approximate=True),
               "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
               "relu": nn.relu}
# config.json's values where it leaves them out (transformers' BertConfig / RobertaConfig).
_SHARED_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, hidden_act="gelu", hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1, max_position_embeddings=512,
                        type_vocab_size=2, layer_norm_eps=1e-12)
CONFIG_DEFAULTS = {"bert": dict(_SHARED_DEFAULTS, vocab_size=30522, pad_token_id=0),
                   "roberta": dict(_SHARED_DEFAULTS, vocab_size=50265, pad_token_id=1)}
# Keys of a published file the encoder never uses: the pre-training heads and buffers.
UNUSED_PREFIXES = ("cls.predictions.", "cls.seq_relationship.", "lm_head.",
                   "embeddings.position_ids", "embeddings.token_type_ids")
SPECIAL_TOKENS = {
    "bert": dict(unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]",
                 mask_token="[MASK]"),
    "roberta": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", sep_token="</s>",
                    cls_token="<s>", pad_token="<pad>", mask_token="<mask>")}


def _layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  # The variance as the mean of squared deviations, as PyTorch computes it.
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype, name=name)


class BertEmbeddings(nn.Module):
  """Token ids [B, W] -> LayerNorm(word + position + token type 0 embeddings) [B, W, D].

  position_ids_from_padding: RoBERTa's positions, pad_token_id + 1 onwards over the tokens
  that are not pad_token_id, pad_token_id at those that are; else 0, 1, ... (BERT).
  """
  vocab_size: int
  hidden_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float
  dropout: float
  pad_token_id: int
  position_ids_from_padding: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, token_ids: Array, *, train: bool = False) -> Array:
    if self.position_ids_from_padding:
      not_padding = (token_ids != self.pad_token_id).astype(jnp.int32)
      positions = jnp.cumsum(not_padding, axis=1) * not_padding + self.pad_token_id
    else:
      positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape)
    embed = lambda size, name: nn.Embed(size, self.hidden_size, dtype=self.dtype, name=name)
    x = (embed(self.vocab_size, "word_embeddings")(token_ids)
         + embed(self.type_vocab_size, "token_type_embeddings")(jnp.zeros_like(token_ids))
         + embed(self.max_positions, "position_embeddings")(positions))
    x = _layer_norm(self.layer_norm_eps, self.dtype, "LayerNorm")(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class BertLayer(nn.Module):
  """[B, W, D] with mask [B, W] -> [B, W, D]: LayerNorm(x + attention), LayerNorm(x + MLP)."""
  num_heads: int
  intermediate_size: int
  layer_norm_eps: float
  hidden_act: str
  hidden_dropout: float
  attention_dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array, train: bool = False) -> Array:
    batch, words, hidden = x.shape
    head_size = hidden // self.num_heads
    dense = lambda size, name: nn.Dense(size, dtype=self.dtype, name=name)
    heads = lambda name: dense(hidden, name)(x).reshape(batch, words, self.num_heads, head_size)
    query, key, value = heads("query"), heads("key"), heads("value")
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * head_size ** -0.5
    # A padded key adds the lowest value (transformers' additive mask); softmax in float32.
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.attention_dropout, deterministic=not train)(weights)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value).reshape(batch, words, hidden)
    attended = nn.Dropout(self.hidden_dropout, deterministic=not train)(
        dense(hidden, "attention_output")(attended))
    x = _layer_norm(self.layer_norm_eps, self.dtype, "attention_LayerNorm")(x + attended)
    h = ACTIVATIONS[self.hidden_act](dense(self.intermediate_size, "intermediate")(x))
    h = nn.Dropout(self.hidden_dropout, deterministic=not train)(dense(hidden, "output")(h))
    return _layer_norm(self.layer_norm_eps, self.dtype, "output_LayerNorm")(x + h)


class BertEncoder(nn.Module):
  """Token ids [B, W] with mask [B, W] -> (last hidden states [B, W, D], pooled [B, D] or
  None without a pooler). Sizes and names as transformers' BertConfig; see `module_from_config`.
  dtype: of the computation (parameters stay float32); remat: each layer's activations
  are recomputed for the gradient, not kept (less memory, more compute).
  """
  vocab_size: int
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  pad_token_id: int = 0
  position_ids_from_padding: bool = False
  pooler: bool = False
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, token_ids: Array, mask: Array, *,
               train: bool = False) -> Tuple[Array, Optional[Array]]:
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden size {self.hidden_size} is not a multiple of "
                       f"{self.num_heads} attention heads")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act must be one of {tuple(ACTIVATIONS)}, not "
                       f"{self.hidden_act!r}")
    x = BertEmbeddings(self.vocab_size, self.hidden_size, self.max_positions,
                       self.type_vocab_size, self.layer_norm_eps, self.hidden_dropout,
                       self.pad_token_id, self.position_ids_from_padding, self.dtype,
                       name="embeddings")(token_ids, train=train)
    layer = nn.remat(BertLayer, static_argnums=(3,)) if self.remat else BertLayer
    for i in range(self.num_layers):
      x = layer(self.num_heads, self.intermediate_size, self.layer_norm_eps,
                    self.hidden_act, self.hidden_dropout, self.attention_dropout, self.dtype,
                    name=f"layer_{i}")(x, mask, train)
    pooled = (jnp.tanh(nn.Dense(self.hidden_size, dtype=self.dtype, name="pooler")(x[:, 0]))
              if self.pooler else None)
    return x, pooled


def pool_sentences(words: Array, mask: Array, pooling: str = "cls") -> Array:
  """words [B, W, D] with mask [B, W] -> sentences [B, D]: the first token's ("cls") or the
  mean over the tokens the mask keeps ("mean")."""
  if pooling == "cls":
    return words[:, 0]
  if pooling == "mean":
    weights = mask.astype(words.dtype)[..., None]
    return (words * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1)
  raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")


def read_config(folder: str) -> dict:
  """config.json of `folder`, with transformers' defaults where it leaves a value out."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} not found: a BERT or RoBERTa folder holds config.json, "
                            f"as published at {PUBLISHED}")
  with open(path, encoding="utf-8") as f:
    config = json.load(f)
  model_type = config.get("model_type")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{path}: model_type {model_type!r} is not one of {MODEL_TYPES}")
  config = {**CONFIG_DEFAULTS[model_type], **config}
  if config.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{path}: position_embedding_type "
                     f"{config['position_embedding_type']!r} is not 'absolute'")
  if config["hidden_act"] not in ACTIVATIONS:
    raise ValueError(f"{path}: hidden_act {config['hidden_act']!r} is not one of "
                     f"{tuple(ACTIVATIONS)}")
  return config


def module_from_config(config: dict, *, pooler: bool = False, dtype=jnp.float32) -> BertEncoder:
  """The encoder that a config.json's values (see `read_config`) describe."""
  return BertEncoder(
      vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
      num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
      intermediate_size=config["intermediate_size"],
      max_positions=config["max_position_embeddings"],
      type_vocab_size=config["type_vocab_size"], layer_norm_eps=config["layer_norm_eps"],
      hidden_act=config["hidden_act"], hidden_dropout=config["hidden_dropout_prob"],
      attention_dropout=config["attention_probs_dropout_prob"],
      pad_token_id=config["pad_token_id"],
      position_ids_from_padding=config["model_type"] == "roberta", pooler=pooler, dtype=dtype)


def max_tokens(module: BertEncoder) -> int:
  """The most tokens a caption can have: one per position embedding (RoBERTa's first
  pad_token_id + 1 are never used)."""
  if module.position_ids_from_padding:
    return module.max_positions - module.pad_token_id - 1
  return module.max_positions


def _published_names(module: BertEncoder) -> dict:
  """{name in a published state dict: (path in the Flax params, is a linear weight)}."""
  names = {}

  def add(prefix: str, path: tuple, kind: str) -> None:
    if kind == "embedding":
      names[f"{prefix}.weight"] = (path + ("embedding",), False)
    else:  # "linear" (out, in) -> kernel (in, out), or LayerNorm weight -> scale
      names[f"{prefix}.weight"] = (path + ("kernel" if kind == "linear" else "scale",),
                                   kind == "linear")
      names[f"{prefix}.bias"] = (path + ("bias",), False)

  for table in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    add(f"embeddings.{table}", ("embeddings", table), "embedding")
  add("embeddings.LayerNorm", ("embeddings", "LayerNorm"), "norm")
  for i in range(module.num_layers):
    layer, path = f"encoder.layer.{i}", (f"layer_{i}",)
    for projection in ("query", "key", "value"):
      add(f"{layer}.attention.self.{projection}", path + (projection,), "linear")
    add(f"{layer}.attention.output.dense", path + ("attention_output",), "linear")
    add(f"{layer}.attention.output.LayerNorm", path + ("attention_LayerNorm",), "norm")
    add(f"{layer}.intermediate.dense", path + ("intermediate",), "linear")
    add(f"{layer}.output.dense", path + ("output",), "linear")
    add(f"{layer}.output.LayerNorm", path + ("output_LayerNorm",), "norm")
  if module.pooler:
    add("pooler.dense", ("pooler",), "linear")
  return names


def _published_name(key: str, model_type: str) -> str:
  """A state dict key without the "bert." / "roberta." of the *For...* models, with the
  LayerNorm "gamma" / "beta" of older files named "weight" / "bias" (as transformers does)."""
  key = key.removeprefix(f"{model_type}.")
  return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                    "LayerNorm.bias")


def variables_from_state_dict(state_dict: dict, module: BertEncoder, *, model_type: str,
                              file: str = "state dict") -> dict:
  """A published BertModel / RobertaModel state dict -> the Flax variables of `module`.

  Args:
    state_dict: {name: array}, names with or without the "bert." / "roberta." prefix.
    module: the encoder the variables are for (its pooler expects "pooler.dense.*").
    model_type: "bert" or "roberta" (the prefix to remove); file: named in errors.
  Returns:
    {"params": ...} in float32, linear weights (out, in) as kernels (in, out).
  Raises:
    ValueError, one line naming the file, the key and the shapes, for a key it does not map
    (other than the pre-training heads and buffers), one it expects but does not find, and a
    shape that is not the module's.
  """
  names = _published_names(module)
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32),
                          jnp.ones((1, 1), bool))["params"]
  where = f"(a {model_type} model's files as published at {PUBLISHED})"

  def published_shape(name: str) -> tuple:
    path, linear = names[name]
    shape = functools.reduce(lambda tree, part: tree[part], path, shapes).shape
    return shape[::-1] if linear else shape

  params, found = {}, set()
  for key, value in state_dict.items():
    name = _published_name(key, model_type)
    if name.startswith(UNUSED_PREFIXES):
      continue
    if name not in names:
      raise ValueError(f"{file}: key {key!r} of shape {tuple(np.shape(value))} is not a "
                       f"{model_type} encoder's {where}")
    if name in found:
      raise ValueError(f"{file}: key {key!r} names a parameter that another key gave already "
                       f"{where}")
    if np.shape(value) != published_shape(name):
      raise ValueError(f"{file}: key {key!r} has shape {tuple(np.shape(value))}, expected "
                       f"{published_shape(name)} {where}")
    found.add(name)
    path, linear = names[name]
    value = np.asarray(value, np.float32)
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(value.T if linear else value)
  missing = [name for name in names if name not in found]
  if missing:
    raise ValueError(f"{file}: key {missing[0]!r} of shape {published_shape(missing[0])} is "
                     f"missing (one of {len(missing)} missing keys) {where}")
  return {"params": jax.device_put(params)}


def read_weights(folder: str, cache_dir: Optional[str] = None) -> Tuple[str, dict]:
  """(file, {name: array}) of model.safetensors in `folder`, else of pytorch_model.bin
  (kept in cache_dir after the first read: `checkpoint_files.read_state_dict`)."""
  for name in WEIGHT_FILES:
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return path, checkpoint_files.read_state_dict(path, cache_dir)
  raise FileNotFoundError(f"{os.path.join(folder, WEIGHT_FILES[0])} not found (nor "
                          f"{WEIGHT_FILES[1]}): a BERT or RoBERTa folder holds its weights "
                          f"there, as published at {PUBLISHED}")


def _tokenizer_config(folder: str) -> dict:
  """tokenizer_config.json, else special_tokens_map.json, else nothing."""
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      with open(path, encoding="utf-8") as f:
        return json.load(f)
  return {}


def _require(folder: str, *names: str) -> list:
  paths = [os.path.join(folder, name) for name in names]
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} not found (nor tokenizer.json): the tokenizer's files "
                              f"are in the model folder, as published at {PUBLISHED}")
  return paths


def _special_tokens(model_type: str, settings: dict) -> dict:
  """{"cls_token": AddedToken, ...}: the tokenizer's special tokens, as named in its
  settings (a string or an AddedToken's fields) or the model type's defaults."""
  tokens = {}
  for role, default in SPECIAL_TOKENS[model_type].items():
    token = settings.get(role, default)
    if isinstance(token, dict):
      token = tokenizers.AddedToken(
          token["content"], single_word=token.get("single_word", False),
          lstrip=token.get("lstrip", False), rstrip=token.get("rstrip", False),
          normalized=token.get("normalized", False), special=True)
    tokens[role] = tokenizers.AddedToken(token, special=True) if isinstance(token, str) else token
  return tokens


def _tokenizer_from_vocabulary(folder: str, model_type: str) -> Tuple[tokenizers.Tokenizer, str]:
  """BERT's vocab.txt or RoBERTa's vocab.json + merges.txt as transformers' fast tokenizer
  builds them: (tokenizer, its padding token)."""
  settings = _tokenizer_config(folder)
  special = _special_tokens(model_type, settings)
  if model_type == "bert":
    (vocab_path,) = _require(folder, "vocab.txt")
    with open(vocab_path, encoding="utf-8") as f:
      vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
    tokenizer = tokenizers.Tokenizer(models.WordPiece(
        vocab, unk_token=special["unk_token"].content))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"), lowercase=settings.get("do_lower_case", True))
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  else:
    vocab, merges = models.BPE.read_file(*_require(folder, "vocab.json", "merges.txt"))
    tokenizer = tokenizers.Tokenizer(models.BPE(
        vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=settings.get("add_prefix_space", False))
  tokenizer.add_special_tokens(list(special.values()))
  cls, sep = special["cls_token"].content, special["sep_token"].content
  cls_id, sep_id = tokenizer.token_to_id(cls), tokenizer.token_to_id(sep)
  if model_type == "bert":
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
        special_tokens=[(cls, cls_id), (sep, sep_id)])
  else:
    tokenizer.post_processor = processors.RobertaProcessing(
        (sep, sep_id), (cls, cls_id), trim_offsets=settings.get("trim_offsets", True),
        add_prefix_space=settings.get("add_prefix_space", False))
  return tokenizer, special["pad_token"].content


def load_tokenizer(folder: str, model_type: str, max_length: int) -> tokenizers.Tokenizer:
  """The folder's tokenizer (tokenizer.json, else BERT's vocab.txt or RoBERTa's vocab.json and
  merges.txt with tokenizer_config.json's settings), adding the special tokens, cutting a
  caption to max_length tokens and padding a batch to its longest, as transformers'
  fast tokenizer with truncation=True, padding=True."""
  path = os.path.join(folder, "tokenizer.json")
  if os.path.isfile(path):
    tokenizer = tokenizers.Tokenizer.from_file(path)
    pad_token = _special_tokens(model_type, _tokenizer_config(folder))["pad_token"].content
  else:
    tokenizer, pad_token = _tokenizer_from_vocabulary(folder, model_type)
  pad_id = tokenizer.token_to_id(pad_token)
  if pad_id is None:
    raise ValueError(f"{folder}: the tokenizer has no padding token {pad_token!r}")
  tokenizer.enable_truncation(max_length)
  tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
  return tokenizer


def tokenize(tokenizer: tokenizers.Tokenizer, captions: list) -> Tuple[np.ndarray, np.ndarray]:
  """captions -> (token ids [B, W] int32, mask [B, W] bool), W the longest caption's."""
  encodings = tokenizer.encode_batch(list(captions))
  return (np.array([e.ids for e in encodings], np.int32),
          np.array([e.attention_mask for e in encodings], bool))


def load(path: str, *, pooling: str = "cls", max_length: Optional[int] = None,
         dtype=jnp.float32, cache_dir: Optional[str] = None) -> Loaded:
  """A Hugging Face BERT or RoBERTa folder -> Loaded(module, variables, embed).

  embed(captions) -> ((words [B, W, D], mask [B, W]), sentences [B, D]), each caption cut to
  max_length tokens (default and at most: one per position embedding); sentences by `pooling`
  ("cls" or "mean", see `pool_sentences`). The module has a pooler where the file has one.
  cache_dir: where the weights' tensors are kept after their first read.
  """
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
  config = read_config(path)
  file, state_dict = read_weights(path, cache_dir)
  pooler = any(_published_name(key, config["model_type"]).startswith("pooler.")
               for key in state_dict)
  module = module_from_config(config, pooler=pooler, dtype=dtype)
  variables = variables_from_state_dict(state_dict, module, model_type=config["model_type"],
                                        file=file)
  if max_length is None:
    max_length = max_tokens(module)
  elif not 2 < max_length <= max_tokens(module):
    raise ValueError(f"max_length must be in [3, {max_tokens(module)}], not {max_length}")
  tokenizer = load_tokenizer(path, config["model_type"], max_length)

  @jax.jit
  def apply(variables, token_ids, mask):
    words, _ = module.apply(variables, token_ids, mask)
    return words, pool_sentences(words, mask, pooling)

  def embed(captions: list):
    token_ids, mask = tokenize(tokenizer, captions)
    words, sentences = apply(variables, token_ids, mask)
    return (words, jnp.asarray(mask)), sentences

  return Loaded(module, variables, embed)
