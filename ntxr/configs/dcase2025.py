"""The DCASE 2025 Task 6 baseline's setting (CPJKU/dcase2025_task6_baseline): PaSST and
RoBERTa-large fine-tuned with InfoNCE, for the paper's question asked of them.

  python -m ntxr.main --config=ntxr/configs/dcase2025.py --config.data_dir=/path/to/Clotho \\
      --config.audio_weights=/path/to/passt-s-p16-s16-128-ap.468.pt \\
      --config.text_weights=/path/to/roberta-large

docs/dcase_settings.md lists each field against the baseline's code (d25_t6/train.py,
retrieval_module.py, passt.py) and what ntxr does otherwise. Meant for an accelerator.
"""

from ntxr.configs import default


def get_config():
  config = default.get_config()
  # passt.py, retrieval_module.py: PaSST (its stride-16 file) and RoBERTa-large, each
  # with a linear projection to 1,024; captions cut at 32 tokens.
  config.audio_encoder = "passt"
  config.text_encoder = "roberta"
  config.embed_dim = 1024
  config.max_tokens = 32
  config.text_dropout = 0.2  # RoBERTa's hidden and attention dropout, set by the baseline
  # The clip output (class and distillation tokens' mean) and the first token's state
  # meet in a cosine: ntxr's pooled score on them.
  config.score = "pooled"
  # train.py: structured patchout of 15 time columns and 2 frequency rows in training.
  config.patchout = (15, 2)
  # One PaSST input, 10 s (the baseline encodes 30 s as three 10 s inputs and averages).
  config.frame_buckets = (1000,)
  # retrieval_module.py: symmetric InfoNCE at a fixed temperature of 0.05, every caption
  # of a clip in the batch its positive.
  config.objective = "infonce"
  config.temperature = 0.05
  # train.py, retrieval_module.py: AdamW without decay (Adam), a 2e-5 peak reached in one
  # epoch from 1e-7, cosine back over 15, then 1e-7; 20 epochs of 64 pairs, the last
  # short batch dropped; 16-bit mixed precision.
  config.learning_rate = 2e-5
  config.lr_schedule = "warmup_cosine"
  config.warmup_cosine.update(warmup_epochs=1.0, decay_epochs=15.0, min_lr=1e-7)
  config.num_epochs = 20
  config.batch_size = 64
  config.eval_batch_size = 64
  config.compute_dtype = "bfloat16"
  config.checkpoint_every_steps = 200
  return config
