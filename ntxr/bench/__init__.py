"""Benchmarks of the hot paths: `python -m ntxr.bench` (see __main__.py).

The training-step jobs' shapes and the encoder pairs are here, so that the command's flags
name them without loading JAX.
"""

# CRNN channels per block by width name ("paper" is models.PAPER_CHANNELS).
WIDTHS = {"paper": (32, 128, 128, 128, 128), "half": (16, 64, 64, 64, 64),
          "default": (8, 32, 32, 32, 32)}
SHAPE = dict(frames=320, words=12, mel_bands=64, vocab=1000)  # a training step's batch
# The encoders job's pairs: name -> (audio encoder, text encoder), names of ntxr.encoders.
ENCODER_PAIRS = {"cnn14+bert": ("cnn14", "bert"), "passt+roberta": ("passt", "roberta")}
