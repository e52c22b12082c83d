"""ntxr.encoders.cnn14 against panns-inference's Cnn14 (random weights, PANNs' file format).

Tolerance: max abs difference / max abs reference value, at most 1e-5, in float32.
"""

import copy
import functools
import os

import flax.linen as nn
import jax
import librosa
import numpy as np
import pytest
import soundfile
import torch

from ntxr.encoders import references as torch_references

from ntxr.encoders import cnn14

RECORDINGS = os.path.join(os.path.dirname(__file__), "data", "recordings")
TOLERANCE = 1e-5


def _relative(found, expected) -> float:
  found, expected = np.asarray(found, np.float64), np.asarray(expected, np.float64)
  return np.max(np.abs(found - expected)) / np.max(np.abs(expected))


def _recording(name: str, seconds: float) -> np.ndarray:
  """The first `seconds` of a recording, mono, resampled to 32 kHz."""
  audio, rate = soundfile.read(os.path.join(RECORDINGS, name), dtype="float32", always_2d=True)
  audio = librosa.resample(audio.mean(axis=1), orig_sr=rate, target_sr=cnn14.SAMPLE_RATE)
  return audio[:int(seconds * cnn14.SAMPLE_RATE)].astype(np.float32)


def _batch(clips):
  """Clips zero-padded to the longest: waveforms [B, N] and lengths [B]."""
  lengths = np.array([len(clip) for clip in clips])
  waveforms = np.zeros((len(clips), lengths.max()), np.float32)
  for row, clip in enumerate(clips):
    waveforms[row, :len(clip)] = clip
  return waveforms, lengths


@pytest.fixture(scope="module")
def clips():
  # 2 s of a bell and of a xylophone, 1.4 s of a voice.
  return [_recording("alarm clock.ogg", 2.0), _recording("xylofón.mp3", 2.0),
          _recording("front center.wav", 2.0)]


@pytest.fixture(scope="module")
def reference():
  """The reference with random weights and BatchNorm statistics as a trained file has them."""
  torch.manual_seed(0)
  model = torch_references.panns_cnn14()(sample_rate=32000, window_size=1024, hop_size=320,
                                         mel_bins=64, fmin=50, fmax=14000, classes_num=527)
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        first = name == "bn0"  # over log-mel values in dB
        module.running_mean.uniform_(*((-60.0, -20.0) if first else (-0.5, 0.5)))
        module.running_var.uniform_(*((100.0, 400.0) if first else (0.5, 2.0)))
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
        module.num_batches_tracked.fill_(12345)
  return model.eval()


@pytest.fixture(scope="module")
def batch_outputs(reference, clips):
  """The reference's outputs on the clips zero-padded to the longest (see _reference_outputs)."""
  return _reference_outputs(reference, _batch(clips)[0])


@pytest.fixture(scope="module")
def state_dict(reference):
  return {key: value.numpy().copy() for key, value in reference.state_dict().items()}


@pytest.fixture(scope="module")
def loaded(reference, tmp_path_factory):
  path = tmp_path_factory.mktemp("panns") / "Cnn14_mAP=0.431.pth"
  # As PANNs' code (PyTorch 1.0) saved it: torch.save's legacy format.
  torch.save({"model": reference.state_dict()}, path, _use_new_zipfile_serialization=False)
  return cnn14.load(str(path))


def _reference_outputs(reference, waveforms):
  """The reference's log-mel [B, T, 64], frames [B, T', 2048], embedding and clipwise output:
  the frames are conv_block6's output (a forward hook) averaged over frequency, as its
  forward averages them before pooling over time."""
  captured = {}
  hook = reference.conv_block6.register_forward_hook(
      lambda module, inputs, output: captured.setdefault("block6", output))
  try:
    with torch.no_grad():
      inputs = torch.from_numpy(waveforms)
      outputs = reference(inputs)
      log_mel = reference.logmel_extractor(reference.spectrogram_extractor(inputs))
  finally:
    hook.remove()
  frames = captured["block6"].mean(dim=3).transpose(1, 2)
  return (log_mel[:, 0].numpy(), frames.numpy(), outputs["embedding"].numpy(),
          outputs["clipwise_output"].numpy())


def test_mel_filters_and_dft_equal_librosas_and_torchlibrosas(reference):
  librosa_filters = librosa.filters.mel(sr=32000, n_fft=1024, n_mels=64, fmin=50, fmax=14000)
  assert _relative(cnn14.mel_filters(), librosa_filters.T) < TOLERANCE
  real, imag = cnn14.dft_kernels()
  stft = reference.spectrogram_extractor.stft
  assert _relative(real, stft.conv_real.weight[:, 0].numpy().T) < TOLERANCE
  assert _relative(imag, stft.conv_imag.weight[:, 0].numpy().T) < TOLERANCE


def test_front_end_equals_torchlibrosas_on_recordings(batch_outputs, clips):
  waveforms, _ = _batch(clips)
  expected = batch_outputs[0]
  found = np.asarray(jax.jit(cnn14.LogMel().apply)({}, waveforms, np.full(3, waveforms.shape[1])))
  assert found.shape == expected.shape == (3, 1 + waveforms.shape[1] // 320, 64)
  # In power: the mel spectrogram, 10 ** (dB / 10).
  assert _relative(10 ** (found / 10), 10 ** (expected / 10)) < TOLERANCE
  # In dB, where float32 resolves the power: in a band 60 dB or more below the batch's
  # loudest, float32's rounding of the DFT's sums is a large part of the power (each float32
  # implementation is there ~5e-3 dB off a float64 STFT, in its own way).
  resolved = expected > expected.max() - 60.0
  assert _relative(found[resolved], expected[resolved]) < TOLERANCE


def test_loaded_file_equals_the_reference_on_a_padded_batch(batch_outputs, loaded, clips):
  waveforms, _ = _batch(clips)
  _, frames, embedding, clipwise = batch_outputs
  outputs = jax.jit(loaded.module.apply)(loaded.variables, waveforms)
  assert outputs.frames.shape == frames.shape == (3, (1 + waveforms.shape[1] // 320) // 32, 2048)
  assert _relative(outputs.frames, frames) < TOLERANCE
  assert _relative(outputs.embedding, embedding) < TOLERANCE
  assert _relative(outputs.clipwise_output, clipwise) < TOLERANCE
  assert np.all(outputs.frame_mask)
  (embedded_frames, mask), embedded = loaded.embed(waveforms)
  np.testing.assert_allclose(embedded_frames, outputs.frames, rtol=0, atol=1e-6)
  np.testing.assert_allclose(embedded, outputs.embedding, rtol=0, atol=1e-6)
  assert np.all(mask)


def test_with_lengths_each_clip_equals_its_own_unpadded_run(reference, batch_outputs, loaded,
                                                            clips):
  """In the reference, padding a clip changes it: its STFT reflects at the batch's end, not
  its own; the padding's -100 dB frames reach its last frames through the convolutions
  (BatchNorm in inference does not mix clips) and its time pooling takes in the padding's
  frames. Given lengths, ntxr computes each clip as the reference does it alone. A clip
  shorter than MIN_SAMPLES (0.31 s), which the reference cannot embed, is embedded as
  the reference embeds it zero-padded to MIN_SAMPLES."""
  short = _recording("glass of water.wav", 0.2)
  waveforms, lengths = _batch(clips + [short])
  (frames, mask), embedding = loaded.embed(waveforms, lengths)
  clipwise = jax.jit(loaded.module.apply)(loaded.variables, waveforms, lengths).clipwise_output
  padded_short = np.pad(short, (0, cnn14.MIN_SAMPLES - len(short)))
  own_embeddings = []
  for row, clip in enumerate(clips + [padded_short]):
    _, own_frames, own_embedding, own_clipwise = _reference_outputs(reference, clip[None])
    own_embeddings.append(own_embedding[0])
    count = own_frames.shape[1]
    assert count == cnn14.output_frames(len(clip))
    np.testing.assert_array_equal(mask[row], np.arange(frames.shape[1]) < count)
    assert _relative(frames[row, :count], own_frames[0]) < TOLERANCE
    assert np.all(np.asarray(frames[row, count:]) == 0)
    assert _relative(embedding[row], own_embedding[0]) < TOLERANCE
    assert _relative(clipwise[row], own_clipwise[0]) < TOLERANCE
  voice = 2  # the shortest recording: the reference's padded batch changes it
  assert _relative(batch_outputs[2][voice], own_embeddings[voice]) > 100 * TOLERANCE


def test_training_uses_batch_statistics_and_updates_running_ones_as_pytorch(reference,
                                                                           state_dict, clips):
  """BatchNorm in training mode, dropout 0 on both sides. Batch statistics magnify the front
  end's float32 rounding in quiet bands (bn0 divides by a band's spread over the batch, not
  by a trained one): the reference's frames move by 4e-5 when fed ntxr's log-mel in place
  of its own. So both networks take the reference's log-mel here, and the expectation is the
  reference run in float64 (its own float32 run is 3e-6 from that here, 9e-6 on 3 s clips)."""
  waveforms, _ = _batch(clips)
  reference = copy.deepcopy(reference)  # in inference mode: no dropout, no SpecAugment
  with torch.no_grad():
    log_mel = reference.logmel_extractor(reference.spectrogram_extractor(
        torch.from_numpy(waveforms)))
  reference.double()
  for module in reference.modules():
    if isinstance(module, torch.nn.BatchNorm2d):
      module.train()
  hook = reference.logmel_extractor.register_forward_hook(
      lambda module, inputs, output: log_mel.double())
  _, frames, embedding, clipwise = _reference_outputs(reference, waveforms.astype(np.float64))
  hook.remove()

  def reference_log_mel(call, args, kwargs, context):
    if isinstance(context.module, cnn14.LogMel):
      return log_mel[:, 0].numpy()
    return call(*args, **kwargs)

  module = cnn14.Cnn14(block_dropout=0.0, clip_dropout=0.0)
  apply = jax.jit(functools.partial(module.apply, train=True, mutable=["batch_stats"]))
  with nn.intercept_methods(reference_log_mel):
    outputs, updated = apply(cnn14.variables_from_state_dict(state_dict), waveforms)
  assert _relative(outputs.frames, frames) < TOLERANCE
  assert _relative(outputs.embedding, embedding) < TOLERANCE
  assert _relative(outputs.clipwise_output, clipwise) < TOLERANCE
  expected = cnn14.variables_from_state_dict(
      {key: value.float().numpy() for key, value in reference.state_dict().items()})
  for path, value in jax.tree_util.tree_leaves_with_path(updated["batch_stats"]):
    wanted = expected["batch_stats"]
    for key in path:
      wanted = wanted[key.key]
    assert _relative(value, wanted) < TOLERANCE, jax.tree_util.keystr(path)


def _error(state_dict) -> str:
  with pytest.raises(ValueError) as error:
    cnn14.variables_from_state_dict(state_dict, "Cnn14_mAP=0.431.pth")
  message = str(error.value)
  assert "\n" not in message and "Cnn14_mAP=0.431.pth" in message
  assert cnn14.PUBLISHED in message
  return message


def test_refuses_unknown_and_missing_keys_and_wrong_shapes(state_dict):
  extra = dict(state_dict, **{"fc_audioset.extra": np.zeros(3, np.float32)})
  assert "fc_audioset.extra" in _error(extra)
  missing = {key: value for key, value in state_dict.items() if key != "conv_block3.bn2.bias"}
  assert "conv_block3.bn2.bias" in _error(missing)
  wrong = dict(state_dict, **{"fc1.weight": np.zeros((2048, 1024), np.float32)})
  message = _error(wrong)
  assert "fc1.weight" in message and "(2048, 1024)" in message and "(2048, 2048)" in message
  other_front_end = dict(state_dict, **{"logmel_extractor.melW": librosa.filters.mel(
      sr=32000, n_fft=1024, n_mels=64, fmin=0, fmax=16000).T})
  assert "logmel_extractor.melW" in _error(other_front_end)


@pytest.mark.parametrize("key", ["spectrogram_extractor.stft.conv_real.weight",
                                 "spectrogram_extractor.stft.conv_imag.weight",
                                 "logmel_extractor.melW"])
def test_refuses_a_front_end_a_thousandth_off(state_dict, key):
  """Each frozen front-end tensor must equal the front end's to 1e-5 of its largest value:
  0.1% more is another front end."""
  assert key in _error(dict(state_dict, **{key: state_dict[key] * 1.001}))
