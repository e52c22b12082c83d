"""The DCASE 2023 Task 6b baseline's setting (xieh97/dcase2023-audio-retrieval): PANNs
CNN14 fine-tuned and a frozen sentence encoder, trained with InfoNCE as the paper's
authors trained their CRNN.

  python -m ntxr.main --config=ntxr/configs/dcase2023.py --config.data_dir=/path/to/Clotho \\
      --config.audio_weights=/path/to/Cnn14_mAP=0.431.pth \\
      --config.text_weights=/path/to/all-MiniLM-L12-v2

The baseline's text encoder, all-mpnet-base-v2, is an MPNet; ntxr reads BERT and RoBERTa,
so give a BERT-family sentence encoder (as sentence-transformers publish them).
docs/dcase_settings.md lists each field against the baseline's code (conf.yaml, main.py,
models/, utils/criterion_utils.py) and what ntxr does otherwise. Meant for an accelerator.
"""

from ntxr.configs import default


def get_config():
  config = default.get_config()
  # models/audio_encoders.py: CNN14 from Cnn14_mAP=0.431.pth, all of it fine-tuned; its
  # `embedding` (fc1) projected to 300. sbert_embeddings.py, text_encoders.py: a frozen
  # sentence embedding projected to 300; the two meet in a cosine (ntxr's pooled score).
  config.audio_encoder = "cnn14"
  config.text_encoder = "bert"
  config.frozen = "text"
  config.sentence_pooling = "mean"  # Sentence-BERT's mean over the caption's tokens
  config.embed_dim = 300
  config.score = "pooled"
  # Whole Clotho clips (up to 30 s, 100 frames a second), in five lengths.
  config.frame_buckets = (1000, 1500, 2000, 2500, 3000)
  # criterion_utils.py, conf.yaml: InfoNCE at a fixed temperature of 0.07.
  config.objective = "infonce"
  config.temperature = 0.07
  # conf.yaml, main.py: Adam 1e-3, batch 32, ReduceLROnPlateau as the paper's, 80 epochs
  # after the untrained model's validation (epoch 0), Ray Tune's plateau stopper, and the
  # checkpoint of the lowest validation loss.
  config.learning_rate = 1e-3
  config.batch_size = 32
  config.num_epochs = 80
  config.schedule_from_untrained = True
  config.stopper.update(std=0.001, num_results=10, grace_period=60)
  config.select_by = "validation_loss"
  # Its float32 products (PyTorch's; their convolutions TF32 on Ampere and Hopper GPUs).
  config.matmul_precision = "highest"
  config.checkpoint_every_steps = 200
  return config
