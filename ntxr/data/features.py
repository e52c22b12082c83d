"""Audio decoding and log-mel features (the paper's: 40 ms window, 20 ms hop, 64 bands)."""

import dataclasses
import os

import librosa
import numpy as np
import soundfile


@dataclasses.dataclass(frozen=True)
class LogMelConfig:
  """Feature parameters; `name` encodes all of them, so a change re-prepares.

  sample_rate 0 means the corpus's own default (16 kHz synthetic, 44.1 kHz Clotho);
  n_fft 0 means the window length; f_max 0 means the Nyquist frequency. The paper's
  (their `audio_logmel.py`): n_fft 2048, f_min 12, f_max 8000, log_offset 2.2e-16.
  """
  sample_rate: int = 0
  window_ms: float = 40.0
  hop_ms: float = 20.0
  mel_bands: int = 64
  n_fft: int = 0
  f_min: float = 0.0
  f_max: float = 0.0
  log_offset: float = 1e-8

  @property
  def name(self) -> str:
    return (f"sr{self.sample_rate}_win{self.window_ms:g}_hop{self.hop_ms:g}_fft{self.n_fft}"
            f"_mel{self.mel_bands}_f{self.f_min:g}-{self.f_max:g}_off{self.log_offset:g}"
            ).replace(".", "p")


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


def log_mel(audio: np.ndarray, config: LogMelConfig) -> np.ndarray:
  """Mono waveform [samples] -> log-mel [frames, mel_bands] float32."""
  window = int(round(config.window_ms * config.sample_rate / 1000))
  hop = int(round(config.hop_ms * config.sample_rate / 1000))
  mel = librosa.feature.melspectrogram(
      y=audio, sr=config.sample_rate, n_fft=config.n_fft or window, hop_length=hop,
      win_length=window, n_mels=config.mel_bands, fmin=config.f_min,
      fmax=config.f_max or None, power=2.0)
  return np.log(mel + config.log_offset).T.astype(np.float32)


def clip_features(path: str, config: LogMelConfig) -> np.ndarray:
  """decode_audio then log_mel: a file -> [frames, mel_bands]."""
  return log_mel(decode_audio(path, config.sample_rate), config)


def features_or_error(job: tuple):
  """(path, LogMelConfig) -> [frames, mel_bands], or the ValueError's text.

  The worker function of parallel preparation: it lives here, away from TensorFlow,
  so worker processes start without importing it.
  """
  path, config = job
  try:
    return clip_features(path, config)
  except ValueError as e:
    return str(e)
