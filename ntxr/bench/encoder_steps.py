"""The encoders table: one training step of a pretrained encoder pair in JAX (`ntxr.encoders`)
against the same step in PyTorch with the publishers' classes (panns-inference's Cnn14,
hear21passt's PaSST, transformers' BertModel / RobertaModel), same weights, same batch.

The step: both encoders forward on waveforms [B, N] at 32 kHz and token ids [B, W]; a
linear head each from the clip output (CNN14's `embedding`, PaSST's features) and the
sentence output (the first token's last hidden state) to a shared EMBEDDING; the symmetric
InfoNCE of their cosines (`objectives.infonce`, clip i's caption is sentence i); gradients
and an Adam update. Training mode without its random parts, which no two frameworks draw
alike: BatchNorm normalises by the batch, dropout, SpecAugment and patchout are off. On a
GPU both take float32 products in TF32 (XLA's default precision; PyTorch's set to match).
The weights are the PyTorch modules' random ones, converted by the encoders' own
`variables_from_state_dict`; each row carries both first losses.
"""

import gc
import math
import warnings
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntxr import objectives, parallel, scores, steps
from ntxr.bench import ENCODER_PAIRS, timing
from ntxr.encoders import bert, cnn14, passt, references

EMBEDDING = 1024  # the shared embedding's width
TEMPERATURE = 0.05
LEARNING_RATE = 1e-4
_TINY_TEXT = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
_ROBERTA_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1,
                      layer_norm_eps=1e-5)
# Each encoder's sizes by name (CNN14 has one size): "tiny" fits 2 CPU cores, "published"
# is PaSST-S, BERT-base and RoBERTa-large.
SIZES = {"tiny": dict(passt=passt.Size(64, 2, 4), bert=_TINY_TEXT, roberta=_TINY_TEXT),
         "published": dict(passt=passt.VARIANTS["S"], bert={}, roberta=_ROBERTA_LARGE)}
# The reference's warnings on every call (PaSST's input shorter than 10 s, its front end's
# deprecated torch calls).
_REFERENCE_WARNINGS = ("Input image size", "stft with return_complex=False",
                       "`torch.cuda.amp.autocast")


def text_config(name: str, sizes: str) -> dict:
  """config.json's values (`bert.read_config`'s) of text encoder `name` at `sizes`, without
  dropout."""
  return dict(bert.CONFIG_DEFAULTS[name], **SIZES[sizes][name], model_type=name,
              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Pair(nn.Module):
  """An audio and a text encoder in training mode, each with a linear head to EMBEDDING:
  (waveforms [B, N], token ids [B, W], mask [B, W]) -> (clips [B, E], sentences [B, E])."""
  audio: nn.Module
  text: nn.Module

  @nn.compact
  def __call__(self, waveforms, token_ids, mask):
    outputs = self.audio(waveforms, train=True)
    clips = outputs.embedding if isinstance(outputs, cnn14.Outputs) else outputs.clip
    words, _ = self.text(token_ids, mask, train=True)
    sentences = bert.pool_sentences(words, mask, "cls")
    return (nn.Dense(EMBEDDING, name="audio_head")(clips),
            nn.Dense(EMBEDDING, name="text_head")(sentences))


def train_step(state: steps.TrainState, batch: dict) -> tuple:
  """One Adam step on the symmetric InfoNCE of the Pair's cosines [B, B]: (state, batch of
  waveforms [B, N], token_ids [B, W], mask [B, W]) -> (state, loss). Jit it with
  donate_argnums=0."""
  def loss_fn(params):
    (clips, sentences), updates = state.apply_fn(
        state.variables(params), batch["waveforms"], batch["token_ids"], batch["mask"],
        mutable=["batch_stats"])
    s_cross = scores.unit_vectors(clips) @ scores.unit_vectors(sentences).T
    loss = objectives.infonce(s_cross, jnp.arange(s_cross.shape[0]), temperature=TEMPERATURE)
    return loss, updates.get("batch_stats", state.batch_stats)
  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads, batch_stats=batch_stats), loss


def random_batch(batch: int, samples: int, words: int, vocab: int) -> dict:
  """Waveforms [batch, samples] float32 and token ids [batch, words] int32 (none of them a
  padding or the first special ids), all valid."""
  rng = np.random.default_rng(0)
  return dict(waveforms=rng.uniform(-0.5, 0.5, (batch, samples)).astype(np.float32),
              token_ids=rng.integers(3, vocab, (batch, words)).astype(np.int32),
              mask=np.ones((batch, words), bool))


def reference_modules(pair: str, sizes: str) -> dict:
  """The publishers' modules of `pair` at `sizes`, PyTorch's random weights from seed 0,
  on the CPU: {"audio", "text", "audio_head", "text_head"} (PaSST's with its front end as
  "mel"), each in the mode the step trains in (see the module docstring)."""
  import torch  # pylint: disable=import-outside-toplevel
  audio, text = ENCODER_PAIRS[pair]
  torch.manual_seed(0)
  modules = {}
  if audio == "cnn14":
    modules["audio"] = references.panns_cnn14()(
        sample_rate=cnn14.SAMPLE_RATE, window_size=cnn14.WINDOW, hop_size=cnn14.HOP,
        mel_bins=cnn14.MEL_BINS, fmin=cnn14.FMIN, fmax=cnn14.FMAX, classes_num=cnn14.CLASSES)
    modules["audio"].train()
    modules["audio"].training = False  # dropout and SpecAugment off, its BatchNorms training
    audio_width = cnn14.EMBEDDING
  else:
    hear21passt = references.hear21passt()
    hear21passt.reference.first_RUN = False  # else its first forward prints every shape
    size = SIZES[sizes]["passt"]
    modules["audio"] = hear21passt.reference.PaSST(
        img_size=(128, 998), patch_size=16, stride=(10, 10), in_chans=1, num_classes=527,
        embed_dim=size.width, depth=size.depth, num_heads=size.num_heads, distilled=True)
    # get_basic_model's front end (its fmax=None is 15,000 Hz), in evaluation mode: no
    # masking and no random fmin/fmax.
    modules["mel"] = hear21passt.preprocess.AugmentMelSTFT(
        n_mels=128, sr=passt.SAMPLE_RATE, win_length=800, hopsize=320, n_fft=1024, freqm=48,
        timem=192, htk=False, fmin=0.0, fmax=15000, norm=1, fmin_aug_range=10,
        fmax_aug_range=2000).eval()
    audio_width = size.width
  config = text_config(text, sizes)
  transformers = references.transformers()
  config_class = transformers.BertConfig if text == "bert" else transformers.RobertaConfig
  model_class = transformers.BertModel if text == "bert" else transformers.RobertaModel
  modules["text"] = model_class(config_class(**{k: v for k, v in config.items()
                                                if k != "model_type"}),
                                add_pooling_layer=False)
  modules["audio_head"] = torch.nn.Linear(audio_width, EMBEDDING)
  modules["text_head"] = torch.nn.Linear(config["hidden_size"], EMBEDDING)
  return modules


def _numpy(module) -> dict:
  """A copy of the module's state dict in NumPy (not the CPU tensors' memory, which
  PyTorch's optimizer updates in place)."""
  return {key: value.detach().cpu().numpy().copy() for key, value in module.state_dict().items()}


def pair_modules(pair: str, sizes: str) -> tuple:
  """(audio module, text module) of `pair` at `sizes`, as the step trains them."""
  audio, text = ENCODER_PAIRS[pair]
  audio_module = (cnn14.Cnn14(block_dropout=0.0, clip_dropout=0.0,
                              precision=jax.lax.Precision.DEFAULT) if audio == "cnn14"
                  else passt.Encoder(SIZES[sizes]["passt"]))
  return audio_module, bert.module_from_config(text_config(text, sizes))


def jax_state(modules: dict, pair: str, sizes: str) -> steps.TrainState:
  """The Pair with the weights of `reference_modules`' modules, and Adam, in the host's
  memory (JAX's CPU device), for `_time_in_jax` to put on the device once PyTorch is
  done."""
  with jax.default_device(jax.devices("cpu")[0]):  # the conversions' arrays too
    audio, text = ENCODER_PAIRS[pair]
    audio_module, text_module = pair_modules(pair, sizes)
    if audio == "cnn14":
      audio_variables = cnn14.variables_from_state_dict(_numpy(modules["audio"]))
    else:
      audio_variables = passt.variables_from_state_dict(_numpy(modules["audio"]),
                                                        SIZES[sizes]["passt"])
    text_variables = bert.variables_from_state_dict(_numpy(modules["text"]), text_module,
                                                    model_type=text)
    dense = lambda linear: {"kernel": linear["weight"].T, "bias": linear["bias"]}
    params = {"audio": audio_variables["params"], "text": text_variables["params"],
              "audio_head": dense(_numpy(modules["audio_head"])),
              "text_head": dense(_numpy(modules["text_head"]))}
    batch_stats = ({"audio": audio_variables["batch_stats"]} if "batch_stats" in audio_variables
                   else {})
    return _train_state(Pair(audio_module, text_module), params, batch_stats)


def _train_state(model: Pair, params: dict, batch_stats: dict) -> steps.TrainState:
  """The step's state: the Pair's parameters and statistics, and Adam."""
  return steps.TrainState.create(apply_fn=model.apply, params=params,
                                 tx=optax.adam(LEARNING_RATE), batch_stats=batch_stats)


def abstract_state(pair: str, sizes: str) -> steps.TrainState:
  """jax_state's shapes and dtypes, made from the modules alone (no weights made)."""
  model = Pair(*pair_modules(pair, sizes))
  def init():
    variables = model.init(jax.random.key(0), jnp.zeros((1, cnn14.SAMPLE_RATE)),
                           jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool))
    return _train_state(model, variables["params"], variables.get("batch_stats", {}))
  return jax.eval_shape(init)


def torch_step(modules: dict, batch: dict, device):
  """The same step in PyTorch, its modules moved to `device`: a function of no argument
  that steps and returns the loss (a 0-d tensor) once `device` has finished."""
  import torch  # pylint: disable=import-outside-toplevel
  functional = torch.nn.functional
  for module in modules.values():
    module.to(device)
  waveforms = torch.from_numpy(batch["waveforms"]).to(device)
  token_ids = torch.from_numpy(batch["token_ids"]).long().to(device)
  mask = torch.from_numpy(batch["mask"]).long().to(device)
  parameters = [p for name, module in modules.items() if name != "mel"
                for p in module.parameters() if p.requires_grad]
  optimizer = torch.optim.Adam(parameters, lr=LEARNING_RATE)
  targets = torch.arange(waveforms.shape[0], device=device)

  def clips():
    if "mel" in modules:
      return modules["audio"](modules["mel"](waveforms)[:, None])[1]
    return modules["audio"](waveforms)["embedding"]

  def step():
    with warnings.catch_warnings():
      for message in _REFERENCE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
      audio = functional.normalize(modules["audio_head"](clips()), dim=-1)
      sentences = modules["text"](input_ids=token_ids, attention_mask=mask).last_hidden_state
      text = functional.normalize(modules["text_head"](sentences[:, 0]), dim=-1)
      logits = audio @ text.T / TEMPERATURE
      loss = (functional.cross_entropy(logits, targets)
              + functional.cross_entropy(logits.T, targets)) / 2
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      timing.torch_synchronize(device)
      return loss.detach()

  return step


def largest_batch(batch: int, need: int, half_need: int, limit: int) -> Optional[int]:
  """The largest batch whose step fits `limit` bytes, taking its memory as affine in the
  batch through `need` (bytes at `batch`) and `half_need` (at batch // 2); 0 where not
  one clip fits, None where the memory does not grow with the batch.

  >>> largest_batch(32, need=40, half_need=24, limit=80)  # 8 bytes and 1 a clip: 80 at 72
  72
  >>> largest_batch(32, need=40, half_need=24, limit=8)  # the 8 bytes alone fill it
  0
  """
  per_example = (need - half_need) / (batch - batch // 2)
  if per_example <= 0:
    return None
  return max(0, batch + math.floor((limit - need) / per_example))


def _needed_bytes(compiled) -> Optional[tuple]:
  """(temp, argument) bytes of a compiled step's memory analysis; None where the backend
  gives none."""
  memory = compiled.memory_analysis()
  return None if memory is None else (memory.temp_size_in_bytes,
                                      memory.argument_size_in_bytes)


def _out_of_memory(error: Exception) -> bool:
  """Whether `error` is a device running out of memory: PyTorch's OutOfMemoryError or
  XLA's RESOURCE_EXHAUSTED."""
  import torch  # pylint: disable=import-outside-toplevel
  return isinstance(error, torch.cuda.OutOfMemoryError) or (
      isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error))


def _median_ms_and_first_loss(step, repeats: int) -> tuple:
  """(median milliseconds of step() over `repeats` calls after a warm-up call, the loss
  that the warm-up call returned); (None, None) where the device runs out of memory
  (`_out_of_memory`), any other error raised."""
  losses = []
  def call():
    losses.append(step())
    return losses[-1]
  try:
    return 1e3 * timing.time_call(call, repeats=repeats), float(losses[0])
  except Exception as error:  # pylint: disable=broad-exception-caught
    if not _out_of_memory(error):
      raise
    return None, None


def device_memory_limit() -> Optional[int]:
  """The bytes JAX's allocator may take of its first device (`parallel.device_memory`)."""
  return parallel.device_memory(jax.devices()[0])


def _time_in_pytorch(pair: str, sizes: str, inputs: dict, repeats: int) -> tuple:
  """(the JAX state of the same weights (`jax_state`), the parameter count, PyTorch's
  median ms, its first loss) of the step on `inputs` (`_median_ms_and_first_loss`),
  PyTorch's memory given back."""
  import torch  # pylint: disable=import-outside-toplevel
  modules = reference_modules(pair, sizes)
  state = jax_state(modules, pair, sizes)
  parameters = sum(p.numel() for name, module in modules.items() if name != "mel"
                   for p in module.parameters())
  torch_device = timing.torch_device()
  torch.set_float32_matmul_precision("high")  # TF32 on a GPU, as XLA's default precision
  timed = _median_ms_and_first_loss(torch_step(modules, inputs, torch_device), repeats)
  del modules  # with the step and its optimizer, gone
  gc.collect()
  if torch_device.type == "cuda":  # the memory PyTorch cached, back for JAX
    torch.cuda.empty_cache()
  return state, parameters, *timed


def _time_in_jax(state: steps.TrainState, inputs: dict, repeats: int) -> tuple:
  """(median ms, first loss, the compiled step's `_needed_bytes`) of the JAX step from
  `state` on `inputs` (`_median_ms_and_first_loss`), both put on the device first: the
  step's arguments, a few GiB at the published sizes, outside the out-of-memory guard."""
  state, inputs = jax.device_put((state, inputs), jax.devices()[0])
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, inputs).compile()

  def one_step():  # the state is donated: each call steps from the last one's
    nonlocal state
    state, loss = compiled(state, inputs)
    return loss

  return *_median_ms_and_first_loss(one_step, repeats), _needed_bytes(compiled)


def run(pairs, sizes: str, batch: int, samples: int, words: int, repeats: int,
        device: Optional[str] = None, halve: bool = False) -> list:
  """One row per encoder pair (names in ENCODER_PAIRS), each encoder at `sizes` (a name
  in SIZES), on `batch` waveforms of `samples` samples and captions of `words` tokens:
  the step's median milliseconds in PyTorch (`timing.torch_device`) and in JAX, their
  first steps' losses (the warm-up calls'), and the compiled JAX step's memory (temp and
  argument bytes). A framework that runs out of memory has None for its time and loss
  and is named in `out_of_memory` (`plan` says what batch fits); with `halve`, a PyTorch
  step out of memory is first tried again at half the batch, down to 2, and both
  frameworks time the pair at the batch PyTorch held. Every pair's PyTorch step runs
  before any JAX step: JAX's allocator keeps the device memory it grows to."""
  in_pytorch, torch_device = [], str(timing.torch_device())
  for pair in pairs:
    vocab = text_config(ENCODER_PAIRS[pair][1], sizes)["vocab_size"]
    size = batch
    while True:
      inputs = random_batch(size, samples, words, vocab)
      timed = _time_in_pytorch(pair, sizes, inputs, repeats)
      if timed[2] is not None or not halve or size // 2 < 2:
        break
      size //= 2
    in_pytorch.append((pair, size, inputs, *timed))
  rows = []
  for pair, size, inputs, state, parameters, torch_ms, torch_loss in in_pytorch:
    jax_ms, jax_loss, needed = _time_in_jax(state, inputs, repeats)
    out_of_memory = [name for name, ms in (("PyTorch", torch_ms), ("JAX", jax_ms))
                     if ms is None]
    rows.append(dict(
        _shape_row(pair, sizes, size, samples, words, needed, device),
        parameters=parameters, jax_ms=jax_ms, torch_ms=torch_ms,
        speedup=None if out_of_memory else torch_ms / jax_ms, jax_loss=jax_loss,
        torch_loss=torch_loss, out_of_memory=out_of_memory, torch_device=torch_device))
  return rows


def _shape_row(pair: str, sizes: str, batch: int, samples: int, words: int,
               needed: Optional[tuple], device: Optional[str]) -> dict:
  """A row's step and memory: the pair, its encoders and sizes, the batch's shape, the
  compiled step's (temp, argument) bytes (`_needed_bytes`) and the device."""
  audio, text = ENCODER_PAIRS[pair]
  return dict(pair=pair, audio=audio, text=text, sizes=sizes, batch=batch, samples=samples,
              seconds=samples / cnn14.SAMPLE_RATE, words=words,
              temp_bytes=needed and needed[0], argument_bytes=needed and needed[1],
              device=device or timing.device_name())


def planned_memory(pair: str, sizes: str, batch: int, samples: int, words: int,
                   device: Optional[str] = None) -> dict:
  """One row: the memory XLA plans for the JAX step of `pair` at `sizes` on `batch`
  waveforms of `samples` samples and captions of `words` tokens, compiled from shapes
  alone (no weights made, nothing run, no PyTorch), so that a CPU states what a device
  needs before one is at hand: the JAX parameters (CNN14's frozen front end is not among
  them), and the temp and argument bytes of the compiled step (arguments: parameters,
  Adam's two moments, BatchNorm's statistics and the batch; temp: activations kept for
  the backward pass and every other buffer, as this backend's compiler assigns them;
  None where it gives none)."""
  state = abstract_state(pair, sizes)
  inputs = dict(waveforms=jax.ShapeDtypeStruct((batch, samples), jnp.float32),
                token_ids=jax.ShapeDtypeStruct((batch, words), jnp.int32),
                mask=jax.ShapeDtypeStruct((batch, words), jnp.bool_))
  compiled = jax.jit(train_step, donate_argnums=0).lower(state, inputs).compile()
  return dict(_shape_row(pair, sizes, batch, samples, words, _needed_bytes(compiled), device),
              jax_parameters=sum(leaf.size for leaf in jax.tree.leaves(state.params)))


def _total_bytes(row: dict) -> Optional[int]:
  """A row's step memory, temporary and argument bytes, or None where the backend gives
  none."""
  return None if row["temp_bytes"] is None else row["temp_bytes"] + row["argument_bytes"]


def plan(pairs, sizes: str, batch: int, samples: int, words: int,
         device: Optional[str] = None) -> list:
  """`planned_memory`'s rows for each encoder pair (names in ENCODER_PAIRS) at `batch` and
  at batch // 2 (how the memory grows with the batch), each with `fits_batch`: on a device
  that says how much it holds, the largest batch that fits (`largest_batch`), else None."""
  limit, rows = device_memory_limit(), []
  for pair in pairs:
    full, half = (planned_memory(pair, sizes, n, samples, words, device)
                  for n in (batch, batch // 2))
    needs = [_total_bytes(row) for row in (full, half)]
    fits = largest_batch(batch, *needs, limit) if limit and None not in needs else None
    rows += [dict(full, fits_batch=fits), dict(half, fits_batch=fits)]
  return rows


def batch_every_pair_fits(planned: list, batch: int) -> int:
  """The encoders job's batch after `plan`'s rows: the smallest of their pairs' largest
  batches, at most `batch`. A pair whose memory states no limit (None: a CPU, or memory
  that does not grow with the batch) or fits fewer than 2 clips limits nothing.

  >>> batch_every_pair_fits([dict(fits_batch=72), dict(fits_batch=20)], 32)
  20
  >>> batch_every_pair_fits([dict(fits_batch=72)], 32), batch_every_pair_fits([], 32)
  (32, 32)
  >>> batch_every_pair_fits([dict(fits_batch=20), dict(fits_batch=0),
  ...                        dict(fits_batch=None)], 32)
  20
  """
  fits = [row["fits_batch"] for row in planned
          if row["fits_batch"] is not None and row["fits_batch"] >= 2]
  return min([batch, *fits])


def format_table(rows: list) -> str:
  """The rows as a Markdown table."""
  gib = lambda r: None if _total_bytes(r) is None else _total_bytes(r) / 2 ** 30
  return timing.markdown_table(
      [("pair", "pair", ""), ("sizes", "sizes", ""),
       ("parameters (M)", lambda r: r["parameters"] / 1e6, ".1f"), ("batch", "batch", ""),
       ("seconds", "seconds", "g"), ("words", "words", ""), ("JAX step ms", "jax_ms", ".0f"),
       ("PyTorch step ms", "torch_ms", ".0f"), ("speedup", "speedup", ".2f"),
       ("JAX memory GiB (temp + arguments)", gib, ".2f"),
       ("first loss JAX / PyTorch", lambda r: " / ".join(
           "out of memory" if loss is None else f"{loss:.5f}"
           for loss in (r["jax_loss"], r["torch_loss"])), "")], rows)


def format_memory_table(rows: list) -> str:
  """planned_memory's rows as a Markdown table."""
  gib = lambda *keys: lambda r: (None if r["temp_bytes"] is None
                                 else sum(r[key] for key in keys) / 2 ** 30)
  return timing.markdown_table(
      [("pair", "pair", ""), ("sizes", "sizes", ""),
       ("JAX parameters (M)", lambda r: r["jax_parameters"] / 1e6, ".1f"),
       ("batch", "batch", ""), ("seconds", "seconds", "g"), ("words", "words", ""),
       ("arguments GiB", gib("argument_bytes"), ".2f"), ("temp GiB", gib("temp_bytes"), ".2f"),
       ("total GiB", gib("argument_bytes", "temp_bytes"), ".2f"),
       ("largest batch (est.)", "fits_batch", "")], rows)
