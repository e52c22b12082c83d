"""The paper's setting as the authors' code runs it: Clotho v2, the full CRNN, frozen word2vec.

  python -m ntxr.main --config=ntxr/configs/paper.py --config.data_dir=/path/to/Clotho \\
      --config.word_vectors=/path/to/GoogleNews-vectors-negative300.bin --strategy=semihard_cross

Every field follows xieh97/contrastive-negative-sampling (`conf.yaml`, `preprocessing/`,
`models/`, `utils/criterion_utils.py`); docs/paper_setting.md lists each against the
default. Meant for an accelerator: on a 2-core CPU one epoch of Clotho takes hours.
"""

from ntxr.configs import default


def get_config():
  config = default.get_config()
  # audio_logmel.py: librosa at the file's 44.1 kHz, 40 ms / 20 ms, n_fft the next power
  # of two (2048), 64 bands from 12 Hz to 8 kHz, log(x + np.spacing(1)).
  config.sample_rate = 44100
  config.n_fft = 2048
  config.f_min = 12.0
  config.f_max = 8000.0
  config.log_offset = 2.220446049250313e-16
  # text_cleaning.py, clotho_dataset.py, word2vec_embeddings.py: their punctuation
  # cleaning, a vocabulary of every split's words, frozen GoogleNews vectors, and one
  # shared UNK vector for the words it lacks.
  config.tokens = "words"
  config.text_cleaning = "paper"
  config.vocabulary = "all"
  config.require_word_vectors = True
  config.missing_word_vectors = "one_unk"
  config.word_variants = "authors"
  # audio_encoders.py: the full CRNN, kaiming-normal convolutions, PyTorch's GRU.
  config.channels = (32, 128, 128, 128, 128)
  config.initializer = "pytorch"
  config.pool_remainder = "drop"  # LPPool2d floors: a clip's odd last frames are dropped
  # CRNNEncoder.__init__ runs its CNN once in training mode on torch.randn(1, 1, 500, 64)
  # (to measure the GRU's input): BatchNorm's statistics start from that batch's.
  config.batch_norm_pass = True
  # PyTorch 1.13 multiplies float32 matrices in full float32, and runs cuDNN convolutions
  # in TF32 on Ampere and Hopper GPUs (--config.conv_precision=default for those); here
  # full float32 everywhere, the same on every device.
  config.matmul_precision = "highest"
  # conf.yaml, main.py and criterion_utils.py: 120 epochs, each DataLoader's last short
  # batch kept; the training score's mean runs over the batch's padding; the validation
  # loader reshuffles (and `random` draws anew) every epoch; the schedule first steps on
  # the untrained model's validation loss (epoch 0); Ray Tune's TrialPlateauStopper; the
  # reported checkpoint has the lowest validation loss.
  config.num_epochs = 120
  config.keep_partial_batch = True
  config.train_padding = "batch"
  config.validation_draws = "per_epoch"
  config.schedule_from_untrained = True
  config.stopper.update(std=0.001, num_results=10, grace_period=60)
  config.select_by = "validation_loss"
  config.checkpoint_every_steps = 200
  return config
