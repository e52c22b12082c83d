"""Pretrained encoders' files as their publishers write them, with random weights: PANNs'
Cnn14 checkpoint (torch.save's legacy format of {"model": state dict}), a small PaSST state
dict (its zip format) and a small Hugging Face BERT or RoBERTa folder (config.json,
model.safetensors, the tokenizer's files) whose tokenizer is trained on the real
recordings' captions."""

import os

import torch
from tokenizers import implementations

import recordings
from ntxr.encoders import references as torch_references

CAPTIONS = [caption for captions in recordings.CAPTIONS.values() for caption in captions]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=40)


def cnn14_file(path: str) -> str:
  """A random Cnn14 saved at `path` as PANNs' code (PyTorch 1.0) saved Cnn14_mAP=0.431.pth,
  in torch.save's legacy format; returns path."""
  torch.manual_seed(0)
  model = torch_references.panns_cnn14()(sample_rate=32000, window_size=1024, hop_size=320,
                                         mel_bins=64, fmin=50, fmax=14000, classes_num=527)
  torch.save({"model": model.state_dict()}, path, _use_new_zipfile_serialization=False)
  return path


def passt_file(path: str) -> str:
  """A random PaSST 64 wide and 2 deep (one 64-wide head, as the released files' heads)
  saved at `path` as its releases are (a plain state dict); returns path."""
  torch.manual_seed(0)
  net = torch_references.hear21passt().reference.PaSST(
      img_size=(128, 998), patch_size=16, stride=(10, 10), in_chans=1, num_classes=527,
      embed_dim=64, depth=2, num_heads=1, distilled=True)
  torch.save(net.state_dict(), path)
  return path


def text_folder(folder: str, model_type: str) -> str:
  """A random small BERT or RoBERTa (`model_type`) saved in `folder` as transformers saves
  it, with a WordPiece or byte-level BPE tokenizer of the captions; returns folder."""
  transformers = torch_references.transformers()
  os.makedirs(folder)
  torch.manual_seed(0)
  if model_type == "bert":
    tokenizer = implementations.BertWordPieceTokenizer(lowercase=True)
    tokenizer.train_from_iterator(CAPTIONS, vocab_size=200, special_tokens=[
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tokenizer.save_model(folder)
    transformers.BertTokenizerFast(vocab=os.path.join(folder, "vocab.txt")).save_pretrained(
        folder)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=tokenizer.get_vocab_size(), **SMALL))
  else:
    tokenizer = implementations.ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(CAPTIONS, vocab_size=300, special_tokens=[
        "<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    tokenizer.save_model(folder)
    transformers.RobertaTokenizerFast(
        vocab=os.path.join(folder, "vocab.json"),
        merges=os.path.join(folder, "merges.txt")).save_pretrained(folder)
    model = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=tokenizer.get_vocab_size(), pad_token_id=1, bos_token_id=0, eos_token_id=2,
        **SMALL))
  model.save_pretrained(folder)
  return folder
