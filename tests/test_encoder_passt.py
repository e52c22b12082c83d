"""ntxr.encoders.passt against hear21passt 0.0.26's own classes.

The reference is built with random weights (LayerNorm scales away from 1, random position
embeddings and tokens), saved as the released files are (PaSST's plain state dict, or
hear21passt's wrapper's), read back by `passt.load`, and run on real recordings resampled
to 32 kHz. Tolerance: max |ntxr - reference| / max |reference| < 1e-5, in float32 (for
the front end, of the mel power before the log: see test_front_end_matches_augment_mel_stft).
"""

import functools
import os
import sys

import jax
import librosa
import numpy as np
import pytest
import soundfile
import torch

from ntxr.encoders import references as torch_references

from ntxr.encoders import passt

pytestmark = pytest.mark.filterwarnings(  # the reference's, on every call
    "ignore:Input image size", "ignore:stft with return_complex=False",
    "ignore:`torch.cuda.amp.autocast")
RECORDINGS = os.path.join(os.path.dirname(__file__), "data", "recordings")
TOLERANCE = 1e-5
TINY = passt.Size(width=64, depth=2, num_heads=4)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


_REFERENCES = torch_references.hear21passt()
base, reference, preprocess = (_REFERENCES.base, _REFERENCES.reference,
                               _REFERENCES.preprocess)


def _recording(name, seconds=None):
  """A recording from tests/data/recordings, mono at 32 kHz, tiled to `seconds` if given."""
  audio, rate = soundfile.read(os.path.join(RECORDINGS, name), dtype="float32",
                               always_2d=True)
  audio = librosa.resample(audio.mean(axis=1), orig_sr=rate, target_sr=passt.SAMPLE_RATE)
  if seconds is not None:
    samples = int(seconds * passt.SAMPLE_RATE)
    audio = np.tile(audio, -(-samples // len(audio)))[:samples]
  return audio.astype(np.float32)


@pytest.fixture(scope="module")
def clips():
  """Two real recordings (6.1 s and 2.3 s) and one tiled to exactly 10 s."""
  return {"alarm": _recording("alarm clock.ogg"), "xylophone": _recording("xylofón.mp3"),
          "trumpet, 10 s": _recording("trumpet.mp3", seconds=10)}


def _randomize(net, seed):
  """Weights away from PaSST's initialisation: LayerNorm scales around 1, non-zero biases,
  position embeddings and tokens as large as the patch embeddings, linear layers at
  1 / sqrt(fan_in)."""
  generator = torch.Generator().manual_seed(seed)
  normal = lambda p, std: torch.randn(p.shape, generator=generator) * std
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.LayerNorm):
        module.weight.copy_(1 + normal(module.weight, 0.3))
        module.bias.copy_(normal(module.bias, 0.1))
      elif isinstance(module, torch.nn.Linear):
        module.weight.copy_(normal(module.weight, 1 / module.in_features ** 0.5))
        module.bias.copy_(normal(module.bias, 0.1))
    for name in ("cls_token", "dist_token", "new_pos_embed", "freq_new_pos_embed",
                 "time_new_pos_embed"):
      getattr(net, name).copy_(normal(getattr(net, name), 0.5))
  return net


def _tiny_reference(s_patchout_t=0, s_patchout_f=0):
  """hear21passt's PaSST as get_model builds it (distilled, patch 16, stride 10, 128 x 998
  input), at TINY's sizes."""
  net = reference.PaSST(
      img_size=(128, 998), patch_size=16, stride=(10, 10), in_chans=1, num_classes=527,
      embed_dim=TINY.width, depth=TINY.depth, num_heads=TINY.num_heads, distilled=True,
      s_patchout_t=s_patchout_t, s_patchout_f=s_patchout_f)
  return _randomize(net, seed=1).eval()


def _run_reference(net, mel):
  """(logits, features, patch outputs [B, F' * T', D]) of `net` on mel [B, 128, frames]."""
  outputs = []
  hook = net.norm.register_forward_hook(lambda module, inputs, out: outputs.append(out))
  with torch.no_grad():
    logits, features = net(torch.as_tensor(mel)[:, None])
  hook.remove()
  (tokens,) = outputs
  return logits.numpy(), features.numpy(), tokens[:, 2:].numpy()


@pytest.fixture(scope="module")
def hear21passt_s():
  """hear21passt's get_basic_model (AugmentMelSTFT and PaSST-S in PasstBasicWrapper) with
  pretrained=False, random weights, in evaluation mode."""
  original = base.get_model_passt
  base.get_model_passt = functools.partial(reference.get_model, pretrained=False)
  try:
    wrapper = base.get_basic_model(mode="all")
  finally:
    base.get_model_passt = original
  _randomize(wrapper.net, seed=0)
  return wrapper.eval()


def _reference_mel(wrapper, waveforms):
  """AugmentMelSTFT's log-mel of waveforms [B, N] (`wrapper` or the front end itself)."""
  front_end = getattr(wrapper, "mel", wrapper)
  with torch.no_grad():
    return front_end(torch.as_tensor(np.asarray(waveforms))).numpy()


def _relative(ours, theirs):
  """max |ours - theirs| / max |theirs|, shapes equal."""
  ours, theirs = np.asarray(ours), np.asarray(theirs)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def _in_float64(function):
  """function() computed with torch's default dtype float64."""
  default = torch.get_default_dtype()
  torch.set_default_dtype(torch.float64)
  try:
    return function()
  finally:
    torch.set_default_dtype(default)


def test_mel_banks_are_torchaudios(hear21passt_s):
  """Kaldi's filters as torchaudio computes them for AugmentMelSTFT's fmin and fmax.

  In float64 they agree to its rounding. AugmentMelSTFT computes them in float32, where a
  slope (mel - left) / (center - left) divides a rounding of mel (up to 3,700, half an ulp
  1.2e-4) by the filter's half width (28.6 here), and torch's float32 log is off by an ulp
  at places: its filters differ from the exact ones by up to 2 ulps / 28.6 = 1.7e-5
  (measured 1.3e-5).
  """
  mel = hear21passt_s.mel
  ours = passt.MelSpectrogram()
  assert (mel.sr, mel.n_fft, mel.n_mels, mel.fmin, mel.fmax) == (
      passt.SAMPLE_RATE, ours.n_fft, ours.n_mels, ours.fmin, ours.fmax)
  banks = passt.kaldi_mel_banks(128, 1024, 32000, mel.fmin, mel.fmax)
  kaldi = sys.modules["torchaudio"].compliance.kaldi
  theirs = lambda: torch.nn.functional.pad(kaldi.get_mel_banks(
      128, 1024, 32000, mel.fmin, mel.fmax, vtln_low=100.0, vtln_high=-500.0,
      vtln_warp_factor=1.0)[0], (0, 1)).numpy()
  exact = _in_float64(theirs)
  assert exact.dtype == banks.dtype == np.float64
  assert _relative(banks, exact) < 1e-12
  delta = (kaldi.mel_scale_scalar(mel.fmax) - kaldi.mel_scale_scalar(mel.fmin)) / 129
  ulp = np.spacing(np.float32(kaldi.mel_scale_scalar(mel.fmax)))
  assert np.abs(banks - theirs()).max() < 2 * ulp / delta


def _rebuilt(mel):
  """A new AugmentMelSTFT with `mel`'s settings: built under torch's default dtype float64,
  its window and pre-emphasis filter are float64 (`.double()` would keep their float32
  rounding)."""
  return preprocess.AugmentMelSTFT(
      n_mels=mel.n_mels, sr=mel.sr, win_length=mel.win_length, hopsize=mel.hopsize,
      n_fft=mel.n_fft, fmin=mel.fmin, fmax=mel.fmax, fmin_aug_range=mel.fmin_aug_range,
      fmax_aug_range=mel.fmax_aug_range).eval()


def _reference_mel_with_exact_filters(wrapper, waveforms):
  """AugmentMelSTFT's log-mel with its Kaldi filters computed in float64, then rounded to
  float32: those it computes in float32 are off by up to 1.7e-5 (see
  test_mel_banks_are_torchaudios), which alone moves its mel power by 1e-5 of its peak."""
  kaldi = sys.modules["torchaudio"].compliance.kaldi

  def get_mel_banks(*args, **kwargs):
    return tuple(tensor.float() for tensor in _in_float64(lambda: original(*args, **kwargs)))

  original = kaldi.get_mel_banks
  kaldi.get_mel_banks = get_mel_banks
  try:
    return _reference_mel(wrapper, waveforms)
  finally:
    kaldi.get_mel_banks = original


def test_front_end_matches_augment_mel_stft(hear21passt_s, clips):
  """The same function: in float64 the log-mels agree to 1e-12.

  In float32, with the same filters, the mel power (before the log) agrees to 1e-5 of its
  largest value. The log-mel itself does not everywhere: an FFT's float32 rounding is
  relative to a frame's energy, so bins near the log's floor of 1e-5 carry errors of 1e-5
  of their value and more, in the reference as in ntxr (on the alarm, 6.4e-5 and 5.1e-5 of
  its largest log-mel from float64's; 9e-5 between the two)."""
  mel = hear21passt_s.mel
  assert (mel.win_length, mel.hopsize) == (passt.MelSpectrogram.win_length,
                                           passt.MelSpectrogram.hop)
  power = lambda log_mel: np.exp(5 * np.asarray(log_mel, np.float64) - 4.5)
  front_end = jax.jit(functools.partial(passt.MelSpectrogram().apply, {}))
  for name, clip in clips.items():
    ours = front_end(clip[None])
    theirs = _reference_mel_with_exact_filters(hear21passt_s, clip[None])
    assert ours.dtype == theirs.dtype == np.float32
    assert _relative(power(ours), power(theirs)) < TOLERANCE, name
    with jax.enable_x64(True):
      ours = front_end(clip[None].astype(np.float64))
    theirs = _in_float64(lambda: _reference_mel(_rebuilt(mel), clip[None].astype(np.float64)))
    assert ours.dtype == theirs.dtype == np.float64
    assert _relative(ours, theirs) < 1e-12, name


def _save(state_dict, path):
  torch.save(state_dict, path)
  return str(path)


def _columns(samples):
  """PaSST's patch columns for a clip of `samples` samples."""
  return (1 + (samples - 1) // 320 - 16) // 10 + 1


def _run_wrapper(wrapper, waveforms):
  """(logits, features, patch outputs [B, F' * T', D]) of hear21passt's wrapper on
  waveforms [B, N]: its own output (logits and features side by side), and the patch
  tokens' outputs of the final norm."""
  outputs = []
  hook = wrapper.net.norm.register_forward_hook(
      lambda module, inputs, out: outputs.append(out))
  with torch.no_grad():
    embedded = wrapper(torch.as_tensor(waveforms)).numpy()
  hook.remove()
  (tokens,) = outputs
  classes = wrapper.net.num_classes
  return embedded[:, :classes], embedded[:, classes:], tokens[:, 2:].numpy()


def _frequency_mean(tokens, rows):
  """Patch outputs [B, rows * T', D] in PaSST's order (row-major) -> their mean over the
  rows [B, T', D]."""
  b, n, d = tokens.shape
  return tokens.reshape(b, rows, n // rows, d).mean(axis=1)


def test_passt_s_matches_hear21passt(hear21passt_s, clips, tmp_path):
  """The real sizes (768 wide, 12 blocks, 12 heads) in the released files' format
  (passt-s-f128-p16-s10-ap.476-swa.pt holds PaSST's plain state dict)."""
  loaded = passt.load(_save(hear21passt_s.net.state_dict(), tmp_path / "passt-s.pt"))
  assert loaded.module.size == passt.VARIANTS["S"] == (768, 12, 12)
  waveforms = clips["xylophone"][None]
  logits, features, tokens = _run_wrapper(hear21passt_s, waveforms)
  out = jax.jit(loaded.module.apply)(loaded.variables, waveforms)
  assert out.frames.shape == (1, tokens.shape[1] // 12, 768) and bool(out.mask.all())
  assert _relative(out.logits, logits) < TOLERANCE
  assert _relative(out.clip, features) < TOLERANCE
  assert _relative(out.frames, _frequency_mean(tokens, 12)) < TOLERANCE


def test_tiny_passt_from_the_wrappers_file_on_a_padded_batch(hear21passt_s, clips, tmp_path):
  """A clip tiled to 10 s (all 99 columns of the time embedding) batched with one padded
  to it, lengths given; then the padded one alone. The file: hear21passt's wrapper's state
  dict ("net." prefix, its device marker)."""
  wrapper = base.PasstBasicWrapper(mel=hear21passt_s.mel, net=_tiny_reference(), mode="all")
  path = _save(wrapper.state_dict(), tmp_path / "wrapper.pt")
  assert any(key.startswith("net.") for key in torch.load(path))
  loaded = passt.load(path, TINY)
  full, short = clips["trumpet, 10 s"], clips["alarm"]
  batch = np.stack([full, np.pad(short, (0, len(full) - len(short)))])
  (frames, mask), clip = loaded.embed(batch, np.array([len(full), len(short)]))
  logits, features, tokens = _run_wrapper(wrapper.eval(), batch)
  assert frames.shape == (2, 99, TINY.width) == (2, tokens.shape[1] // 12, TINY.width)
  assert _relative(clip, features) < TOLERANCE
  assert _relative(frames, _frequency_mean(tokens, 12)) < TOLERANCE
  assert _relative(jax.jit(loaded.module.apply)(loaded.variables, batch).logits,
                   logits) < TOLERANCE
  (alone, alone_mask), alone_clip = loaded.embed(short[None])
  logits, features, tokens = _run_wrapper(wrapper, short[None])
  columns = tokens.shape[1] // 12
  assert alone.shape == (1, columns, TINY.width) and bool(alone_mask.all())
  assert _relative(alone_clip, features) < TOLERANCE
  assert _relative(alone, _frequency_mean(tokens, 12)) < TOLERANCE
  assert mask.tolist() == [[True] * 99, [True] * columns + [False] * (99 - columns)]


def test_a_stride_16_file_loads_with_the_sizes_its_tensors_give(hear21passt_s, clips,
                                                                 tmp_path):
  """passt_s_p16_s16_128_ap468 (the DCASE 2025 baseline's) cuts 8 rows and 62 columns of
  patches at stride 16: `load` reads the stride, width, depth and heads from the file."""
  size = passt.Size(width=128, depth=2, num_heads=2)  # heads 64 wide, as released files'
  net = _randomize(reference.PaSST(
      img_size=(128, 998), patch_size=16, stride=(16, 16), in_chans=1, num_classes=10,
      embed_dim=size.width, depth=size.depth, num_heads=size.num_heads, distilled=True),
      seed=2).eval()
  wrapper = base.PasstBasicWrapper(mel=hear21passt_s.mel, net=net, mode="all")
  loaded = passt.load(_save(net.state_dict(), tmp_path / "passt-s16.pt"))
  assert (loaded.module.size, loaded.module.stride, loaded.module.time_patches,
          loaded.module.num_classes) == (size, 16, 62, 10)
  waveforms = clips["trumpet, 10 s"][None]
  logits, features, tokens = _run_wrapper(wrapper.eval(), waveforms)
  (frames, _), clip = loaded.embed(waveforms)
  assert frames.shape == (1, 62, size.width) == (1, tokens.shape[1] // 8, size.width)
  assert _relative(clip, features) < TOLERANCE
  assert _relative(frames, _frequency_mean(tokens, 8)) < TOLERANCE
  assert _relative(jax.jit(loaded.module.apply)(loaded.variables, waveforms).logits,
                   logits) < TOLERANCE


def test_structured_patchout_keeps_the_references_patches(hear21passt_s, clips):
  """hear21passt draws the kept columns, then rows, with torch.randperm: with the same
  seed the test draws them again and hands them to ntxr."""
  drop_time, drop_freq = 5, 3
  net = _tiny_reference(s_patchout_t=drop_time, s_patchout_f=drop_freq)
  variables = passt.variables_from_state_dict(
      {key: value.numpy() for key, value in net.state_dict().items()}, TINY)
  module = passt.PaSST(TINY.width, TINY.depth, TINY.num_heads, s_patchout_t=drop_time,
                       s_patchout_f=drop_freq)
  apply = jax.jit(functools.partial(module.apply, {"params": variables["params"]["passt"]}),
                  static_argnames="train")
  mel = _reference_mel(hear21passt_s, clips["xylophone"][None])
  columns = (mel.shape[2] - 16) // 10 + 1
  torch.manual_seed(7)
  logits, features, tokens = _run_reference(net.train(), mel)
  net.eval()
  torch.manual_seed(7)
  kept_time = torch.randperm(columns)[:columns - drop_time].sort().values.numpy()
  kept_freq = torch.randperm(12)[:12 - drop_freq].sort().values.numpy()
  assert tokens.shape[1] == (12 - drop_freq) * (columns - drop_time)
  out = apply(mel, train=True, kept_time=kept_time, kept_freq=kept_freq)
  assert out.patches.shape == (1, 12 - drop_freq, columns - drop_time, TINY.width)
  assert _relative(out.logits, logits) < TOLERANCE
  assert _relative(out.features, features) < TOLERANCE
  assert _relative(out.patches.reshape(tokens.shape), tokens) < TOLERANCE

  drawn = [apply(mel, train=True, rngs={"patchout": jax.random.key(seed)}) for seed in (0, 1)]
  for out in drawn:
    for kept, count, drop in ((out.kept_time, columns, drop_time), (out.kept_freq, 12, drop_freq)):
      assert len(set(kept.tolist())) == count - drop == len(kept)
      assert kept.tolist() == sorted(kept.tolist()) and 0 <= kept.min() <= kept.max() < count
    again = apply(mel, train=True, kept_time=out.kept_time, kept_freq=out.kept_freq)
    assert np.array_equal(again.logits, out.logits)
  assert drawn[0].kept_time.tolist() != drawn[1].kept_time.tolist()

  logits, features, tokens = _run_reference(net, mel)  # evaluation: every patch
  out = apply(mel, train=False)
  assert out.patches.shape == (1, 12, columns, TINY.width)
  assert _relative(out.logits, logits) < TOLERANCE


def test_inputs_beyond_the_time_embedding_are_refused_as_the_reference_fails(hear21passt_s):
  """The time embedding holds 99 columns: 321,600 samples (10.05 s) give 99; one hop more
  gives 100, which the reference cannot add its embedding to."""
  net = _tiny_reference()
  module = passt.Encoder(TINY)
  variables = passt.variables_from_state_dict(
      {key: value.numpy() for key, value in net.state_dict().items()}, TINY)
  for samples, fits in ((321600, True), (321600 + 320, False)):
    waveforms = np.zeros((1, samples), np.float32)
    mel = _reference_mel(hear21passt_s, waveforms)
    if fits:
      _run_reference(net, mel)
      assert jax.eval_shape(module.apply, variables, waveforms).frames.shape[1] == 99
    else:
      with pytest.raises(RuntimeError, match="size of tensor"):
        _run_reference(net, mel)
      with pytest.raises(ValueError, match="give 100 columns of patches; PaSST takes 1 to 99"):
        jax.eval_shape(module.apply, variables, waveforms)


@pytest.mark.parametrize("change, key, shapes", [
    ("rename", "norm.gamma", ["(64,)"]),
    ("delete", "head.1.bias", ["(527,)"]),
    ("shorten", "patch_embed.proj.bias", ["(50,)", "(64,)"]),
    ("shorten", "head_dist.weight", ["(527, 50)", "(527, 64)"]),  # read, not used
])
def test_load_refuses_a_wrong_missing_or_misshaped_key(tmp_path, change, key, shapes):
  state_dict = _tiny_reference().state_dict()
  if change == "rename":
    state_dict[key] = state_dict.pop("norm.weight")
  elif change == "delete":
    del state_dict[key]
  else:
    state_dict[key] = state_dict[key][..., :50].clone()
  path = _save(state_dict, tmp_path / "passt.pt")
  with pytest.raises(ValueError) as raised:
    passt.load(path, TINY)
  message = str(raised.value)
  assert "\n" not in message and path in message and repr(key) in message
  assert passt.PUBLISHED in message and all(shape in message for shape in shapes)


def test_the_mapped_variables_are_exactly_the_encoders():
  """Every parameter the Encoder makes comes from the file, in its shape, and nothing more."""
  state_dict = {key: value.numpy() for key, value in _tiny_reference().state_dict().items()}
  mapped = passt.variables_from_state_dict(state_dict, TINY)
  made = jax.eval_shape(passt.Encoder(TINY).init, jax.random.key(0),
                        np.zeros((1, 32000), np.float32))
  shapes = lambda tree: jax.tree_util.tree_map_with_path(
      lambda path, leaf: (jax.tree_util.keystr(path), leaf.shape, leaf.dtype), tree)
  assert shapes(mapped) == shapes(made)
