"""Benchmark of the sampling kernels (JAX and NumPy only).

  python -m ntxr.bench                          # CPU grid, table on stdout
  python -m ntxr.bench --grid=accelerator --device_kind=H100 --json=bench.json

For each strategy and shape (N pairs, T frames, W words, E dims) it times, with
warm-up excluded and `block_until_ready`:
  kernel  the compiled forward+backward of `triplet_loss_from_embeddings`;
  loop    the same loss as the authors' PyTorch code computes it: a Python loop over
          anchors, each scoring its pool and picking a negative, differentiated
          eagerly (no jit) in JAX, and with --torch_loop in PyTorch too; skipped
          above --loop_max_n;
  matmul  one plain matrix product with the kernel's FLOPs, so `matmul frac` is
          the share of plain-matmul throughput the kernel reaches.
A second table times the score matrices alone (cross, and symmetric audio-audio)
with the scratch memory XLA allots them.

  python -m ntxr.bench --encoder [--torch_loop]

times instead one whole training step (CRNN and text encoder forward and backward,
the semihard_cross loss, an Adam update) at the paper's width and the narrower ones,
and with --torch_loop the same step in PyTorch with the authors' structure (their CRNN,
their per-anchor loss loop).
"""

import argparse
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import models, sampling, scores

GRIDS = {
    # (N, T, W, E) for the loss table; (kind, N, T, W, E) for the score table.
    "cpu": dict(
        loss=[(32, 250, 12, 300), (32, 500, 15, 300), (64, 250, 12, 300)],
        scores=[("cross", 64, 250, 12, 300), ("audio-audio", 32, 500, 500, 300)]),
    "accelerator": dict(
        loss=[(32, 250, 12, 300), (32, 500, 15, 300), (32, 1500, 20, 300),
              (128, 500, 20, 300), (256, 500, 20, 300), (1024, 250, 12, 300)],
        scores=[("cross", 256, 500, 20, 300), ("audio-audio", 256, 1500, 1500, 300)]),
}


def time_call(fn: Callable, *args, repeats: int) -> float:
  """Median seconds of fn(*args) over `repeats` calls after one warm-up call."""
  jax.block_until_ready(fn(*args))
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def kernel_flops(strategy: str, n: int, t: int, w: int, e: int) -> float:
  """Matmul FLOPs of one forward+backward of `triplet_loss_from_embeddings`."""
  pair = 2.0 * t * w * e
  selected = 9 * n * pair  # 3N pairs forward, their two gradient products backward
  needs = sampling.get_strategy(strategy).needs
  if strategy == "full_batch":
    return 3 * n * n * pair
  if needs == "cross":
    return n * n * pair + selected
  if needs in ("audio", "text"):
    length = t if needs == "audio" else w
    return n * (n + 1) / 2 * 2.0 * length * length * e + selected
  return selected


def matmul_seconds(flops: float, e: int, dtype, repeats: int) -> float:
  """Seconds of a plain batched [R, E] x [E, R] product with about `flops` FLOPs."""
  rows = int(min(4096, max(64, np.sqrt(flops / (2 * e)))))
  batch = max(1, round(flops / (2 * e * rows * rows)))
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (batch, rows, e), dtype)
  b = jax.random.normal(key_b, (batch, e, rows), dtype)
  seconds = time_call(jax.jit(jnp.matmul), a, b, repeats=repeats)
  return seconds * flops / (2.0 * e * rows * rows * batch)


@dataclasses.dataclass(frozen=True)
class ArrayOps:
  """The few array operations the per-anchor loop needs, for one framework."""
  relu: Callable
  mean_last_two: Callable
  transpose_last_two: Callable
  index: Callable  # list of ints -> index array
  argmin: Callable
  argmax: Callable


JAX_OPS = ArrayOps(relu=jax.nn.relu, mean_last_two=lambda x: x.mean(axis=(-2, -1)),
                   transpose_last_two=lambda x: jnp.swapaxes(x, -1, -2),
                   index=jnp.asarray, argmin=jnp.argmin, argmax=jnp.argmax)


def torch_ops() -> ArrayOps:
  """ArrayOps for PyTorch, imported only when asked for."""
  import torch  # pylint: disable=import-outside-toplevel
  return ArrayOps(relu=torch.relu, mean_last_two=lambda x: x.mean(dim=(-2, -1)),
                  transpose_last_two=lambda x: x.transpose(-2, -1),
                  index=torch.tensor, argmin=torch.argmin, argmax=torch.argmax)


def loop_loss(ops: ArrayOps, audio, text, audio_ids: np.ndarray, strategy: str,
              margin: float, rng: np.random.Generator):
  """The triplet loss one anchor at a time, as the authors' PyTorch criterion does.

  Each anchor scores its own pool (relu(x @ y^T) averaged over both axes, padding
  included) and picks its negative; the loss is differentiated eagerly.
  """
  score = lambda x, y: ops.mean_last_two(ops.relu(x @ ops.transpose_last_two(y)))
  n = audio.shape[0]
  loss = 0.0
  for i in range(n):
    audio_i, text_i = audio[i], text[i]
    positive = score(audio_i, text_i)
    pool = [j for j in range(n) if audio_ids[j] != audio_ids[i]]
    if not pool:
      continue
    pool_index = ops.index(pool)
    if strategy == "random":
      audio_neg = score(audio[int(rng.choice(pool))], text_i)
      text_neg = score(audio_i, text[int(rng.choice(pool))])
    elif strategy in ("full_batch", "semihard_cross", "hard_cross"):
      audio_neg = score(audio[pool_index], text_i)
      text_neg = score(audio_i, text[pool_index])
      if strategy == "semihard_cross":
        audio_neg = audio_neg[ops.argmin(abs(audio_neg - positive))]
        text_neg = text_neg[ops.argmin(abs(text_neg - positive))]
      elif strategy == "hard_cross":
        audio_neg, text_neg = audio_neg.max(), text_neg.max()
    else:
      within = (score(text_i, text[pool_index]) if strategy.endswith("text")
                else score(audio_i, audio[pool_index]))
      pick = ops.argmin if strategy.startswith("easy") else ops.argmax
      j = pool_index[pick(within)]
      audio_neg, text_neg = score(audio[j], text_i), score(audio_i, text[j])
    loss = loss + (ops.relu(audio_neg - positive + margin).mean()
                   + ops.relu(text_neg - positive + margin).mean())
  return loss / n


def torch_loop_seconds(audio, text, audio_ids, strategy: str, repeats: int) -> float:
  """Median seconds of the loop's forward+backward in PyTorch on the CPU."""
  import torch  # pylint: disable=import-outside-toplevel
  ops, rng = torch_ops(), np.random.default_rng(0)
  leaves = [torch.tensor(np.asarray(x, np.float32), requires_grad=True)
            for x in (audio, text)]
  def step():
    loss = loop_loss(ops, *leaves, audio_ids, strategy, 0.5, rng)
    loss.backward()
    return float(loss)
  return time_call(step, repeats=repeats)


def inputs(n: int, t: int, w: int, e: int, dtype):
  """Random L2-normalised embeddings and Clotho-like clip ids (a few repeats)."""
  key_a, key_t = jax.random.split(jax.random.PRNGKey(n * 7 + t))
  normalise = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
  audio = normalise(jax.random.normal(key_a, (n, t, e)))
  text = normalise(jax.random.normal(key_t, (n, w, e)))
  audio_ids = np.random.default_rng(n).integers(0, 2 * n, size=n).astype(np.int32)
  return audio, text, audio_ids


def bench_loss(strategy: str, shape: tuple, dtype, repeats: int, loop_max_n: int,
               torch_loop: bool) -> dict:
  """One row of the loss table."""
  n, t, w, e = shape
  audio, text, audio_ids = inputs(n, t, w, e, dtype)
  ids = jnp.asarray(audio_ids)
  kernel = jax.jit(jax.value_and_grad(
      lambda a, x, key: sampling.triplet_loss_from_embeddings(
          a, x, ids, strategy=strategy, key=key), argnums=(0, 1)))
  kernel_s = time_call(kernel, audio, text, jax.random.PRNGKey(0), repeats=repeats)
  flops = kernel_flops(strategy, n, t, w, e)
  row = dict(strategy=strategy, N=n, T=t, W=w, E=e, dtype=jnp.dtype(dtype).name,
             kernel_ms=1e3 * kernel_s, gflops=flops / kernel_s / 1e9,
             matmul_fraction=matmul_seconds(flops, e, dtype, repeats) / kernel_s,
             loop_ms=None, speedup=None, torch_loop_ms=None, torch_speedup=None)
  if n > loop_max_n:
    return row
  rng = np.random.default_rng(0)
  loop = jax.value_and_grad(
      lambda a, x: loop_loss(JAX_OPS, a, x, audio_ids, strategy, 0.5, rng), argnums=(0, 1))
  loop_s = time_call(loop, audio, text, repeats=max(1, repeats // 3))
  row.update(loop_ms=1e3 * loop_s, speedup=loop_s / kernel_s)
  if torch_loop:
    torch_s = torch_loop_seconds(audio, text, audio_ids, strategy, max(1, repeats // 3))
    row.update(torch_loop_ms=1e3 * torch_s, torch_speedup=torch_s / kernel_s)
  return row


def bench_scores(kind: str, shape: tuple, dtype, repeats: int) -> dict:
  """One row of the score table: forward time, matmul fraction, XLA scratch memory."""
  n, t, w, e = shape
  audio, text, _ = inputs(n, t, w, e, dtype)
  if kind == "cross":
    fn, args, flops = scores.alignment_scores, (audio, text), 2.0 * n * n * t * w * e
  else:
    fn, args, flops = scores.symmetric_alignment_scores, (audio,), n * (n + 1.0) * t * t * e
  compiled = jax.jit(fn).lower(*args).compile()
  seconds = time_call(compiled, *args, repeats=repeats)
  stats = jax.devices()[0].memory_stats() or {}
  return dict(kind=kind, N=n, T=t, W=w, E=e, dtype=jnp.dtype(dtype).name,
              ms=1e3 * seconds, gflops=flops / seconds / 1e9,
              matmul_fraction=matmul_seconds(flops, e, dtype, repeats) / seconds,
              scratch_mib=compiled.memory_analysis().temp_size_in_bytes / 2**20,
              device_peak_mib=stats.get("peak_bytes_in_use", 0) / 2**20 or None)


def _cell(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def format_tables(loss_rows: list, score_rows: list, device: str) -> str:
  """Markdown tables of both benchmarks."""
  lines = [f"device: {device}", "",
           "| strategy | N | T | W | E | kernel ms | JAX loop ms | speedup | torch loop ms |"
           " speedup | GFLOP/s | matmul frac |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in loss_rows:
    lines.append(
        f"| {r['strategy']} | {r['N']} | {r['T']} | {r['W']} | {r['E']} | "
        f"{r['kernel_ms']:.2f} | {_cell(r['loop_ms'], '.1f')} | {_cell(r['speedup'], '.1f')} | "
        f"{_cell(r['torch_loop_ms'], '.1f')} | {_cell(r['torch_speedup'], '.1f')} | "
        f"{r['gflops']:.1f} | {r['matmul_fraction']:.2f} |")
  lines += ["", "| scores | N | T | W | E | ms | GFLOP/s | matmul frac | XLA scratch MiB |"
            " device peak MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
  for r in score_rows:
    lines.append(
        f"| {r['kind']} | {r['N']} | {r['T']} | {r['W']} | {r['E']} | {r['ms']:.1f} | "
        f"{r['gflops']:.1f} | {r['matmul_fraction']:.2f} | {r['scratch_mib']:.0f} | "
        f"{_cell(r['device_peak_mib'], '.0f')} |")
  return "\n".join(lines)


ENCODER_WIDTHS = {"paper": models.PAPER_CHANNELS, "half": (16, 64, 64, 64, 64),
                  "default": (8, 32, 32, 32, 32)}
ENCODER_SHAPE = dict(n=32, frames=320, words=12, mel_bands=64, vocab=1000)


def _encoder_batch(n, frames, words, mel_bands, vocab) -> tuple:
  """Random log-mel [n, frames, mel_bands], token ids [n, words], two captions a clip."""
  rng = np.random.default_rng(0)
  return (rng.normal(size=(n, frames, mel_bands)).astype(np.float32),
          rng.integers(2, vocab, size=(n, words)).astype(np.int32),
          (np.arange(n) // 2).astype(np.int32))


def jax_train_step_seconds(channels: tuple, repeats: int) -> float:
  """Median seconds of one jitted training step of the dual encoder."""
  import optax  # pylint: disable=import-outside-toplevel
  audio, tokens, audio_ids = _encoder_batch(**ENCODER_SHAPE)
  batch = jax.tree.map(jnp.asarray, dict(
      audio=audio, audio_mask=np.ones(audio.shape[:2], bool), tokens=tokens,
      token_mask=np.ones(tokens.shape, bool)))
  audio_ids = jnp.asarray(audio_ids)
  model = models.DualEncoder(vocab_size=ENCODER_SHAPE["vocab"], channels=channels)
  variables = model.init(jax.random.PRNGKey(0), batch)
  optimizer = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state, batch_stats):
    def loss_fn(p):
      (a, t), updates = model.apply(
          {"params": p, "batch_stats": batch_stats}, batch, train=True,
          mutable=["batch_stats"], rngs={"dropout": jax.random.PRNGKey(1)})
      return sampling.triplet_loss_from_embeddings(
          a, t, audio_ids, strategy="semihard_cross", audio_mask=batch["audio_mask"],
          text_mask=batch["token_mask"]), updates["batch_stats"]
    (_, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, batch_stats

  params = variables["params"]
  return time_call(step, params, optimizer.init(params), variables["batch_stats"],
                   repeats=repeats)


def torch_train_step_seconds(channels: tuple, repeats: int) -> float:
  """Median seconds of the same step in PyTorch, structured as the authors' code."""
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
  embed = nn.Embedding(ENCODER_SHAPE["vocab"], 300)
  optimizer = torch.optim.Adam([*cnn.parameters(), *gru.parameters(), *embed.parameters()],
                               lr=1e-3)
  audio, tokens, audio_ids = _encoder_batch(**ENCODER_SHAPE)
  audio, tokens = torch.from_numpy(audio), torch.from_numpy(tokens).long()
  ops, rng = torch_ops(), np.random.default_rng(0)

  def step():
    frames = cnn(audio.unsqueeze(1)).flatten(2, 3)          # [N, C, T/4] (frequency is 1)
    frames, _ = gru(frames.transpose(1, 2))
    frames = functional.interpolate(frames.transpose(1, 2), audio.shape[1], mode="linear",
                                    align_corners=False).transpose(1, 2)
    loss = loop_loss(ops, functional.normalize(frames, dim=-1),
                     functional.normalize(embed(tokens), dim=-1), audio_ids,
                     "semihard_cross", 0.5, rng)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  step()
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    step()
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds)


def bench_encoders(repeats: int, torch_too: bool) -> list:
  """One row per CRNN width: training-step seconds in JAX (and PyTorch)."""
  return [dict(width=name, channels=list(channels), **ENCODER_SHAPE,
               jax_ms=1e3 * jax_train_step_seconds(channels, repeats),
               torch_ms=1e3 * torch_train_step_seconds(channels, repeats) if torch_too
               else None)
          for name, channels in ENCODER_WIDTHS.items()]


def format_encoder_table(rows: list, device: str) -> str:
  lines = [f"device: {device}", "",
           "| CRNN width | channels | N | frames | JAX step ms | PyTorch step ms | "
           "JAX steps/s |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['width']} | {tuple(r['channels'])} | {r['n']} | {r['frames']} | "
                 f"{r['jax_ms']:.0f} | {_cell(r['torch_ms'], '.0f')} | "
                 f"{1e3 / r['jax_ms']:.2f} |")
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m ntxr.bench", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--grid", choices=sorted(GRIDS), default="cpu",
                      help="shape grid: 'cpu' fits 2 cores; 'accelerator' is paper scale")
  parser.add_argument("--shapes", default=None,
                      help="loss shapes N:T:W:E,... instead of the grid's")
  parser.add_argument("--strategies", default=",".join(sampling.STRATEGIES),
                      help="comma-separated strategy names")
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--repeats", type=int, default=10, help="timed calls per kernel")
  parser.add_argument("--loop_max_n", type=int, default=64,
                      help="largest N at which the per-anchor loop is timed")
  parser.add_argument("--torch_loop", action="store_true",
                      help="also time the loop in PyTorch (CPU), as the authors ran it")
  parser.add_argument("--skip_scores", action="store_true", help="omit the score table")
  parser.add_argument("--encoder", action="store_true",
                      help="time whole training steps per CRNN width instead of the kernels")
  parser.add_argument("--device_kind", default=None,
                      help="device name for the output (default: JAX's device_kind)")
  parser.add_argument("--json", default=None, help="write all rows to this JSON file")
  return parser.parse_args(argv)


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  grid = GRIDS[args.grid]
  loss_shapes = ([tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
                 if args.shapes else grid["loss"])
  strategies = [sampling.get_strategy(s).name for s in args.strategies.split(",")]
  dtype = jnp.dtype(args.dtype)
  device = args.device_kind or f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
  if args.encoder:
    rows = bench_encoders(args.repeats, args.torch_loop)
    print(format_encoder_table(rows, device))
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(device=device, jax=jax.__version__, encoder=rows), f, indent=1)
    return
  loss_rows = []
  for shape in loss_shapes:
    for strategy in strategies:
      loss_rows.append(bench_loss(strategy, shape, dtype, args.repeats, args.loop_max_n,
                                  args.torch_loop))
      print(json.dumps(loss_rows[-1]), file=sys.stderr, flush=True)
  score_rows = [] if args.skip_scores else [
      bench_scores(kind, shape, dtype, args.repeats) for kind, *shape in grid["scores"]]
  print(format_tables(loss_rows, score_rows, device))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=device, jax=jax.__version__, argv=sys.argv[1:] if argv is None
                     else argv, loss=loss_rows, scores=score_rows), f, indent=1)


if __name__ == "__main__":
  main()
