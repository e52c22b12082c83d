"""Audio decoding and log-mel features (the paper's: 40 ms window, 20 ms hop, 64 bands), or
the waveform in frames for encoders with their own front end."""

import os

import librosa
import numpy as np
import soundfile

from ntxr import command, settings


def decode_audio(path: str, sample_rate: int) -> np.ndarray:
  """wav/flac/mp3 file -> mono float32 at `sample_rate`; ValueError naming the file, also
  for one cut short (fewer samples than its header declares). The decoders' own lines on
  stderr, which name no file, are silenced."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: audio file not found")
  try:
    with command.c_stderr_silenced(), soundfile.SoundFile(path) as f:
      declared, rate = f.frames, f.samplerate
      audio = f.read(dtype="float32", always_2d=True)
  except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
    raise ValueError(f"{path}: cannot decode audio ({e})") from e
  if 0 < len(audio) < declared:
    raise ValueError(f"{path}: cut short: {len(audio)} of the {declared} samples its header "
                     "declares decode (a partial download or copy?)")
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


def _samples(config: settings.Features) -> tuple:
  """(window, hop, FFT length) in samples."""
  window = int(round(config.window_ms * config.sample_rate / 1000))
  return window, int(round(config.hop_ms * config.sample_rate / 1000)), config.n_fft or window


def log_mel(audio: np.ndarray, config: settings.Features) -> np.ndarray:
  """Mono waveform [samples] -> log-mel [frames, mel_bands] float32."""
  window, hop, n_fft = _samples(config)
  mel = librosa.feature.melspectrogram(
      y=audio, sr=config.sample_rate, n_fft=n_fft, hop_length=hop,
      win_length=window, n_mels=config.mel_bands, fmin=config.f_min,
      fmax=config.f_max or None, power=2.0)
  return np.log(mel + config.log_offset).T.astype(np.float32)


def waveform_frames(audio: np.ndarray, hop: int) -> np.ndarray:
  """Mono waveform [samples] -> [ceil(samples / hop), hop], the last frame zero-padded.

  Example:
    >>> waveform_frames(np.arange(1, 6, dtype=np.float32), 2).tolist()
    [[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]]
  """
  return np.pad(audio, (0, -len(audio) % hop)).reshape(-1, hop).astype(np.float32)


def clip_features(path: str, config: settings.Features) -> np.ndarray:
  """decode_audio then log_mel: a file -> [frames, mel_bands] (or `waveform_frames` for
  config.waveform_hop); ValueError naming a file shorter than one FFT of the features."""
  if config.waveform_hop:
    return waveform_frames(decode_audio(path, config.sample_rate), config.waveform_hop)
  audio, n_fft = decode_audio(path, config.sample_rate), _samples(config)[2]
  if len(audio) < n_fft:
    ms = lambda samples: f"{1000 * samples / config.sample_rate:.0f} ms"
    raise ValueError(f"{path}: too short ({ms(len(audio))}): its features need at least "
                     f"{ms(n_fft)} (one {n_fft}-sample FFT)")
  return log_mel(audio, config)


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
