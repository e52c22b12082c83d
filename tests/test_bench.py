"""The benchmark's baseline computes the same loss, and its command runs."""

import json

import jax
import numpy as np
import pytest

from ntxr import bench, sampling


@pytest.mark.parametrize("strategy", [s for s in sampling.STRATEGIES if s != "random"])
def test_loop_baseline_computes_the_kernel_loss(strategy):
  audio, text, audio_ids = bench.inputs(12, 9, 4, 8, np.float32)
  audio_ids[3] = audio_ids[2]  # at least one clip with two captions
  loop = bench.loop_loss(bench.JAX_OPS, audio, text, audio_ids, strategy, 0.5,
                         np.random.default_rng(0))
  kernel = sampling.triplet_loss_from_embeddings(audio, text, jax.numpy.asarray(audio_ids),
                                                 strategy=strategy)
  np.testing.assert_allclose(loop, kernel, rtol=1e-5)


def test_kernel_flops_count_the_selected_pairs():
  pair = 2 * 5 * 3 * 7
  assert bench.kernel_flops("random", 4, 5, 3, 7) == 9 * 4 * pair
  assert bench.kernel_flops("full_batch", 4, 5, 3, 7) == 3 * 16 * pair
  assert bench.kernel_flops("hard_audio", 4, 5, 3, 7) == 10 * 2 * 5 * 5 * 7 + 9 * 4 * pair


def test_command_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  bench.main(["--shapes=4:6:3:8", "--strategies=random,hard_text", "--repeats=1",
              "--device_kind=test-cpu", f"--json={out}"])
  result = json.loads(out.read_text())
  assert result["device"] == "test-cpu"
  assert [r["strategy"] for r in result["loss"]] == ["random", "hard_text"]
  assert all(r["kernel_ms"] > 0 and r["speedup"] > 0 for r in result["loss"])
  assert {r["kind"] for r in result["scores"]} == {"cross", "audio-audio"}
  assert "| hard_text | 4 | 6 | 3 | 8 |" in capsys.readouterr().out


def test_encoder_command_times_each_width(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(bench, "ENCODER_WIDTHS", {"narrow": (2, 4, 4, 4, 4)})
  monkeypatch.setattr(bench, "ENCODER_SHAPE",
                      dict(n=4, frames=8, words=3, mel_bands=64, vocab=10))
  out = tmp_path / "encoder.json"
  bench.main(["--encoder", "--repeats=1", "--device_kind=test-cpu", f"--json={out}"])
  rows = json.loads(out.read_text())["encoder"]
  assert [(r["width"], r["channels"], r["n"], r["frames"]) for r in rows] == [
      ("narrow", [2, 4, 4, 4, 4], 4, 8)]
  assert rows[0]["jax_ms"] > 0 and rows[0]["torch_ms"] is None
  assert "| narrow | (2, 4, 4, 4, 4) | 4 | 8 |" in capsys.readouterr().out
