"""PANNs CNN14 (Kong et al., 2020) in Flax Linen, as panns-inference 0.1.1's `Cnn14` computes it.

Front end (`LogMel`, no parameters): waveforms at 32 kHz -> power spectrogram (periodic hann
window of 1024, hop 320, centred frames with reflect padding) -> 64 slaney mel bands over
50-14,000 Hz -> 10 log10(max(x, 1e-10)); torchlibrosa's Spectrogram and LogmelFilterBank
with librosa's filters, computed here in NumPy.

Network (`Cnn14`): BatchNorm over the mel bins (bn0); six ConvBlocks (two conv3x3-BN-ReLU,
then 2x2 average pooling, (1, 1) in the last), 64 -> 2048 channels, each followed by dropout
0.2; the mean over frequency gives the frames [B, T', 2048] (T' = STFT frames // 32, a
frame per 320 ms; unlike PANNs' decision-level models, Cnn14 does not smooth them over
time); the clip feature is their max over time plus their mean over time (dropout 0.5);
`embedding` = ReLU(fc1(clip feature)) [B, 2048] (dropout 0.5 in training) and
`clipwise_output` = sigmoid(fc_audioset(ReLU(fc1(...)))) [B, 527], AudioSet's classes.

Lengths: given each clip's length in samples, every clip's outputs are those of its own
unpadded run, whatever padding its batch adds: its STFT reflects at its own end; frames past
its length are kept at zero (after bn0, every BatchNorm-ReLU and every pooling), as its own
run's convolutions pad with zeros; and they are left out of the clip pooling. The reference
embeds nothing shorter than `MIN_SAMPLES` (its pooling leaves no frame); a shorter clip is
embedded as if zero-padded to `MIN_SAMPLES`.

Training (`train=True`): BatchNorm normalises by the batch's statistics over the valid
frames and updates its running statistics as PyTorch does (momentum 0.1, unbiased
variance); dropout as the reference (rng "dropout"). The reference's SpecAugmentation and
mixup are left out.
"""

import functools
from typing import Any, Dict, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ntxr.encoders import checkpoint_files
from ntxr.encoders.loaded import Loaded

Array = jax.Array
SAMPLE_RATE = 32000
PUBLISHED = "https://zenodo.org/record/3987831 (Cnn14_mAP=0.431.pth)"
WINDOW, HOP, MEL_BINS, FMIN, FMAX = 1024, 320, 64, 50.0, 14000.0
AMIN = 1e-10  # power floor before the log
CHANNELS = (64, 128, 256, 512, 1024, 2048)
POOLS = ((2, 2), (2, 2), (2, 2), (2, 2), (2, 2), (1, 1))  # (time, frequency) per block
PATCHES_FROM = 1024  # input channels from which Conv3x3 multiplies patches
FRAMES_PER_OUTPUT = 32  # STFT frames per output frame
MIN_SAMPLES = (FRAMES_PER_OUTPUT - 1) * HOP  # 32 STFT frames: one output frame
CLASSES = 527
EMBEDDING = 2048


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney's mel scale (librosa's htk=False): linear to 1 kHz, logarithmic above."""
  hz = np.asarray(hz, np.float64)
  mel = hz / (200.0 / 3)
  log_step = np.log(6.4) / 27.0
  above = hz >= 1000.0
  return np.where(above, 15.0 + np.log(np.where(above, hz, 1.0) / 1000.0) / log_step, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
  """The inverse of `_hz_to_mel`."""
  log_step = np.log(6.4) / 27.0
  return np.where(mel >= 15.0, 1000.0 * np.exp(log_step * (mel - 15.0)), mel * (200.0 / 3))


def mel_filters(sample_rate: int = SAMPLE_RATE, n_fft: int = WINDOW, n_mels: int = MEL_BINS,
                fmin: float = FMIN, fmax: float = FMAX) -> np.ndarray:
  """librosa.filters.mel(...).T: slaney-normalised triangles, float32 [n_fft // 2 + 1, n_mels]."""
  fft_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
  edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
  widths = np.diff(edges)
  ramps = edges[:, None] - fft_hz[None, :]
  rising = -ramps[:-2] / widths[:-1, None]
  falling = ramps[2:] / widths[1:, None]
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]  # equal area per band
  return weights.T.astype(np.float32)


def dft_kernels(n_fft: int = WINDOW) -> Tuple[np.ndarray, np.ndarray]:
  """The hann-windowed real and imaginary DFT rows torchlibrosa's STFT convolves with,
  float32 [n_fft, n_fft // 2 + 1] each (sample, frequency)."""
  samples = np.arange(n_fft)
  window = 0.5 - 0.5 * np.cos(2 * np.pi * samples / n_fft)  # periodic hann
  phase = 2 * np.pi * (np.outer(samples, np.arange(n_fft // 2 + 1)) % n_fft) / n_fft
  return ((np.cos(phase) * window[:, None]).astype(np.float32),
          (-np.sin(phase) * window[:, None]).astype(np.float32))


def stft_frames(samples: Array) -> Array:
  """STFT frames (centred) of waveforms of `samples` samples: 1 + samples // HOP."""
  return 1 + samples // HOP


def output_frames(samples: Array) -> Array:
  """Cnn14's frames for waveforms of `samples` samples (one per 32 STFT frames)."""
  return stft_frames(samples) // FRAMES_PER_OUTPUT


def _reflect_indices(count: int, lengths: Array) -> Array:
  """[B, count] indices into each waveform for its centred STFT: position j reads sample
  j - WINDOW // 2 reflected at 0 and at the clip's last sample (PyTorch's reflect pad)."""
  period = 2 * (lengths[:, None] - 1)
  position = jnp.mod(jnp.arange(count)[None, :] - WINDOW // 2, period)
  return jnp.where(position < lengths[:, None], position, period - position)


class LogMel(nn.Module):
  """Waveforms [B, N] at 32 kHz, lengths [B] in samples -> log-mel [B, 1 + N // 320, 64].

  Frames past a clip's length are computed from its reflection and are not meaningful.
  """
  precision: Any = jax.lax.Precision.HIGHEST

  def __call__(self, waveforms: Array, lengths: Array) -> Array:
    real, imag = dft_kernels()
    kernel = jnp.asarray(np.concatenate([real, imag], axis=1))[:, None, :]  # [W, 1, 2F]
    padded_length = waveforms.shape[1] + WINDOW
    padded = jnp.take_along_axis(waveforms, _reflect_indices(padded_length, lengths), axis=1)
    spectrum = jax.lax.conv_general_dilated(
        padded[:, :, None], kernel, (HOP,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"),
        precision=self.precision)
    real, imag = jnp.split(spectrum, 2, axis=-1)
    mel = jnp.matmul(real ** 2 + imag ** 2, jnp.asarray(mel_filters()), precision=self.precision)
    return 10.0 * jnp.log10(jnp.maximum(mel, AMIN))


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm over the last axis of x [B, T, ..., C], masked by frames [B, T].

  Inference: (x - running mean) / sqrt(running var + eps) * scale + bias. Training:
  normalised by the biased variance of the valid frames; running statistics updated with
  momentum 0.1 towards their mean and unbiased variance.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: Array, mask: Array, train: bool) -> Array:
    """x in any dtype, normalised in float32, returned in its own."""
    dtype, x = x.dtype, x.astype(jnp.float32)
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,))
    running_var = self.variable("batch_stats", "var", jnp.ones, (features,))
    if train:
      weights = mask.reshape(mask.shape + (1,) * (x.ndim - 2)).astype(x.dtype)
      axes = tuple(range(x.ndim - 1))
      count = jnp.sum(weights) * np.prod(x.shape[2:-1])
      mean = jnp.sum(x * weights, axis=axes) / count
      var = jnp.sum(jnp.square(x - mean) * weights, axis=axes) / count
      if not self.is_initializing():
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = ((1 - self.momentum) * running_var.value
                             + self.momentum * var * count / jnp.maximum(count - 1, 1))
    else:
      mean, var = running_mean.value, running_var.value
    return ((x - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(dtype)


class Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3), padding=1, use_bias=False) on [B, T, F, C] (its parameter
  too). From PATCHES_FROM input channels on, as 3x3 patches times the kernel: the same
  products, which XLA's CPU convolution runs up to 20 times slower at the few frames and
  bands of CNN14's last blocks."""
  features: int
  precision: Any = jax.lax.Precision.HIGHEST
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, channels, self.features)).astype(self.dtype)
    x, same = x.astype(self.dtype), ((1, 1), (1, 1))
    layout = ("NHWC", "HWIO", "NHWC")
    if channels < PATCHES_FROM:
      return jax.lax.conv_general_dilated(x, kernel, (1, 1), same, dimension_numbers=layout,
                                          precision=self.precision)
    patches = jax.lax.conv_general_dilated_patches(  # [B, T, F, C * 9], C major
        x, (3, 3), (1, 1), same, dimension_numbers=layout,
        precision=jax.lax.Precision.HIGHEST)  # copies, exact at any precision
    return jnp.matmul(patches, kernel.transpose(2, 0, 1, 3).reshape(channels * 9, -1),
                      precision=self.precision)


class ConvBlock(nn.Module):
  """Two conv3x3-BatchNorm-ReLU, then average pooling (floored), on x [B, T, F, C]."""
  channels: int
  pool: Tuple[int, int]
  precision: Any = jax.lax.Precision.HIGHEST
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, frames: Array, train: bool) -> Tuple[Array, Array]:
    """x [B, T, F, C_in] zero past frames [B] -> (x [B, T // pt, F // pf, channels] zero
    past its frames, frames // pt)."""
    mask = jnp.arange(x.shape[1])[None, :] < frames[:, None]
    for name in ("1", "2"):
      x = Conv3x3(self.channels, self.precision, self.dtype, name="conv" + name)(x)
      x = nn.relu(BatchNorm(name="bn" + name)(x, mask, train))
      x = jnp.where(mask[:, :, None, None], x, jnp.zeros((), x.dtype))  # as the clip alone
    (pt, pf), (b, t, f, c) = self.pool, x.shape
    x = x[:, :t // pt * pt, :f // pf * pf]
    x = x.reshape(b, t // pt, pt, f // pf, pf, c).mean(axis=(2, 4))
    frames = frames // pt
    mask = jnp.arange(x.shape[1])[None, :] < frames[:, None]  # a frame pooled with padding
    return jnp.where(mask[:, :, None, None], x, jnp.zeros((), x.dtype)), frames


class Outputs(NamedTuple):
  """Cnn14's outputs: frames [B, T', 2048], conv_block6's output (after its dropout) averaged
  over frequency, zero where masked, with frame_mask [B, T']; embedding [B, 2048];
  clipwise_output [B, 527]."""
  frames: Array
  frame_mask: Array
  embedding: Array
  clipwise_output: Array


class Cnn14(nn.Module):
  """PANNs CNN14 on waveforms [B, N] at 32 kHz (see the module docstring).

  precision: of its products after the front end, which computes at the highest (None:
  `jax.default_matmul_precision`'s); dtype: of the convolutions and dense layers after
  the float32 front end (BatchNorm normalises in float32); remat: each conv block's
  activations are recomputed for the gradient, not kept (less memory, more compute; the
  same values)."""
  classes: int = CLASSES
  block_dropout: float = 0.2
  clip_dropout: float = 0.5
  precision: Any = jax.lax.Precision.HIGHEST
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, waveforms: Array, lengths: Optional[Array] = None,
               train: bool = False) -> Outputs:
    """waveforms [B, N] float32; lengths [B] samples per clip (None: all N)."""
    waveforms = jnp.asarray(waveforms, jnp.float32)
    if waveforms.shape[1] < MIN_SAMPLES:
      waveforms = jnp.pad(waveforms, ((0, 0), (0, MIN_SAMPLES - waveforms.shape[1])))
    lengths = (jnp.full(waveforms.shape[:1], waveforms.shape[1]) if lengths is None
               else jnp.clip(jnp.asarray(lengths), MIN_SAMPLES, waveforms.shape[1]))
    # The front end at full float32 whatever the products' precision: TF32 moves log-mel
    # bins by decibels.
    x = LogMel(jax.lax.Precision.HIGHEST, name="front_end")(waveforms, lengths)  # [B, T, 64]
    frames = stft_frames(lengths)
    mask = jnp.arange(x.shape[1])[None, :] < frames[:, None]
    x = BatchNorm(name="bn0")(x, mask, train)  # each mel bin its own statistics
    x = jnp.where(mask[:, :, None], x, 0.0)[..., None].astype(self.dtype)  # [B, T, 64, 1]
    block = nn.remat(ConvBlock, static_argnums=(3,)) if self.remat else ConvBlock
    for index, (channels, pool) in enumerate(zip(CHANNELS, POOLS)):
      x, frames = block(channels, pool, self.precision, self.dtype,
                        name=f"conv_block{index + 1}")(x, frames, train)
      x = nn.Dropout(self.block_dropout, deterministic=not train)(x)
    x = x.mean(axis=2)  # [B, T', 2048]
    mask = jnp.arange(x.shape[1])[None, :] < frames[:, None]
    pooled = (jnp.max(jnp.where(mask[..., None], x, jnp.finfo(x.dtype).min), axis=1)
              + x.sum(axis=1) / frames[:, None])
    pooled = nn.Dropout(self.clip_dropout, deterministic=not train)(pooled)
    dense = functools.partial(nn.Dense, precision=self.precision, dtype=self.dtype)
    hidden = nn.relu(dense(EMBEDDING, name="fc1")(pooled))
    embedding = nn.Dropout(self.clip_dropout, deterministic=not train)(hidden)
    logits = dense(self.classes, name="fc_audioset")(hidden)
    return Outputs(x, mask, embedding, jax.nn.sigmoid(logits))


def _front_end_keys() -> Dict[str, np.ndarray]:
  """The reference's frozen front-end tensors, by key, as its state dict holds them."""
  real, imag = dft_kernels()
  return {"spectrogram_extractor.stft.conv_real.weight": real.T[:, None, :],
          "spectrogram_extractor.stft.conv_imag.weight": imag.T[:, None, :],
          "logmel_extractor.melW": mel_filters()}


def _batch_norm_keys(prefix: str, path: Tuple[str, ...], features: int) -> Dict[str, tuple]:
  return {f"{prefix}.weight": ("params", path + ("scale",), (features,), None),
          f"{prefix}.bias": ("params", path + ("bias",), (features,), None),
          f"{prefix}.running_mean": ("batch_stats", path + ("mean",), (features,), None),
          f"{prefix}.running_var": ("batch_stats", path + ("var",), (features,), None),
          f"{prefix}.num_batches_tracked": (None, None, (), None)}


def _key_table(classes: int) -> Dict[str, tuple]:
  """Publisher's key -> (collection, Flax path, publisher's shape, layout change)."""
  conv = lambda w: w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  linear = lambda w: w.T  # (out, in) -> (in, out)
  table = _batch_norm_keys("bn0", ("bn0",), MEL_BINS)
  inputs = 1
  for index, channels in enumerate(CHANNELS):
    block = f"conv_block{index + 1}"
    for name, channels_in in (("1", inputs), ("2", channels)):
      table[f"{block}.conv{name}.weight"] = (
          "params", (block, "conv" + name, "kernel"), (channels, channels_in, 3, 3), conv)
      table.update(_batch_norm_keys(f"{block}.bn{name}", (block, "bn" + name), channels))
    inputs = channels
  for name, outputs in (("fc1", EMBEDDING), ("fc_audioset", classes)):
    table[f"{name}.weight"] = ("params", (name, "kernel"), (outputs, EMBEDDING), linear)
    table[f"{name}.bias"] = ("params", (name, "bias"), (outputs,), None)
  return table


def variables_from_state_dict(state_dict: Dict[str, np.ndarray], path: str = "state dict",
                              classes: int = CLASSES) -> Dict[str, Any]:
  """PANNs' Cnn14 state dict -> Cnn14's variables {"params", "batch_stats"} (float32).

  Convolutions OIHW -> HWIO, linear layers (out, in) -> (in, out), BatchNorm running
  statistics into batch_stats. The frozen STFT and mel matrices must equal the front end's
  (to 1e-5 of their largest value); num_batches_tracked is not used. Raises ValueError (one
  line naming `path`, the key and the shapes) for a key not mapped, a key missing, a shape
  that differs, or a front end that differs.
  """
  table, front_end = _key_table(classes), _front_end_keys()
  where = f"(expected from Cnn14 as published at {PUBLISHED})"
  unknown = sorted(set(state_dict) - set(table) - set(front_end))
  missing = [key for key in sorted(set(table) | set(front_end)) if key not in state_dict]
  for keys, problem in ((unknown, "has a key Cnn14 does not have"),
                        (missing, "lacks Cnn14's key")):
    if keys:
      more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
      raise ValueError(f"{path} {problem}: {keys[0]}{more} {where}")
  expected_shapes = {key: entry[2] for key, entry in table.items()}
  expected_shapes.update({key: value.shape for key, value in front_end.items()})
  for key in sorted(state_dict):
    found = tuple(np.shape(state_dict[key]))
    if found != tuple(expected_shapes[key]):
      raise ValueError(f"{path}: {key} has shape {found}, expected {tuple(expected_shapes[key])} "
                       f"{where}")
  for key, expected in front_end.items():
    difference = np.max(np.abs(np.asarray(state_dict[key], np.float32) - expected))
    if difference > 1e-5 * np.max(np.abs(expected)):
      raise ValueError(f"{path}: {key} differs from the front end's by {difference:.3g} "
                       f"(a different STFT or mel front end) {where}")
  variables: Dict[str, Any] = {"params": {}, "batch_stats": {}}
  for key, (collection, flax_path, _, layout) in table.items():
    if collection is None:
      continue
    value = np.asarray(state_dict[key], np.float32)
    node = variables[collection]
    for name in flax_path[:-1]:
      node = node.setdefault(name, {})
    node[flax_path[-1]] = jnp.asarray(layout(value) if layout else value)
  return variables


def load(path: str, cache_dir: Optional[str] = None) -> Loaded:
  """PANNs' Cnn14_mAP=0.431.pth (a dict whose "model" holds the state dict) -> Loaded.

  embed(waveforms [B, N] at 32 kHz, lengths=None) -> ((frames [B, T', 2048], frame mask
  [B, T']), embedding [B, 2048]), in inference mode. cache_dir: where the file's tensors
  are kept after its first read (`checkpoint_files.read_state_dict`).
  """
  module = Cnn14()
  state_dict = checkpoint_files.read_state_dict(path, cache_dir, PUBLISHED)
  variables = variables_from_state_dict(state_dict, str(path))
  apply = jax.jit(module.apply)

  def embed(waveforms: Array, lengths: Optional[Array] = None):
    outputs = apply(variables, waveforms, lengths)
    return (outputs.frames, outputs.frame_mask), outputs.embedding

  return Loaded(module, variables, embed)
