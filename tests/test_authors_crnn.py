"""The paper's CRNN against the authors' encoder (xieh97/contrastive-negative-sampling's
models/audio_encoders.py, MIT licence, in tests/authors as published): the same weights
give the same frame embeddings on a real recording's log-mel, the paper's way (44.1 kHz,
their log-mel settings, a length that LP-pooling floors)."""

import importlib
import os
import sys

import jax
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import recordings
from ntxr import models, settings
from ntxr.data import features

AUTHORS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "authors")
PAPER_LOGMEL = settings.Features(sample_rate=44100, n_fft=2048, f_min=12.0, f_max=8000.0,
                                 log_offset=2.220446049250313e-16)


def authors_crnn() -> nn.Module:
  """The authors' CRNNEncoder (tests/authors: their models/audio_encoders.py, unchanged),
  built as their conf.yaml builds it: 64 mel bands, 300 dimensions, linear up-sampling.
  Their code imports its package as `models`, found in tests/authors for the import."""
  sys.path.insert(0, AUTHORS)
  try:
    audio_encoders = importlib.import_module("models.audio_encoders")
  finally:
    sys.path.remove(AUTHORS)
  return audio_encoders.CRNNEncoder(in_dim=64, out_dim=300, up_sampling="linear")


def _randomised(net: nn.Module) -> nn.Module:
  """Random weights, and BatchNorm statistics and affine terms away from 0 and 1."""
  torch.manual_seed(0)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, nn.BatchNorm2d):
        module.running_mean.uniform_(-2.0, 2.0)
        module.running_var.uniform_(0.5, 4.0)
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
      elif isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight)
  return net.eval()


def _ntxr_variables(net: nn.Module) -> dict:
  """The authors' weights as ntxr's CRNN variables: BatchNorm and convolutions in order,
  each GRU direction's input and hidden biases of the reset and update gates summed (a
  Flax GRUCell has one)."""
  numpy = lambda t: t.detach().numpy().astype(np.float32)
  params, stats = {}, {}
  norms = [m for m in net.cnn if isinstance(m, nn.BatchNorm2d)]
  convs = [m for m in net.cnn if isinstance(m, nn.Conv2d)]
  for i, (norm, conv) in enumerate(zip(norms, convs)):
    params[f"BatchNorm_{i}"] = dict(scale=numpy(norm.weight), bias=numpy(norm.bias))
    stats[f"BatchNorm_{i}"] = dict(mean=numpy(norm.running_mean), var=numpy(norm.running_var))
    params[f"Conv_{i}"] = dict(kernel=numpy(conv.weight).transpose(2, 3, 1, 0))  # OIHW -> HWIO
  for cell, suffix in (("GRUCell_0", ""), ("GRUCell_1", "_reverse")):
    w_ih, w_hh, b_ih, b_hh = (np.split(numpy(getattr(net.gru, f"{name}_l0{suffix}")), 3)
                              for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    params[cell] = {
        "ir": dict(kernel=w_ih[0].T, bias=b_ih[0] + b_hh[0]), "hr": dict(kernel=w_hh[0].T),
        "iz": dict(kernel=w_ih[1].T, bias=b_ih[1] + b_hh[1]), "hz": dict(kernel=w_hh[1].T),
        "in": dict(kernel=w_ih[2].T, bias=b_ih[2]), "hn": dict(kernel=w_hh[2].T, bias=b_hh[2])}
  return {"params": params, "batch_stats": stats}


def test_the_papers_crnn_equals_the_authors_encoder_with_their_weights():
  audio = features.decode_audio(os.path.join(recordings.RECORDINGS, "alarm clock.ogg"), 44100)
  logmel = features.log_mel(audio, PAPER_LOGMEL)[None]  # [1, 307, 64]: not 4k frames
  assert logmel.shape[1] % 4
  net = _randomised(authors_crnn())
  with torch.no_grad():
    expected = F.normalize(net(torch.from_numpy(logmel)), dim=-1).numpy()
  crnn = models.CRNN(embed_dim=300, pool_remainder="drop", initializer="pytorch")
  mask = np.ones(logmel.shape[:2], bool)
  with jax.default_matmul_precision("highest"):
    got = crnn.apply(_ntxr_variables(net), logmel, mask, train=False)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=2e-6)


def test_the_construction_pass_moves_batch_norm_as_the_authors_encoder_does():
  """--config.batch_norm_pass: the authors' CRNNEncoder runs its CNN in training mode on
  one random normal clip of 500 frames when it is built. Given ntxr's initial CRNN and
  that same clip, their BatchNorm layers end with the running statistics ntxr's end with
  (ntxr's variance of n values biased where theirs is unbiased: n / (n - 1) apart, n at
  least 500 here, so within 1e-3 once the momentum weighs it)."""
  from ntxr import steps  # pylint: disable=import-outside-toplevel
  model = models.DualEncoder(vocab_size=4, embed_dim=300, channels=models.PAPER_CHANNELS,
                             initializer="pytorch", pool_remainder="drop")
  key = jax.random.key(3)
  moved = steps.create_train_state(model, key, frames=64, words=3, mel_bands=64,
                                   batch_norm_pass=True)
  initial = steps.create_train_state(model, key, frames=64, words=3, mel_bands=64)
  net = authors_crnn()  # its own pass moved its statistics: they start afresh below
  params = jax.device_get(initial.params["audio"])
  norms = [m for m in net.cnn if isinstance(m, nn.BatchNorm2d)]
  convs = [m for m in net.cnn if isinstance(m, nn.Conv2d)]
  with torch.no_grad():
    for i, (norm, conv) in enumerate(zip(norms, convs)):
      norm.reset_running_stats()
      norm.weight.copy_(torch.from_numpy(np.array(params[f"BatchNorm_{i}"]["scale"])))
      norm.bias.copy_(torch.from_numpy(np.array(params[f"BatchNorm_{i}"]["bias"])))
      conv.weight.copy_(torch.from_numpy(
          np.array(params[f"Conv_{i}"]["kernel"]).transpose(3, 2, 0, 1)))  # HWIO -> OIHW
    clip = jax.random.normal(jax.random.fold_in(key, 1),
                             (1, steps.BATCH_NORM_PASS_FRAMES, 64))  # the pass's clip
    net.train()(torch.from_numpy(np.array(clip)))
  for i, norm in enumerate(norms):
    stats = jax.device_get(moved.batch_stats["audio"][f"BatchNorm_{i}"])
    np.testing.assert_allclose(stats["mean"], norm.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], norm.running_var.numpy(), rtol=1e-3)
    assert not np.allclose(stats["var"], 1.0)  # moved from the initial 1


def test_the_crnns_convolutions_take_their_own_precision():
  """--config.conv_precision=default: the convolutions at the backend's default (TF32 on
  Ampere and Hopper GPUs, as the authors' PyTorch 1.13) under full-float32 products."""
  crnn = models.CRNN(channels=(2, 2, 2, 2, 2), embed_dim=4, conv_precision="default")
  audio, mask = np.zeros((1, 8, 64), np.float32), np.ones((1, 8), bool)
  variables = crnn.init(jax.random.key(0), audio, mask, train=False)
  with jax.default_matmul_precision("highest"):
    jaxpr = jax.make_jaxpr(lambda v: crnn.apply(v, audio, mask, train=False))(variables)
  convolutions = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convolutions) == 5
  assert all(str(e.params["precision"]) in ("DEFAULT", "Precision.DEFAULT",
                                            "(Precision.DEFAULT, Precision.DEFAULT)")
             for e in convolutions), [e.params["precision"] for e in convolutions]
