"""Audio decoding and log-mel features (the paper's: 40 ms window, 20 ms hop, 64 bands)."""

import os

import librosa
import numpy as np
import soundfile

from ntxr import settings


def decode_audio(path: str, sample_rate: int) -> np.ndarray:
  """wav/flac/mp3 file -> mono float32 at `sample_rate`; ValueError naming the file."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: audio file not found")
  try:
    audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
    raise ValueError(f"{path}: cannot decode audio ({e})") from e
  audio = audio.mean(axis=1)
  if audio.size == 0:
    raise ValueError(f"{path}: empty audio (0 samples)")
  if not np.all(np.isfinite(audio)):
    raise ValueError(f"{path}: audio holds NaN or infinite samples")
  if not np.any(audio):
    raise ValueError(f"{path}: silent audio (every sample is 0)")
  if rate != sample_rate:
    audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate)
  return audio.astype(np.float32)


def log_mel(audio: np.ndarray, config: settings.Features) -> np.ndarray:
  """Mono waveform [samples] -> log-mel [frames, mel_bands] float32."""
  window = int(round(config.window_ms * config.sample_rate / 1000))
  hop = int(round(config.hop_ms * config.sample_rate / 1000))
  mel = librosa.feature.melspectrogram(
      y=audio, sr=config.sample_rate, n_fft=config.n_fft or window, hop_length=hop,
      win_length=window, n_mels=config.mel_bands, fmin=config.f_min,
      fmax=config.f_max or None, power=2.0)
  return np.log(mel + config.log_offset).T.astype(np.float32)


def clip_features(path: str, config: settings.Features) -> np.ndarray:
  """decode_audio then log_mel: a file -> [frames, mel_bands]."""
  return log_mel(decode_audio(path, config.sample_rate), config)


def features_or_error(job: tuple):
  """(path, settings.Features) -> [frames, mel_bands], or the ValueError's text.

  The worker function of parallel preparation: it lives here, away from TensorFlow,
  so worker processes start without importing it.
  """
  path, config = job
  try:
    return clip_features(path, config)
  except ValueError as e:
    return str(e)
