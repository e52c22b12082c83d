"""Training with pretrained encoders (--config.audio_encoder, --config.text_encoder) on the
real recordings (tests/data/recordings): the publishers' files reach the train state as
written, the text encoder reads its own checkpoint's token ids, both encoders are
fine-tuned, and settings that cannot run are refused before anything is written."""

import importlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import pretrained_files
import recordings
from ntxr.encoders import references as torch_references
from runs import experiment_of
from ntxr import checkpoints as checkpoints_lib, encoders, experiment as experiment_lib
from ntxr import search, settings, specs, train
from ntxr.configs import default
from ntxr.data import tokenizer
from ntxr.encoders import bert, checkpoint_files

SMALL = dict(embed_dim=16, batch_size=4, eval_batch_size=4, num_epochs=1,
             max_steps_per_epoch=2, frame_buckets=(128,), max_tokens=24)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """{"pairs": a folder of the real recordings and their captions (captions.csv), "cnn14":
  a PANNs file, "passt": a small PaSST's, "bert" and "roberta": Hugging Face folders}."""
  root = tmp_path_factory.mktemp("pretrained")
  return dict(pairs=recordings.pairs_folder(str(root / "pairs")),
              cnn14=pretrained_files.cnn14_file(str(root / "Cnn14_mAP=0.431.pth")),
              passt=pretrained_files.passt_file(str(root / "passt-s.pt")),
              bert=pretrained_files.text_folder(str(root / "bert"), "bert"),
              roberta=pretrained_files.text_folder(str(root / "roberta"), "roberta"))


def pretrained_config(tiny_config, files, text="bert", **overrides):
  return tiny_config(**{**dict(data_dir=files["pairs"], audio_encoder="cnn14",
                               audio_weights=files["cnn14"], text_encoder=text,
                               text_weights=files[text]), **SMALL, **overrides})


def _leaves(tree) -> list:
  return [np.asarray(leaf) for leaf in jax.tree.leaves(tree)]


def test_cnn14_and_bert_fine_tune_end_to_end_on_real_recordings(tiny_config, files, tmp_path):
  config = pretrained_config(tiny_config, files)
  initial = experiment_of(config).initial_state
  for name, path in (("cnn14", files["cnn14"]), ("bert", files["bert"])):
    side = "audio" if name == "cnn14" else "text"
    published = encoders.load(name, path).variables
    for collection, tree in published.items():  # the file's weights, not fresh ones
      got = getattr(initial, "params" if collection == "params" else collection)
      for found, expected in zip(_leaves(got[f"{side}_encoder"]), _leaves(tree)):
        np.testing.assert_array_equal(found, expected)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["epochs"] == 1 and results["steps"] == 2
  weights = [files["cnn14"], *(os.path.join(files["bert"], name) for name in bert.WEIGHT_FILES
                               if os.path.isfile(os.path.join(files["bert"], name)))]
  for path in weights:  # both files' tensors kept for the next run
    assert os.path.isfile(checkpoint_files.cached_path(path, config.cache_dir)), path
  for direction in ("t2a", "a2t"):
    assert 0 <= results[direction]["mAP@10"] <= 1
  with checkpoints_lib.Checkpoints(str(tmp_path / "run")) as checkpoints:
    trained, _ = checkpoints.restore("best", initial)
  for name in ("audio_encoder", "text_encoder"):  # both fine-tuned
    changed = [not np.array_equal(a, b) for a, b in zip(_leaves(trained.params[name]),
                                                        _leaves(initial.params[name]))]
    assert any(changed), name
  # Search the recordings with the run: its scores of the test split are the evaluation's.
  model = search.Model(str(tmp_path / "run"))
  experiment = model.experiment
  expected = experiment.evaluation.runs_scores([experiment.evaluation.embed_split(
      model.state, experiment.test_split)])[0]  # [clips, captions]
  named = experiment.corpus.captions(experiment.test_split)
  index = search.Index.build(model, files["pairs"], dtype=np.float32)
  found = index.scores(*model.embed_queries([c for _, texts in named for c in texts]),
                       model.settings.loss.score)
  np.testing.assert_allclose(found[[index.files.index(name) for name, _ in named]], expected,
                             rtol=1e-5, atol=1e-6)


def test_passt_and_roberta_fine_tune_end_to_end_as_the_dcase_2025_baseline(tiny_config, files,
                                                                          tmp_path):
  """A small PaSST with patchout and RoBERTa, in bfloat16 with remat, the baseline's
  InfoNCE and warm-up and cosine schedule, on the real recordings: both encoders move."""
  config = pretrained_config(tiny_config, files, text="roberta", audio_encoder="passt",
                             audio_weights=files["passt"], frame_buckets=(200,), patchout=(3, 1),
                             compute_dtype="bfloat16", remat=True, objective="infonce",
                             temperature=0.05, lr_schedule="warmup_cosine")
  initial = experiment_of(config).initial_state
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert results["steps"] == 2 and 0 <= results["t2a"]["mAP@10"] <= 1
  with checkpoints_lib.Checkpoints(str(tmp_path / "run")) as checkpoints:
    trained, _ = checkpoints.restore("latest", initial)
  for name in ("audio_encoder", "text_encoder"):
    changed = [not np.array_equal(a, b) for a, b in zip(_leaves(trained.params[name]),
                                                        _leaves(initial.params[name]))]
    assert any(changed), name


# Every strategy's triplet loss, and every objective that takes no strategy.
LOSSES = ([dict(strategy=name) for name in specs.STRATEGIES]
          + [dict(objective=name, **(dict(similarity="tfidf") if objective.needs_relevance
                                     else {}))
             for name, objective in specs.OBJECTIVES.items() if not objective.takes_strategy])


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: loss.get("strategy",
                                                                   loss.get("objective")))
def test_every_strategy_and_objective_trains_a_pretrained_pair(tiny_config, files, loss):
  """One step on a batch of the real recordings with a small PaSST and RoBERTa: a finite
  loss, and a gradient that moves both encoders."""
  config = pretrained_config(
      tiny_config, files, text="roberta", audio_encoder="passt", frame_buckets=(200,),
      audio_weights=files["passt"], **loss)
  experiment = experiment_of(config)
  initial = {name: _leaves(experiment.initial_state.params[name])
             for name in ("audio_encoder", "text_encoder")}
  batch = next(iter(experiment.train_batches(experiment.training_split, seed=0)))
  state, statistics = experiment.train_step(
      experiment.initial_state, experiment.device_batch(batch, experiment.training_split),
      jax.random.key(0))
  assert np.isfinite(float(statistics.loss)) and float(statistics.grad_norm) > 0
  for name, before in initial.items():
    assert any(not np.array_equal(a, b)
               for a, b in zip(_leaves(state.params[name]), before)), name


def test_a_pretrained_tokenizer_cuts_captions_and_counts_them_whole(files):
  """The cut ids are transformers' with truncation; the length its count without (which
  search's warning on a long query reads)."""
  caption = " ".join(recordings.CAPTIONS["front center.wav"])
  theirs = torch_references.transformers().AutoTokenizer.from_pretrained(files["roberta"])
  ours = tokenizer.PretrainedTokenizer(files["roberta"], 8)
  assert (ours.encode(caption) - 1).tolist() == theirs(caption, truncation=True,
                                                       max_length=8)["input_ids"]
  assert ours.length(caption) == len(theirs(caption)["input_ids"]) > 8


def test_roberta_reads_its_own_checkpoints_token_ids_padding_included(tiny_config, files):
  """RoBERTa pads with id 1 and starts with id 0: the corpus's ids are the checkpoint's + 1
  (0 pads), and the text encoder sees exactly the checkpoint's ids and gives what the
  loaded encoder gives on the same captions."""
  captions = list(recordings.CAPTIONS["front center.wav"][:3]) + ["Rain."]
  theirs = torch_references.transformers().AutoTokenizer.from_pretrained(files["roberta"])
  ours = tokenizer.PretrainedTokenizer(files["roberta"], SMALL["max_tokens"])
  for caption in captions:
    assert (ours.encode(caption) - 1).tolist() == theirs(
        caption, truncation=True, max_length=SMALL["max_tokens"])["input_ids"]
  experiment = experiment_of(pretrained_config(tiny_config, files, text="roberta"))
  state = jax.device_get(experiment.initial_state)
  tokens = np.stack([tokenizer.padded_ids(ours, c, SMALL["max_tokens"]) for c in captions])
  _, seen = state.apply_fn(state.variables(), tokens, tokens != tokenizer.PAD_ID,
                           method="embed_text", capture_intermediates=True,
                           mutable=["intermediates"])
  words = seen["intermediates"]["text_encoder"]["__call__"][0][0]
  loaded = bert.load(files["roberta"], max_length=SMALL["max_tokens"])
  (expected, mask), _ = loaded.embed(captions)
  width = mask.shape[1]
  assert not tokens[:, width:].any()
  np.testing.assert_allclose(np.where(mask[..., None], words[:, :width], 0),
                             np.where(mask[..., None], expected, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    (dict(audio_weights="x.pth"), r"--config\.audio_weights names .* give it with "
                                  r"--config\.audio_encoder=cnn14\|passt, not alone"),
    (dict(text_encoder="bert"), r"--config\.text_encoder=bert reads its publisher's "
                                r"weights: give --config\.text_weights=DIR \(the Hugging Face"),
    (dict(audio_encoder="cnn14", audio_weights="/no/Cnn14_mAP=0.431.pth"),
     r"--config\.audio_weights=/no/Cnn14_mAP=0\.431\.pth: no such file \(cnn14's is "
     r"published at https://zenodo\.org/record/3987831"),
    (dict(audio_encoder="cnn14", audio_weights="/"),  # a folder, a model folder say
     r"--config\.audio_weights=/: a folder, not a checkpoint file \(cnn14's is published"),
    (dict(text_encoder="roberta", text_weights="/no/roberta"),
     r"--config\.text_weights=/no/roberta: no Hugging Face model folder"),
    (dict(audio_encoder="vggish"), r"--config\.audio_encoder must be one of"),
    (dict(audio_encoder="passt", audio_weights="passt.pt"),  # the default buckets, to 16 s
     r"--config\.frame_buckets: PaSST reads one length, 16 to 1000 frames of 320 samples "
     r"\(10 s at most\): .* give one bucket, e\.g\. --config\.frame_buckets=\"\(1000,\)\", "
     r"not \(160, 320,"),
    (dict(audio_encoder="passt", audio_weights="passt.pt", frame_buckets=(1200,)),
     r"PaSST reads one length, 16 to 1000 frames .* not \(1200,\)"),
    (dict(audio_encoder="passt", audio_weights="passt.pt", frame_buckets=(15,)),
     r"PaSST reads one length, 16 to 1000 frames .* not \(15,\)"),
    (dict(audio_encoder="cnn14", audio_weights="x.pth", patchout=(1, 0)),
     r"--config\.patchout=\(1, 0\) is PaSST's"),
    (dict(frozen="audio"), r"--config\.frozen=audio: the audio encoder is the paper's"),
    (dict(text_dropout=0.2), r"--config\.text_dropout and --config\.sentence_pooling are for"),
    (dict(text_encoder="bert", text_weights="/no/bert", text_dropout=-0.5),
     r"--config\.text_dropout must be at least 0 and below 1, or -1"),
    (dict(sentence_pooling="max"), r"--config\.sentence_pooling must be one of"),
    (dict(text_encoder="bert", text_weights="/no/bert", sentence_pooling="mean"),
     r"--config\.sentence_pooling is the pooled score's: give it with --config\.score=pooled"),
    (dict(text_encoder="bert", text_weights="/no/bert", frozen="text", text_dropout=0.2),
     r"--config\.text_dropout is the text encoder's in training: a frozen one runs without"),
    (dict(text_encoder="bert", text_weights="/no/bert", frozen="text", encoder_lr_factor=0.1),
     r"--config\.encoder_lr_factor: every pretrained encoder is frozen"),
    (dict(warmup_cosine=dict(warmup_epochs=2.0, decay_epochs=15.0, min_lr=1e-7)),
     r"--config\.warmup_cosine is --config\.lr_schedule=warmup_cosine's"),
    (dict(remat=True), r"--config\.remat and --config\.encoder_lr_factor are for pretrained"),
    (dict(encoder_lr_factor=0.1), r"--config\.remat and --config\.encoder_lr_factor are for"),
    (dict(lr_schedule="cosine"), r"--config\.lr_schedule must be one of"),
    (dict(lr_schedule="warmup_cosine", learning_rate=1e-5,
          warmup_cosine=dict(warmup_epochs=1.0, decay_epochs=2.0, min_lr=1e-4)),
     r"--config\.warmup_cosine\.min_lr \(0\.0001\) must be at most --config\.learning_rate"),
])
def test_pretrained_settings_that_cannot_run_are_refused(overrides, message, tmp_path):
  config = default.get_config()
  config.update(overrides)
  with pytest.raises(settings.SettingError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("max_tokens", [2, 41])
def test_a_caption_length_the_text_encoder_cannot_read_is_refused(files, max_tokens):
  """The small BERT's 40 position embeddings hold 40 tokens; fewer than 3 hold no word."""
  config = default.get_config()
  config.update(text_encoder="bert", text_weights=files["bert"], max_tokens=max_tokens)
  with pytest.raises(settings.SettingError, match=rf"--config\.max_tokens={max_tokens}: the "
                     rf"text encoder in .*bert reads 3 \(its two special tokens and a word\) "
                     rf"to 40 tokens"):
    settings.Settings.of(config)
  config.max_tokens = 40
  assert settings.Settings.of(config).data.max_tokens == 40


def test_the_papers_config_takes_a_pretrained_text_encoder_without_word_vectors(files):
  from ntxr.configs import paper  # pylint: disable=import-outside-toplevel
  config = paper.get_config()
  config.update(text_encoder="bert", text_weights=files["bert"], max_tokens=24)
  assert settings.Settings.of(config).data.tokens == "pretrained"


@pytest.mark.parametrize("patchout, message", [
    ((99, 0), r"PaSST \(stride 10\) cuts 99 time columns of patches from 1000 frames and 12"),
    ((0, 12), r"and 12 frequency rows; patchout drops fewer")])
def test_a_patchout_beyond_the_files_patches_is_refused(tiny_config, files, patchout, message):
  config = pretrained_config(
      tiny_config, files, audio_encoder="passt", frame_buckets=(1000,), patchout=patchout,
      audio_weights=files["passt"])
  with pytest.raises(settings.SettingError, match=rf"--config\.patchout=.*{message}"):
    experiment_of(config)


@pytest.mark.parametrize("overrides, error, message", [
    ({}, ValueError, "has a key Cnn14 does not have"),  # PaSST's file as CNN14's
    (dict(audio_encoder="passt", frame_buckets=(1000,), patchout=(99, 0)),
     settings.SettingError, "PaSST .stride 10. cuts 99 time columns")])
def test_a_wrong_file_or_patchout_stops_the_run_before_its_data_is_prepared(
    tiny_config, files, tmp_path, overrides, error, message):
  config = pretrained_config(tiny_config, files, cache_dir=str(tmp_path / "cache"),
                             **dict(overrides, audio_weights=files["passt"]))
  with pytest.raises(error, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "cache" / "tfds")  # nothing prepared


def test_the_fields_a_pretrained_encoder_does_not_read_are_named_when_set(files):
  """The paper's config with pretrained encoders: its log-mel, CRNN and word-table fields
  have no effect, and the command says which (the default config's values pass quietly)."""
  def check(*flags):
    return subprocess.run(
        [sys.executable, "-m", "ntxr.main", "--check_settings", *flags, "--config.max_tokens=24",
         "--config.audio_encoder=cnn14", f"--config.audio_weights={files['cnn14']}",
         "--config.text_encoder=bert", f"--config.text_weights={files['bert']}"],
        capture_output=True, text=True, check=False)
  quiet = check()
  assert (quiet.returncode, quiet.stderr) == (0, "")
  paper = check("--config=ntxr/configs/paper.py")
  assert paper.returncode == 0, paper.stderr
  line = paper.stderr.strip().splitlines()[-1]
  assert ("sample_rate=44100, n_fft=2048, f_min=12.0, f_max=8000.0, log_offset=2.22" in line
          and "channels=(32, 128, 128, 128, 128), initializer=pytorch, pool_remainder=drop, "
              "batch_norm_pass=True, "
              "tokens=words, vocabulary=all, missing_word_vectors=one_unk, "
              "word_variants=authors: not read with --config.audio_encoder=cnn14, "
              "--config.text_encoder=bert" in line), line
  from ntxr.configs import paper  # pylint: disable=import-outside-toplevel
  config = paper.get_config()
  config.update(audio_encoder="cnn14", audio_weights=files["cnn14"], text_encoder="bert",
                text_weights=files["bert"], max_tokens=24, conv_precision="high")
  model = settings.Settings.of(config).model  # CNN14's file's statistics, its precision
  assert (model.batch_norm_pass, model.conv_precision) == (False, "")
  config = default.get_config()
  config.update(audio_encoder="passt", channels=(1, 2, 3, 4, 5), batch_norm_pass=True)
  assert settings.unused_fields(config) == ["channels=(1, 2, 3, 4, 5)", "batch_norm_pass=True"]
  config.audio_encoder = "crnn"
  assert settings.unused_fields(config) == []


def test_a_pretrained_text_encoder_refuses_word_vectors(files):
  config = default.get_config()
  config.update(text_encoder="bert", text_weights=files["bert"], word_vectors=files["cnn14"])
  with pytest.raises(settings.SettingError, match="reads its own tokens"):
    settings.Settings.of(config)


def _changed_fields(config, defaults) -> list:
  """The top-level fields whose value differs from the default config's."""
  return [field for field in config if config[field] != defaults[field]]


@pytest.mark.parametrize("name, audio, text", [("dcase2023", "cnn14", "bert"),
                                               ("dcase2025", "passt", "roberta")])
def test_the_dcase_configs_run_on_their_encoders_and_say_each_change(name, audio, text, files,
                                                                     tmp_path):
  """Each DCASE config, given its publishers' files, resolves to its encoders as the
  baseline trains them, and docs/dcase_settings.md names every field it changes."""
  config = importlib.import_module(f"ntxr.configs.{name}").get_config()
  weights = files["cnn14"] if audio == "cnn14" else files["passt"]
  config.update(data_dir=files["pairs"], audio_weights=weights, text_weights=files[text],
                cache_dir=str(tmp_path / "cache"))
  run = settings.Settings.of(config)
  assert (run.model.audio_encoder, run.model.text_encoder, run.loss.score) == (
      audio, text, "pooled")
  loaded = experiment_lib.pretrained_encoders(run.model, run.data.cache_dir)
  if audio == "passt":
    module = loaded["audio"].module
    assert (module.s_patchout_t, module.s_patchout_f, module.dtype) == (15, 2, jax.numpy.bfloat16)
    assert (loaded["text"].module.hidden_dropout, loaded["text"].module.attention_dropout) == (
        0.2, 0.2)
  with open(os.path.join(os.path.dirname(__file__), "..", "docs", "dcase_settings.md"),
            encoding="utf-8") as f:
    section = f.read().split(f"`ntxr/configs/{name}.py`")[1].split("\n## ")[0]
  unsaid = [field for field in _changed_fields(config, default.get_config())
            if field not in settings.OPERATIONAL + settings.PATHS and f"`{field}" not in section]
  assert not unsaid
