"""The paper's setting: Clotho v2, the full CRNN, frozen word2vec vectors.

  python -m ntxr.main --config=ntxr/configs/paper.py --data_dir=/path/to/Clotho \\
      --word_vectors=/path/to/GoogleNews-vectors-negative300.bin --strategy=semihard_cross

Meant for an accelerator: on a 2-core CPU one epoch of Clotho takes hours.
"""

from ntxr.configs import default


def get_config():
  config = default.get_config()
  config.channels = (32, 128, 128, 128, 128)
  config.tokens = "words"
  config.sample_rate = 44100
  config.num_epochs = 150
  config.checkpoint_every_steps = 200
  return config
