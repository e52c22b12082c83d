"""The default run: the built-in synthetic corpus, sized for a 2-core CPU.

  python -m ntxr.main --strategy=semihard_cross
  python -m ntxr.main --config=ntxr/configs/default.py --config.num_epochs=8

The model is the paper's CRNN at a quarter of its width (8, 32, 32, 32, 32
channels), which a CPU steps through several times faster than the full width
(`python -m ntxr.bench --jobs=steps`). `paper.py` holds the paper's full setting for
Clotho on an accelerator.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.objective = "triplet"        # or a name in ntxr.objectives.OBJECTIVES
  config.strategy = "semihard_cross"  # a name in ntxr.sampling.STRATEGIES (triplet)
  config.temperature = 0.05           # infonce, hn_nce, soft (siglip learns its own)
  config.beta = 0.0                   # hn_nce's hardness: 0 is infonce
  # False negatives (ntxr.false_negatives): caption-caption similarity from "tfidf",
  # "word_vectors" or "events" (the built-in corpus); soft's relevance of another clip's
  # caption, sigmoid(slope * similarity - offset); the pool filter's bounds (0: off).
  config.similarity = ""
  config.relevance_slope = 10.0
  config.relevance_offset = 5.0
  config.filter_similarity = 0.0       # drop negatives whose caption is more similar
  config.filter_share_of_positive = 0.0  # drop negatives above this share of the positive
  config.score = "alignment"          # or "pooled"
  config.negatives = "gather"         # or "ring": several devices' scores without the
                                      # global matrices (ntxr.ring)
  config.memory_batches = 0           # K > 0: the last K batches' embeddings are negatives
                                      # too (ntxr.memory)
  config.margin = 0.5
  config.seed = 0

  # Data: an empty data_dir means the built-in synthetic corpus of `size`.
  config.data_dir = ""
  config.size = "default"
  config.cache_dir = "~/.cache/ntxr"  # or a bucket, gs://...: prepared once for all workers
  config.stage_dir = ""               # a bucket cache's local copy ("": ~/.cache/ntxr/staged)
  # Log-mel, 40 ms windows, 20 ms hop, 64 bands (ntxr.settings.Features).
  config.sample_rate = 0              # 0: 16000 for the synthetic corpus, 44100 otherwise
  config.n_fft = 0                    # 0: the window length
  config.f_min = 0.0
  config.f_max = 0.0                  # 0: the Nyquist frequency
  config.log_offset = 1e-8
  config.tokens = "sentencepiece"     # or "words"
  config.vocab_size = 1000
  config.text_cleaning = "ntxr"       # or "paper" (ntxr.layouts.TEXT_CLEANINGS)
  config.vocabulary = "training"      # or "all": every split's captions (the paper)
  config.word_vectors = ""            # word2vec file: word tokens, a frozen table (the paper)
  config.require_word_vectors = False
  config.missing_word_vectors = "random"  # or "one_unk": one UNK vector (the paper)
  config.word_variants = "rules"      # a word the file lacks: any case, or the mean of its
                                      # hyphenated parts; "authors": their hand-made list
  config.frame_buckets = (160, 320, 640, 960, 1280, 1600)  # multiples of the CRNN's time stride
  config.max_tokens = 32
  config.skip_bad_files = False
  config.validation_split = ""        # "": the data set's own (Clotho: validation)
  config.test_split = ""              # "": the data set's own (Clotho: evaluation)
  # Judged by people, for the test split: DCASE 2025's several matching clips per caption
  # ("": metadata_eval.csv beside the captions, if there) and the TAU graded ratings.
  config.relevance_file = ""
  config.graded_relevance_dir = ""

  # Model: the paper's CRNN and word table, or pretrained encoders from their publishers'
  # files (ntxr.encoders): audio "cnn14" or "passt" (audio_weights: the .pth file),
  # text "bert" or "roberta" (text_weights: a Hugging Face model folder), each with a
  # linear projection to embed_dim; their audio is waveforms at 32 kHz.
  config.audio_encoder = "crnn"
  config.audio_weights = ""
  config.text_encoder = "word_vectors"
  config.text_weights = ""
  config.channels = (8, 32, 32, 32, 32)
  config.embed_dim = 300
  config.dropout = 0.3
  config.initializer = "flax"         # or "pytorch": kaiming-normal convs, PyTorch's GRU
  config.pool_remainder = "keep"      # or "drop": PyTorch's pooling floor (the authors')
  config.compute_dtype = "float32"    # or "bfloat16": encoders and scores (GPU/TPU); the
                                      # parameters, optimizer, selection and loss stay float32
  # Fine-tuning pretrained encoders (the DCASE baselines' controls):
  config.frozen = ""                  # "audio", "text" or "both": run as published (no
                                      # dropout, no updates); their projections train
  config.encoder_lr_factor = 1.0      # their learning rate: learning_rate x this
  config.remat = False                # recompute their activations: less memory, more time
  config.patchout = (0, 0)            # PaSST in training: (time, frequency) patches dropped
  config.text_dropout = -1.0          # text encoder's hidden and attention dropout (-1:
                                      # its config.json's)
  config.sentence_pooling = "cls"     # with score=pooled: the first token's state, or "mean"
  config.matmul_precision = "default"  # or "highest": full float32 products on GPUs, whose
                                       # default is TF32 (the authors' PyTorch 1.13: full)
  config.conv_precision = ""          # the CRNN's convolutions: "" matmul_precision's, or
                                      # one of its values ("default": TF32, as PyTorch 1.13)
  config.batch_norm_pass = False      # the authors' construction pass moves BatchNorm stats

  # Optimisation: Adam, ReduceLROnPlateau on the validation loss as the paper.
  config.batch_size = 32
  config.learning_rate = 1e-3
  config.lr_schedule = "plateau"      # or "warmup_cosine": per step, as warmup_cosine says
  config.warmup_cosine = ml_collections.ConfigDict(
      dict(warmup_epochs=1.0, decay_epochs=15.0, min_lr=1e-7))
  config.weight_decay = 0.0           # above 0: AdamW's decoupled weight decay
  config.num_epochs = 4
  config.max_steps_per_epoch = 0      # 0: the whole training split; else cut epochs short
  config.plateau = ml_collections.ConfigDict(
      dict(factor=0.1, patience=5, threshold=0.005, min_lr=1e-6))
  # Ray Tune's TrialPlateauStopper on the validation loss (std 0: train every epoch).
  config.stopper = ml_collections.ConfigDict(dict(std=0.0, num_results=10, grace_period=60))
  config.schedule_from_untrained = False  # the untrained model's loss steps the schedule
  config.validation_draws = "fixed"   # or "per_epoch": reshuffled, drawn anew each epoch
  config.keep_partial_batch = False   # train on an epoch's last, short batch too
  config.eval_batch_size = 64
  config.checkpoint_every_steps = 50
  config.metrics_every_steps = 10     # the steps' statistics (and NaN check) read this often
  config.select_by = "t2a_mAP@10"     # the reported checkpoint; or "validation_loss"
  config.train_padding = "masked"     # or "batch": the authors' padded training score

  # Feature-collapse thresholds (see ntxr.evaluate.collapse_diagnostics); docs/results.md
  # shows where collapsed and healthy runs sit against them.
  config.collapse = ml_collections.ConfigDict(
      dict(cosine=0.9, effective_rank=2.0, share_at_margin=0.5, score_std=1e-3))
  return config
