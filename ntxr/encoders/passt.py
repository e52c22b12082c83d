"""PaSST-S (Koutini et al. 2022) in Flax Linen, as hear21passt 0.0.26 computes it.

`MelSpectrogram` is hear21passt's `AugmentMelSTFT` in evaluation mode (32 kHz waveforms ->
log-mel [B, 128, frames]); `PaSST` is its transformer over 16x16 patches of that mel at
stride 10 (or 16, as passt_s_p16_s16_128_ap468), with frequency and time position
embeddings and structured patchout; `Encoder` chains the two and gives frame and clip
embeddings. `load(path)` reads a released state dict, its sizes from its tensors.

Training-mode augmentation of the front end (frequency and time masking, random fmin/fmax)
and unstructured patchout are left out; structured patchout is kept.
"""

import functools
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ntxr.encoders import checkpoint_files
from ntxr.encoders.loaded import Loaded

Array = jax.Array
SAMPLE_RATE = 32000
PUBLISHED = ("https://github.com/kkoutini/PaSST/releases "
             "(v0.0.1-audioset/passt-s-f128-p16-s10-ap.476-swa.pt and others)")
_WRAPPER_PREFIX = "net."  # hear21passt's PasstBasicWrapper holds PaSST as `net`


class Size(NamedTuple):
  width: int
  depth: int
  num_heads: int


VARIANTS = {"S": Size(width=768, depth=12, num_heads=12)}
HEAD_WIDTH = 64  # every released PaSST's attention heads are this wide
MEL_BINS = 128


def kaldi_mel_banks(n_mels: int, n_fft: int, sample_rate: float, fmin: float,
                    fmax: float) -> np.ndarray:
  """Kaldi's triangular mel filters [n_mels, n_fft // 2 + 1] in float64 (torchaudio's
  `compliance.kaldi.get_mel_banks` without VTLN warping, plus the zero column for the
  Nyquist bin that AugmentMelSTFT appends)."""
  mel = lambda freq: 1127.0 * np.log1p(np.asarray(freq, np.float64) / 700.0)
  low, high = mel(fmin), mel(fmax)
  delta = (high - low) / (n_mels + 1)
  left = low + np.arange(n_mels)[:, None] * delta
  center, right = left + delta, left + 2 * delta
  bins = mel(sample_rate / n_fft * np.arange(n_fft // 2))[None]
  up, down = (bins - left) / (center - left), (right - bins) / (right - center)
  banks = np.maximum(0.0, np.minimum(up, down))
  return np.pad(banks, ((0, 0), (0, 1)))


class MelSpectrogram(nn.Module):
  """Waveforms [B, N] at 32 kHz -> log-mel [B, n_mels, 1 + (N - 1) // hop].

  hear21passt's AugmentMelSTFT in evaluation mode: pre-emphasis x[n+1] - 0.97 x[n], an STFT
  (torch.stft with center=True, reflect padding, a symmetric Hann window of win_length
  centred in n_fft), the power through Kaldi mel filters from fmin to fmax (hear21passt's
  get_basic_model: 0 and 15 kHz), then (log(mel + 1e-5) + 4.5) / 5. No parameters.
  """
  n_mels: int = 128
  n_fft: int = 1024
  win_length: int = 800
  hop: int = 320
  fmin: float = 0.0
  fmax: float = 15000.0

  def frames(self, samples):
    """Mel frames of `samples` samples (an int or an int array)."""
    return 1 + (samples - 1) // self.hop

  def __call__(self, waveforms: Array) -> Array:
    x = waveforms[:, 1:] - 0.97 * waveforms[:, :-1]
    pad = self.n_fft // 2
    if x.shape[1] <= pad:
      raise ValueError(f"{waveforms.shape[1]} samples: reflect padding by {pad} needs more "
                       f"than {pad + 1}")
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    starts = jnp.arange(self.frames(waveforms.shape[1])) * self.hop
    framed = x[:, starts[:, None] + jnp.arange(self.n_fft)]  # [B, frames, n_fft]
    window = np.hanning(self.win_length)  # symmetric, as hann_window(periodic=False)
    left = (self.n_fft - self.win_length) // 2
    window = np.pad(window, (left, self.n_fft - self.win_length - left))
    spectrum = jnp.fft.rfft(framed * window.astype(x.dtype), axis=-1)
    power = spectrum.real ** 2 + spectrum.imag ** 2
    banks = kaldi_mel_banks(self.n_mels, self.n_fft, SAMPLE_RATE, self.fmin, self.fmax)
    mel = jnp.einsum("mk,btk->bmt", banks.astype(x.dtype), power,
                     precision=jax.lax.Precision.HIGHEST)  # float32 whatever the run's
    return (jnp.log(mel + 1e-5) + 4.5) / 5.0


class Attention(nn.Module):
  """Multi-head self-attention with one qkv projection (timm's ViT)."""
  width: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, n, _ = x.shape
    head_dim = self.width // self.num_heads
    qkv = nn.Dense(3 * self.width, dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, head_dim]
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * head_dim ** -0.5
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    x = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, self.width)
    return nn.Dense(self.width, dtype=self.dtype, name="proj")(x)


class Block(nn.Module):
  """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) with exact GELU."""
  width: int
  num_heads: int
  mlp_ratio: int = 4
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, use_fast_variance=False,
                             dtype=self.dtype)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    x = x + Attention(self.width, self.num_heads, self.dtype, name="attn")(norm(name="norm1")(x))
    y = dense(self.mlp_ratio * self.width, name="fc1")(norm(name="norm2")(x))
    return x + dense(self.width, name="fc2")(nn.gelu(y, approximate=False))


class PaSSTOutputs(NamedTuple):
  logits: Array  # [B, num_classes]
  features: Array  # [B, width]: the mean of the class and distillation tokens' outputs
  patches: Array  # [B, F', T', width]: the patch tokens' outputs (after the final norm)
  kept_time: Array  # [T']: the time columns of patches kept, ascending
  kept_freq: Array  # [F']: the frequency rows of patches kept, ascending


class PaSST(nn.Module):
  """Log-mel [B, 128, frames] -> PaSSTOutputs (hear21passt's PaSST with distillation token).

  A 16x16 convolution at stride 10 cuts the mel into F' = 12 frequency rows and
  T' = (frames - 16) // 10 + 1 time columns of patches; each gets its row's and column's
  position embedding (the time embedding cut to T' columns: inputs of more than
  `time_patches` columns, 10 s for the released files, are refused, where the reference
  fails to add the embedding). In training, structured patchout keeps a random sorted
  subset of T' - s_patchout_t columns and F' - s_patchout_f rows (rng "patchout"). The
  class and distillation tokens, each with its position embedding, go before the patches;
  then the blocks and a final LayerNorm. features = mean of the two tokens' outputs;
  logits = head(LayerNorm(features)). dtype: of everything after the float32 mel (the
  attention's softmax in float32); remat: each block's activations are recomputed for
  the gradient, not kept.
  """
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  patch_size: int = 16
  stride: int = 10
  freq_patches: int = 12
  time_patches: int = 99
  num_classes: int = 527
  s_patchout_t: int = 0
  s_patchout_f: int = 0
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, mel: Array, *, train: bool = False, kept_time: Optional[Array] = None,
               kept_freq: Optional[Array] = None) -> PaSSTOutputs:
    """kept_time / kept_freq: the patch columns / rows to keep (ascending), in place of
    patchout's random draw; None: drawn when training with patchout, all otherwise."""
    embed_init = nn.initializers.truncated_normal(0.02)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size), (self.stride, self.stride),
                padding="VALID", dtype=self.dtype,
                name="patch_embed")(mel[..., None])  # [B, F', T', width]
    b, f, t, _ = x.shape
    if f != self.freq_patches:
      raise ValueError(f"{mel.shape[1]} mel bins give {f} rows of patches, not "
                       f"{self.freq_patches}")
    if not 1 <= t <= self.time_patches:
      raise ValueError(f"{mel.shape[2]} mel frames give {t} columns of patches; PaSST takes "
                       f"1 to {self.time_patches} (its time position embedding's length)")
    time_pos = self.param("time_pos_embed", embed_init, (self.time_patches, self.width))
    freq_pos = self.param("freq_pos_embed", embed_init, (self.freq_patches, self.width))
    x = x + (time_pos[:t] + freq_pos[:, None]).astype(x.dtype)  # the stream in dtype
    if kept_time is None:
      kept_time = self._patchout(train, t, self.s_patchout_t, "time")
    if kept_freq is None:
      kept_freq = self._patchout(train, f, self.s_patchout_f, "frequency")
    x = x[:, :, kept_time][:, kept_freq]
    f, t = x.shape[1:3]
    token_pos = self.param("token_pos_embed", embed_init, (2, self.width))
    tokens = [self.param(name, embed_init, (self.width,)) + token_pos[i]
              for i, name in enumerate(("cls_token", "dist_token"))]
    tokens = jnp.stack(tokens).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(tokens, (b, 2, self.width)),
                         x.reshape(b, f * t, self.width)], axis=1)
    block = nn.remat(Block) if self.remat else Block
    for i in range(self.depth):
      x = block(self.width, self.num_heads, dtype=self.dtype, name=f"blocks_{i}")(x)
    norm = functools.partial(nn.LayerNorm, use_fast_variance=False, dtype=self.dtype)
    x = norm(epsilon=1e-6, name="norm")(x)
    features = (x[:, 0] + x[:, 1]) / 2
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(
        norm(epsilon=1e-5, name="head_norm")(features))
    patches = x[:, 2:].reshape(b, f, t, self.width)
    return PaSSTOutputs(logits, features, patches, kept_time, kept_freq)

  def _patchout(self, train: bool, count: int, drop: int, axis: str) -> Array:
    """Indices kept of `count` rows or columns: `count - drop` drawn without replacement
    when training, ascending; all otherwise."""
    if not (train and drop):
      return jnp.arange(count)
    if drop >= count:
      raise ValueError(f"structured patchout drops {drop} of {count} {axis} patches")
    order = jax.random.permutation(self.make_rng("patchout"), count)
    return jnp.sort(order[:count - drop])


class EncoderOutputs(NamedTuple):
  frames: Array  # [B, T', width]: patch outputs averaged over the frequency rows
  mask: Array  # [B, T']: the columns within each clip's length
  clip: Array  # [B, width]: PaSST's features (before the head)
  logits: Array  # [B, num_classes]


class Encoder(nn.Module):
  """Waveforms [B, N] at 32 kHz -> EncoderOutputs: the front end, then PaSST.

  frames[:, j] is the mean over the frequency rows of the last layer's outputs for the
  patches of column j (mel frames 10 j to 10 j + 15, 0.1 s apart); under patchout only the
  kept columns, in order. With `lengths` [B] (samples of each clip, the rest padding), a
  column is valid when it is among the (frames - 16) // 10 + 1 columns the clip gives alone
  (at least its first); the padding is still attended to, as in the reference's padded batch.
  """
  size: Size = VARIANTS["S"]
  time_patches: int = 99
  num_classes: int = 527
  s_patchout_t: int = 0
  s_patchout_f: int = 0
  dtype: Any = jnp.float32  # see PaSST
  remat: bool = False
  stride: int = 10

  def setup(self):
    self.front_end = MelSpectrogram()
    self.passt = PaSST(
        width=self.size.width, depth=self.size.depth, num_heads=self.size.num_heads,
        stride=self.stride, freq_patches=freq_patches(self.stride),
        time_patches=self.time_patches, num_classes=self.num_classes,
        s_patchout_t=self.s_patchout_t, s_patchout_f=self.s_patchout_f, dtype=self.dtype,
        remat=self.remat)

  def __call__(self, waveforms: Array, lengths: Optional[Array] = None, *,
               train: bool = False, kept_time: Optional[Array] = None,
               kept_freq: Optional[Array] = None) -> EncoderOutputs:
    out = self.passt(self.front_end(waveforms), train=train, kept_time=kept_time,
                     kept_freq=kept_freq)
    if lengths is None:
      lengths = jnp.full(waveforms.shape[:1], waveforms.shape[1])
    frames = self.front_end.frames(jnp.asarray(lengths))
    columns = time_patches(frames, self.passt.stride, self.passt.patch_size)
    mask = out.kept_time[None] < columns[:, None]
    return EncoderOutputs(out.patches.mean(axis=1), mask, out.features, out.logits)


def time_patches(frames, stride: int, patch_size: int = 16):
  """The columns of patches that cut `frames` mel frames (an int or an int array) at
  `stride`, at least one."""
  return jnp.maximum((frames - patch_size) // stride + 1, 1)


def freq_patches(stride: int, patch_size: int = 16) -> int:
  """The rows of patches that cut MEL_BINS mel bins at `stride`: 12 at 10, 8 at 16."""
  return (MEL_BINS - patch_size) // stride + 1


def _layouts(size: Size, time_patches: int, num_classes: int, stride: int) -> dict:
  """Each state-dict key of PaSST -> (its shape there, its Flax path or None for a key
  the reference's forward never reads, the conversion to the Flax layout)."""
  d, c, rows = size.width, num_classes, freq_patches(stride)
  same = lambda a: a
  layouts = {
      "cls_token": ((1, 1, d), ("cls_token",), lambda a: a.reshape(d)),
      "dist_token": ((1, 1, d), ("dist_token",), lambda a: a.reshape(d)),
      "new_pos_embed": ((1, 2, d), ("token_pos_embed",), lambda a: a[0]),
      "freq_new_pos_embed": ((1, d, rows, 1), ("freq_pos_embed",),
                             lambda a: a[0, :, :, 0].T),
      "time_new_pos_embed": ((1, d, 1, time_patches), ("time_pos_embed",),
                             lambda a: a[0, :, 0].T),
      "patch_embed.proj.weight": ((d, 1, 16, 16), ("patch_embed", "kernel"),
                                  lambda a: a.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
      "patch_embed.proj.bias": ((d,), ("patch_embed", "bias"), same),
      "norm.weight": ((d,), ("norm", "scale"), same),
      "norm.bias": ((d,), ("norm", "bias"), same),
      "head.0.weight": ((d,), ("head_norm", "scale"), same),
      "head.0.bias": ((d,), ("head_norm", "bias"), same),
      "head.1.weight": ((c, d), ("head", "kernel"), lambda a: a.T),
      "head.1.bias": ((c,), ("head", "bias"), same),
      # DeiT's distillation head: PaSST's forward classifies the tokens' mean with `head`.
      "head_dist.weight": ((c, d), None, same),
      "head_dist.bias": ((c,), None, same),
  }
  linears = {"attn.qkv": ("attn", "qkv", 3 * d, d), "attn.proj": ("attn", "proj", d, d),
             "mlp.fc1": ("fc1", None, 4 * d, d), "mlp.fc2": ("fc2", None, d, 4 * d)}
  for i in range(size.depth):
    block = f"blocks_{i}"
    for norm in ("norm1", "norm2"):
      layouts[f"blocks.{i}.{norm}.weight"] = ((d,), (block, norm, "scale"), same)
      layouts[f"blocks.{i}.{norm}.bias"] = ((d,), (block, norm, "bias"), same)
    for name, (outer, inner, out_dim, in_dim) in linears.items():
      path = (block, outer) + ((inner,) if inner else ())
      layouts[f"blocks.{i}.{name}.weight"] = ((out_dim, in_dim), path + ("kernel",),
                                              lambda a: a.T)
      layouts[f"blocks.{i}.{name}.bias"] = ((out_dim,), path + ("bias",), same)
  return layouts


def sizes_of(state_dict: dict) -> dict:
  """The Encoder fields a PaSST state dict's tensors give (those it lacks left out): size
  (width from the class token, depth from the blocks, HEAD_WIDTH-wide heads), stride
  (from the frequency rows), time_patches and num_classes."""
  shapes = {key.removeprefix(_WRAPPER_PREFIX): np.shape(value)
            for key, value in state_dict.items()}
  sizes = {}
  if len(shapes.get("cls_token", ())) == 3:
    width = shapes["cls_token"][2]
    depth = len({key.split(".")[1] for key in shapes if key.startswith("blocks.")})
    sizes["size"] = Size(width, depth, max(width // HEAD_WIDTH, 1))
  if len(shapes.get("freq_new_pos_embed", ())) == 4:
    rows = shapes["freq_new_pos_embed"][2]
    sizes["stride"] = (MEL_BINS - 16) // max(rows - 1, 1)
  if len(shapes.get("time_new_pos_embed", ())) == 4:
    sizes["time_patches"] = shapes["time_new_pos_embed"][3]
  if len(shapes.get("head.1.bias", ())) == 1:
    sizes["num_classes"] = shapes["head.1.bias"][0]
  return sizes


def variables_from_state_dict(state_dict: dict, size: Size = VARIANTS["S"], *,
                              time_patches: int = 99, num_classes: int = 527,
                              stride: int = 10, source: str = "the state dict") -> dict:
  """PaSST's state dict (keys as in PaSST, or under hear21passt's wrapper prefix "net.")
  -> the variables of `Encoder(size, time_patches, num_classes, stride=stride)`.

  Raises ValueError, one line naming `source`, the key, the expected and found shapes and
  where the files are published, for a key it does not map, a key missing, a wrong shape.
  """
  layouts = _layouts(size, time_patches, num_classes, stride)
  if any(key.startswith(_WRAPPER_PREFIX) for key in state_dict):
    # hear21passt's wrapper: PaSST under "net.", a device marker, no mel buffers saved.
    layouts = {_WRAPPER_PREFIX + key: layout for key, layout in layouts.items()}
    layouts["device_proxy"] = ((1,), None, lambda a: a)
  where = f"(PaSST's files: {PUBLISHED})"
  params = {}
  for key, value in state_dict.items():
    if key not in layouts:
      raise ValueError(f"{source}: key {key!r} (shape {tuple(np.shape(value))}) is not a key "
                       f"of PaSST ({size.width} wide, {size.depth} deep) {where}")
    shape, path, convert = layouts[key]
    if tuple(np.shape(value)) != shape:
      raise ValueError(f"{source}: key {key!r} has shape {tuple(np.shape(value))}, expected "
                       f"{shape} for PaSST ({size.width} wide, {size.depth} deep) {where}")
    if path is not None:
      node = params
      for name in path[:-1]:
        node = node.setdefault(name, {})
      node[path[-1]] = jnp.asarray(convert(np.asarray(value, np.float32)))
  for key, (shape, _, _) in layouts.items():
    if key not in state_dict:
      raise ValueError(f"{source}: key {key!r} is missing (expected shape {shape}, found "
                       f"none) {where}")
  return {"params": {"passt": params}}


def load(path: str, variant: Any = None, cache_dir: Optional[str] = None) -> Loaded:
  """The released PaSST file `path` (a state dict, e.g. passt-s-f128-p16-s10-ap.476-swa.pt
  or passt-s-p16-s16-128-ap.468.pt) -> Loaded(Encoder, its variables, embed).

  variant: a name in VARIANTS or a Size, checked against the file; None: the file's own
  (`sizes_of`); stride, time patches and classes are always the file's. embed(waveforms
  [B, N] at 32 kHz, lengths [B] in samples or None) -> ((frames [B, T', width], mask
  [B, T']), clip [B, width]), jitted. cache_dir: where the file's tensors are kept after
  its first read (`checkpoint_files.read_state_dict`).
  """
  state_dict = checkpoint_files.read_state_dict(path, cache_dir, PUBLISHED)
  fields = {"size": VARIANTS["S"], "stride": 10, "time_patches": 99, "num_classes": 527,
            **sizes_of(state_dict)}
  if variant is not None:
    fields["size"] = VARIANTS[variant] if isinstance(variant, str) else Size(*variant)
  variables = variables_from_state_dict(state_dict, source=str(path), **fields)
  module = Encoder(**fields)

  @jax.jit
  def embed(waveforms, lengths=None):
    out = module.apply(variables, jnp.asarray(waveforms, jnp.float32), lengths)
    return (out.frames, out.mask), out.clip

  return Loaded(module, variables, embed)
