"""Pretrained encoders in Flax, loaded from their publishers' own files (a local path;
nothing is fetched): PANNs CNN14, PaSST-S, and BERT or RoBERTa.

  loaded = encoders.load("cnn14", "Cnn14_mAP=0.431.pth")
  (frames, frame_mask), clips = loaded.embed(waveforms)  # float32 [batch, samples], 32 kHz
  loaded = encoders.load("roberta", "roberta-base/")      # a Hugging Face model folder
  (words, word_mask), sentences = loaded.embed(["a dog barks", "rain on a roof"])

Each returns `Loaded(module, variables, embed)`; each module computes what its reference
PyTorch code computes on the same weights, front end included (tests/test_encoder_*.py).
Importing this package loads neither PyTorch, TensorFlow nor librosa.
"""

from typing import Optional

from ntxr.encoders import bert, cnn14, passt
from ntxr.encoders.loaded import Loaded

# name -> (its module's load, the model_type its file must declare, or None)
ENCODERS = {"cnn14": (cnn14.load, None), "passt": (passt.load, None),
            "bert": (bert.load, "bert"), "roberta": (bert.load, "roberta")}
PUBLISHED = {"cnn14": cnn14.PUBLISHED, "passt": passt.PUBLISHED}  # where each audio
# encoder's file is (a text encoder's folder: bert.PUBLISHED)
AUDIO = ("cnn14", "passt")
TEXT = ("bert", "roberta")


def load(name: str, path: str, cache_dir: Optional[str] = None) -> Loaded:
  """The encoder `name` (one of ENCODERS) with the weights of the publisher's file or
  folder at `path`; ValueError naming the file and what is wrong with it. cache_dir: a
  local folder where the file's tensors are kept after its first read, so later loads
  skip reading the publisher's format (`checkpoint_files.read_state_dict`)."""
  if name not in ENCODERS:
    raise ValueError(f"no encoder {name!r}: choose from {list(ENCODERS)}")
  loader, model_type = ENCODERS[name]
  if model_type is not None:
    declared = bert.read_config(path)["model_type"]
    if declared != model_type:
      raise ValueError(f"{path}: its config.json declares model_type {declared!r}, not "
                       f"{model_type!r}: load it as {declared!r}")
  return loader(path, cache_dir=cache_dir)
