"""The training-step table: one whole step (CRNN and word encoder forward and backward,
the semihard_cross loss, an Adam update) per CRNN width and batch size, through
`ntxr.steps.train_step` as training runs it; with torch_loop, the same step in
PyTorch structured as the authors' code (their CRNN, their per-anchor loss loop)."""

import functools

import jax
import numpy as np

from ntxr import models, settings, steps
from ntxr.bench import SHAPE, reference, timing


def random_batch(n, frames, words, mel_bands, vocab) -> dict:
  """Random log-mel [n, frames, mel_bands], token ids [n, words], two captions a clip."""
  rng = np.random.default_rng(0)
  return dict(audio=rng.normal(size=(n, frames, mel_bands)).astype(np.float32),
              audio_mask=np.ones((n, frames), bool),
              tokens=rng.integers(2, vocab, size=(n, words)).astype(np.int32),
              token_mask=np.ones((n, words), bool),
              audio_id=(np.arange(n) // 2).astype(np.int32))


def jax_step(channels: tuple, n: int, shape: dict, dtype: str = "float32") -> tuple:
  """(step, state, batch): `steps.train_step` (semihard_cross) jitted with the state
  donated, as training runs it, its first state and a random batch of n on the device."""
  model = models.DualEncoder(vocab_size=shape["vocab"], channels=channels, dtype=dtype)
  state = steps.create_train_state(model, jax.random.PRNGKey(0), frames=shape["frames"],
                                   words=shape["words"], mel_bands=shape["mel_bands"])
  step = jax.jit(functools.partial(steps.train_step, loss=settings.Loss()), donate_argnums=0)
  return step, state, jax.device_put(random_batch(n, **shape))


def jax_seconds(channels: tuple, n: int, shape: dict, repeats: int,
                dtype: str = "float32") -> float:
  """Median seconds of one jitted `steps.train_step`, encoders computing in `dtype`."""
  step, state, batch = jax_step(channels, n, shape, dtype)
  def one_step():  # the state is donated: each call steps from the last one's
    nonlocal state
    state, statistics = step(state, batch, jax.random.PRNGKey(1))
    return statistics
  return timing.time_call(one_step, repeats=repeats)


def torch_seconds(channels: tuple, n: int, shape: dict, repeats: int) -> float:
  """Median seconds of the same step in PyTorch (`timing.torch_device`), as the authors'
  code runs it."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch import nn  # pylint: disable=import-outside-toplevel
  functional = torch.nn.functional
  layers, previous = [], 1
  for width, window in zip(channels, models.PAPER_POOLS):
    layers += [nn.BatchNorm2d(previous), nn.Conv2d(previous, width, 3, padding=1, bias=False),
               nn.LeakyReLU(0.1)]
    layers += [nn.LPPool2d(4, window)] if window else []
    previous = width
  cnn = nn.Sequential(*layers, nn.Dropout(0.3))
  gru = nn.GRU(previous, 150, batch_first=True, bidirectional=True)
  embed = nn.Embedding(shape["vocab"], 300)
  device = timing.torch_device()
  for module in (cnn, gru, embed):
    module.to(device)
  optimizer = torch.optim.Adam([*cnn.parameters(), *gru.parameters(), *embed.parameters()],
                               lr=1e-3)
  batch = random_batch(n, **shape)
  audio = torch.from_numpy(batch["audio"]).to(device)
  tokens = torch.from_numpy(batch["tokens"]).long().to(device)
  ops, rng = reference.torch_ops(), np.random.default_rng(0)

  def step():
    frames = cnn(audio.unsqueeze(1)).flatten(2, 3)          # [N, C, T/4] (frequency is 1)
    frames, _ = gru(frames.transpose(1, 2))
    frames = functional.interpolate(frames.transpose(1, 2), audio.shape[1], mode="linear",
                                    align_corners=False).transpose(1, 2)
    loss = reference.per_anchor_loss(
        ops, functional.normalize(frames, dim=-1), functional.normalize(embed(tokens), dim=-1),
        batch["audio_id"], "semihard_cross", 0.5, rng)[0]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    timing.torch_synchronize(device)

  return timing.time_call(step, repeats=repeats)


def run(widths: dict, batch_sizes, repeats: int, torch_too: bool, shape: dict = None,
        dtype: str = "float32") -> list:
  """One row per CRNN width and batch size: step seconds in JAX computing in `dtype`
  (and in PyTorch, float32)."""
  shape = shape or SHAPE
  return [dict(width=name, channels=list(channels), n=n, dtype=dtype, **shape,
               jax_ms=1e3 * jax_seconds(channels, n, shape, repeats, dtype),
               torch_ms=1e3 * torch_seconds(channels, n, shape, repeats) if torch_too
               else None)
          for name, channels in widths.items() for n in batch_sizes]


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  return timing.markdown_table(
      [("CRNN width", "width", ""), ("channels", lambda r: tuple(r["channels"]), ""),
       ("N", "n", ""), ("frames", "frames", ""), ("JAX dtype", "dtype", ""),
       ("JAX step ms", "jax_ms", ".0f"), ("PyTorch step ms", "torch_ms", ".0f"),
       ("JAX steps/s", lambda r: 1e3 / r["jax_ms"], ".2f")], rows)
