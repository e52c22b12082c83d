"""The commands' shared flags and start: names without JAX, a quiet and light --help."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from ntxr import cli, ctrl_c, objectives, sampling, settings, specs
from ntxr import workdir as workdir_lib
from ntxr.configs import default
from recordings import RECORDINGS


def test_the_kernels_registries_hold_the_specified_names_in_their_order():
  assert list(sampling.STRATEGIES) == list(specs.STRATEGIES)
  assert list(objectives.OBJECTIVES) == list(specs.OBJECTIVES)
  assert all(sampling.STRATEGIES[name].spec is spec for name, spec in specs.STRATEGIES.items())
  assert all(objectives.OBJECTIVES[name].spec is spec
             for name, spec in specs.OBJECTIVES.items())


def command_help(module: str) -> str:
  """What `python -m module --help` prints, checked to be all it prints and to have loaded
  neither JAX, TensorFlow nor librosa."""
  code = ("import runpy, sys\n"
          f"try: runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
          "except SystemExit: pass\n"
          "loaded = [m for m in ('jax', 'tensorflow', 'librosa') if m in sys.modules]\n"
          "assert not loaded, loaded")
  done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True,
                        text=True, check=True)
  assert done.stderr == ""
  assert done.stdout.rstrip().endswith("Try --helpfull to get a list of all flags.")
  return done.stdout


def test_main_help_prints_only_the_help_and_imports_neither_jax_nor_tensorflow():
  printed = command_help("ntxr.main")
  assert printed.startswith("Trains and evaluates a dual encoder")
  assert "--strategy:<easy_audio|easy_text|full_batch|hard_audio|hard_cross|hard_text|" \
      "random|semihard_cross>" in "".join(printed.split())
  assert "--objective: <hn_nce|infonce|siglip|soft|triplet>" in printed
  assert "--workdir: the run's folder" in printed
  assert "--config: training configuration file" in printed


@pytest.mark.parametrize("module, opening, flag", [
    ("ntxr.search", "Search a folder of recordings", "--audio_dir: the folder of recordings"),
    ("ntxr.bench", "Benchmarks of the hot paths", "--widths: CRNN widths of the training-step "
     "job, of ['paper', 'half', 'default']"),
])
def test_search_and_bench_help_imports_neither_jax_nor_tensorflow(module, opening, flag):
  printed = command_help(module)
  assert printed.startswith(opening)
  assert flag in " ".join(printed.split())


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", -3, "--config.batch_size must be at least 2, not -3"),
    ("batch_size", 1, "--config.batch_size must be at least 2, not 1"),
    ("batch_size", -3, "--config.batch_size must be at least 2, not -3"),
    ("objective", "clip", "--config.objective must be one of ['triplet', 'infonce', "
     "'hn_nce', 'soft', 'siglip'], not 'clip'"),
    ("strategy", "semihard", "--config.strategy must be one of ['full_batch', 'random', "
     "'semihard_cross', 'hard_cross', 'easy_text', 'hard_text', 'easy_audio', "
     "'hard_audio'], not 'semihard'"),
    ("dropout", 1.0, "--config.dropout must be at least 0 and below 1, not 1.0"),
    ("frame_buckets", (160, 162), "--config.frame_buckets must rise, each a multiple of "
     "the CRNN's time stride 4, not (160, 162)"),
    ("channels", (8, 32), "--config.channels must be 5 positive counts, one per CRNN "
     "block, not (8, 32)"),
    ("f_min", 9000.0, "--config.f_max (8000.0) must be above --config.f_min (9000.0)"),
    ("f_max", 12000.0, "--config.f_max (12000.0) must be at most the Nyquist frequency, 8000 "
     "Hz at the sample rate (--config.sample_rate=0: 16000 Hz, the built-in corpus's own), "
     "or 0 for it"),
    ("sample_rate", 8000, "--config.f_max (8000.0) must be at most the Nyquist frequency, "
     "4000 Hz at the sample rate (--config.sample_rate=8000), or 0 for it"),
    ("data_dir", "/no/such/folder", "--config.data_dir=/no/such/folder: no such folder; "
     "pass a Clotho v2 or AudioCaps folder, or one holding captions.csv"),
    ("data_dir", "/", "--config.data_dir=/: not a Clotho v2, AudioCaps or pairs "
     "folder (none of clotho_captions_development.csv, train.csv, captions.csv)"),
    ("word_vectors", "/no/vectors.bin", "--config.word_vectors=/no/vectors.bin: no such file"),
    ("temperature", float("nan"), "--config.temperature must be a finite number, not nan"),
    ("temperature", float("inf"), "--config.temperature must be a finite number, not inf"),
    ("margin", float("inf"), "--config.margin must be a finite number, not inf"),
    ("learning_rate", 1e3, "--config.learning_rate must be at most 1.0, not 1000.0"),
    ("eval_batch_size", 0, "--config.eval_batch_size must be at least 1, not 0"),
    ("sample_rate", 7, "--config.sample_rate must be 0 (the corpus's own) or at least "
     "8000 Hz, not 7"),
    ("num_epochs", 0, "--config.num_epochs must be at least 1, not 0"),
    ("select_by", "loss", "--config.select_by must be one of ['t2a_mAP@10', "
     "'validation_loss'], not 'loss'"),
])
def test_a_bad_setting_is_named_before_anything_is_written(tmp_path, field, value, message):
  config = default.get_config()
  config.f_max = 8000.0  # for the f_min case
  config[field] = value
  with pytest.raises(settings.SettingError, match=re.escape(message)):
    settings.check(str(tmp_path / "run"), config)
  assert not os.listdir(tmp_path)


def trained_workdir(path, config, epochs: int):
  """A workdir as a run of `config` leaves it after `epochs` epochs (config.json, the
  metrics log, a checkpoint's folder)."""
  os.makedirs(path / "checkpoints" / "latest" / "40")
  (path / "config.json").write_text(config.to_json())
  (path / "metrics.jsonl").write_text(
      "".join(json.dumps(dict(epoch=e, step=10 * e)) + "\n" for e in range(1, epochs + 1)))


def test_a_workdir_refuses_other_settings_naming_both_values(tmp_path):
  config = default.get_config()
  config.data_dir = str(tmp_path / "sounds")
  (tmp_path / "sounds").mkdir()
  (tmp_path / "sounds" / "captions.csv").write_text("file_name,caption\n")
  trained_workdir(tmp_path / "run", config, epochs=3)
  config.data_dir += "/"  # the same folder
  settings.check(str(tmp_path / "run"), config)
  config.margin, config.seed = 0.2, 4
  with pytest.raises(settings.SettingError, match=re.escape(
      f"{tmp_path}/run holds a run with other settings (margin: 0.5 there, 0.2 here; seed: 0 "
      "there, 4 here); use another --workdir")):
    settings.check(str(tmp_path / "run"), config)


def test_a_finished_run_is_not_cut_to_fewer_epochs_than_it_trained(tmp_path):
  config = default.get_config()
  trained_workdir(tmp_path / "run", config, epochs=3)
  config.num_epochs = 2
  with pytest.raises(settings.SettingError, match=re.escape(
      f"{tmp_path}/run holds a run trained for 3 epochs: --config.num_epochs=2 would report "
      "them as 2; give at least 3, or use another --workdir")):
    settings.check(str(tmp_path / "run"), config)
  config.num_epochs = 3
  settings.check(str(tmp_path / "run"), config)


def test_a_run_that_failed_before_its_first_checkpoint_takes_the_mended_settings(tmp_path):
  """Training that diverges at once saves nothing: the rerun with a lower learning rate
  (which the error advises) trains in the same workdir."""
  config = default.get_config()
  config.learning_rate = 0.5
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text(config.to_json())
  config.learning_rate = 1e-3
  settings.check(str(tmp_path / "run"), config)
  os.makedirs(tmp_path / "run" / "checkpoints" / "latest" / "50")
  with pytest.raises(settings.SettingError, match="learning_rate: 0.5 there, 0.001 here"):
    settings.check(str(tmp_path / "run"), config)
  os.rmdir(tmp_path / "run" / "checkpoints" / "latest" / "50")  # a finished run's, deleted
  (tmp_path / "run" / "results.json").write_text("{}")
  with pytest.raises(settings.SettingError, match="learning_rate: 0.5 there, 0.001 here"):
    settings.check(str(tmp_path / "run"), config)


def test_a_bad_setting_costs_the_command_one_line(tmp_path):
  """Through the command, before TensorFlow loads: the workdir and cache stay unmade; a
  file given as --workdir is refused as such."""
  def main(*flags, cache=tmp_path / "cache"):
    return subprocess.run([sys.executable, "-m", "ntxr.main", f"--config.cache_dir={cache}",
                           *flags], capture_output=True, text=True, check=False)
  done = main(f"--workdir={tmp_path}/run", "--config.batch_size=0")
  assert (done.returncode, done.stderr) == (
      2, "error: --config.batch_size must be at least 2, not 0\n")
  assert sorted(os.listdir(tmp_path)) == []
  (tmp_path / "notes.txt").write_text("my notes")
  done = main(f"--workdir={tmp_path}/notes.txt")
  assert (done.returncode, done.stderr) == (
      2, f"error: --workdir={tmp_path}/notes.txt is a file, not a folder: give a folder\n")
  done = main(f"--workdir={tmp_path}/run", cache=f"{tmp_path}/notes.txt")
  assert (done.returncode, done.stderr) == (
      2, f"error: --config.cache_dir={tmp_path}/notes.txt is a file, not a folder: give a "
      "folder\n")
  assert (tmp_path / "notes.txt").read_text() == "my notes"
  assert sorted(os.listdir(tmp_path)) == ["notes.txt"]


def test_eval_only_refuses_a_workdir_without_a_best_checkpoint_writing_nothing(tmp_path):
  """A run stopped before its first epoch ended has settings but nothing to test."""
  (tmp_path / "config.json").write_text(default.get_config().to_json())
  with pytest.raises(settings.SettingError, match=re.escape(
      f"--workdir={tmp_path} holds no best checkpoint yet (one is saved at each epoch's end): "
      "train it first, without --eval_only")):
    workdir_lib.check_trained(str(tmp_path))
  assert os.listdir(tmp_path) == ["config.json"]
  (tmp_path / "checkpoints" / "best" / "15").mkdir(parents=True)
  workdir_lib.check_trained(str(tmp_path))


def test_a_cache_dir_that_cannot_be_written_is_named_before_anything_is_written(
    tmp_path, monkeypatch):
  """A read-only mount as os.access reports it (emulated: root may write in any folder),
  and a file on the way to the folder."""
  config = default.get_config()
  (tmp_path / "mounted").mkdir()
  config.cache_dir = str(tmp_path / "mounted" / "cache")
  with monkeypatch.context() as m:
    m.setattr(os, "access", lambda path, mode: path != str(tmp_path / "mounted"))
    with pytest.raises(settings.SettingError, match=re.escape(
        f"--config.cache_dir={tmp_path}/mounted/cache: cannot write in {tmp_path}/mounted")):
      settings.check(str(tmp_path / "run"), config)
  (tmp_path / "notes.txt").write_text("my notes")
  config.cache_dir = str(tmp_path / "notes.txt" / "cache")
  with pytest.raises(settings.SettingError, match=re.escape(
      f"--config.cache_dir={tmp_path}/notes.txt/cache: {tmp_path}/notes.txt is a file, not a "
      "folder")):
    settings.check(str(tmp_path / "run"), config)
  assert sorted(os.listdir(tmp_path)) == ["mounted", "notes.txt"]
  assert not os.listdir(tmp_path / "mounted")


def test_each_mistake_costs_one_line_and_the_corrected_command_trains_in_that_workdir(
    tiny_flags, tmp_path):
  """As a user types them, one after another on one workdir: each mistake exits 2 with
  one line naming the culprit, before TensorFlow loads and before anything is written;
  then the corrected command trains there (and resumes after a Ctrl-C). One mistake of
  each kind (a value out of range stands for every field's range, which
  test_a_bad_setting_is_named_before_anything_is_written checks in this process)."""
  workdir = tmp_path / "run"
  def main(*flags):
    given = {flag.split("=")[0] for flag in flags}
    tiny = [flag for flag in tiny_flags(num_epochs=1) if flag.split("=")[0] not in given]
    return subprocess.run([sys.executable, "-m", "ntxr.main", f"--workdir={workdir}",
                           *tiny, *flags], capture_output=True, text=True, check=False)
  for flags, culprit in [
      ([f"--config.data_dir={tmp_path}/Clotho"], f"--config.data_dir={tmp_path}/Clotho"),
      (["--config.batch_size=0"], "--config.batch_size must be at least 2, not 0"),
      (["--config.batchsize=4"], "--config.batchsize: no such config field; did you mean "
                                 "--config.batch_size?"),
      (["--objective=soft"], "--config.objective=soft compares captions: set "
                             "--config.similarity"),
      ([f"--config.word_vectors={tmp_path}/vectors.bin"],
       f"--config.word_vectors={tmp_path}/vectors.bin: no such file"),
      (["--strategy=random", "--strategy=hard_cross"], "--strategy is given twice"),
      (["--config.channels=(4,8,8,8,8)", "--config.channels=(4,8,8,8,8)"],
       "--config.channels is given twice"),
      (["--objective=infonce", "--strategy=random"], "--objective=infonce takes no "
                                                     "--strategy"),
      ([f"--config={tmp_path}/paper.py"], f"--config={tmp_path}/paper.py: no such file"),
      (["--eval_only"], f"--workdir={workdir} holds no trained run (no config.json): "
                        "--eval_only tests one; give its workdir"),
  ]:
    done = main(*flags)
    assert done.returncode == 2, (flags, done.stderr[-2000:])
    assert done.stderr.startswith(f"error: {culprit}") and done.stderr.count("\n") == 1, (
        flags, done.stderr)
    assert not workdir.exists()
  # The corrected command, stopped by Ctrl-C once its step-5 checkpoint is written:
  # status 130 and one line saying how to resume; the same command then finishes.
  corrected = [sys.executable, "-m", "ntxr.main", f"--workdir={workdir}",
               *tiny_flags(num_epochs=1, checkpoint_every_steps=5)]
  run = subprocess.Popen(corrected, stderr=subprocess.PIPE, text=True)
  while not (workdir / "checkpoints" / "latest" / "5").exists():
    assert run.poll() is None, run.stderr.read()[-3000:]
    time.sleep(0.05)
  run.send_signal(signal.SIGINT)
  stderr = run.communicate(timeout=300)[1]
  assert run.returncode == 130, stderr[-3000:]
  assert "Traceback" not in stderr
  assert re.fullmatch(r"stopped: as asked \(Ctrl-C\), training stopped after step \d+ "
                      r"\(epoch \d\), saved in .*/checkpoints/latest: rerun the same command "
                      r"to resume from there", stderr.strip().splitlines()[-1])
  done = subprocess.run(corrected, capture_output=True, text=True, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "Traceback" not in done.stderr
  assert json.loads((workdir / "results.json").read_text())["epochs"] == 1


def test_a_value_with_a_leading_dash_or_a_second_flagfile_is_no_flag_given_twice(tmp_path):
  """As absl reads them: `--flag VALUE` is one flag whatever VALUE starts with, and every
  --flagfile is read. A flag given twice in that form is still refused."""
  def main(*flags):
    return subprocess.run([sys.executable, "-m", "ntxr.main", "--check_settings", *flags],
                          capture_output=True, text=True, check=False)
  negatives = ["--config.relevance_offset", "-2", "--config.relevance_slope", "-2"]
  done = main(*negatives)
  assert (done.returncode, done.stderr) == (0, "")
  config = cli.config_of(negatives)  # what a sweep reads after --
  assert (config.relevance_offset, config.relevance_slope) == (-2, -2)
  done = main("--config.relevance_offset", "-2", "--config.relevance_offset", "-3")
  assert (done.returncode, done.stderr) == (
      2, "error: --config.relevance_offset is given twice: give it once\n")
  (tmp_path / "strategy").write_text("--strategy=random\n")
  (tmp_path / "objective").write_text("--objective=infonce\n")
  done = main(f"--flagfile={tmp_path}/strategy", "--flagfile", f"{tmp_path}/objective")
  assert done.returncode == 2 and done.stderr.startswith(
      "error: --objective=infonce takes no --strategy"), done.stderr  # both files read


def test_ctrl_c_in_a_commands_first_seconds_costs_one_line(tiny_flags, tiny_run, tmp_path):
  """Ctrl-C (SIGINT) at seeded moments of the commands' first seconds, while their
  modules, JAX and TensorFlow load and the data is read (before training's own handler):
  each exits at once with status 130 and the one line saying to rerun, never a
  traceback, never going on. The commands run side by side; ntxr.main at three moments.
  (From 0.5 s: before that the interpreter itself may still be starting, which no
  program can answer for.)"""
  workdir = tmp_path / "trained"
  shutil.copytree(tiny_run, workdir)  # search takes its lock
  rng = random.Random(44)
  commands = [
      *[(rng.uniform(0.5, 5.0), ["ntxr.main", f"--workdir={tmp_path}/run{i}", *tiny_flags()])
        for i in range(3)],
      (rng.uniform(0.5, 2.0), ["ntxr.data.prepare", *tiny_flags()]),
      (rng.uniform(0.5, 2.0), ["ntxr.search", f"--workdir={workdir}",
                               f"--audio_dir={RECORDINGS}", "--query=a bell rings"]),
      (rng.uniform(0.5, 2.0), ["ntxr.sweep", f"--root={tmp_path}/sweep", "--strategies=random",
                               "--seeds=0", "--", *tiny_flags()])]
  started = time.monotonic()
  processes = [subprocess.Popen([sys.executable, "-m", *args], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True) for _, args in commands]
  for moment, process in sorted(zip([m for m, _ in commands], processes), key=lambda p: p[0]):
    time.sleep(max(0.0, started + moment - time.monotonic()))
    process.send_signal(signal.SIGINT)
  for (moment, args), process in zip(commands, processes):
    stderr = process.communicate(timeout=120)[1]
    assert (process.returncode, stderr) == (130, f"{ctrl_c.INTERRUPTED}\n"), (
        args[0], f"{moment:.2f} s", stderr[-3000:])


@pytest.mark.parametrize("args, message", [
    (["--config=/no/paper.py"], "--config=/no/paper.py: no such file"),
    (["--config", "/no/paper.py:clotho", "--config.size=tiny"],
     "--config=/no/paper.py:clotho: no such file"),
    (["--config=/"], "--config=/: a folder, not a config file"),
])
def test_a_config_file_that_is_not_there_is_named_in_one_line(args, message, capsys):
  """Not ml_collections' chained tracebacks, nor a --config.FIELD blamed for it."""
  with pytest.raises(SystemExit) as exited:
    cli.config_of(args)
  assert (exited.value.code, capsys.readouterr().err) == (2, f"error: {message}\n")


@pytest.mark.parametrize("flag, message", [
    ("--config.batchsize=4", "--config.batchsize: no such config field; did you mean "
     "--config.batch_size?"),
    ("--config.plateau.factr=0.5", "--config.plateau.factr: no such config field; did you "
     "mean --config.plateau.factor?"),
])
def test_a_mistyped_config_field_names_the_closest_in_one_line(tmp_path, flag, message):
  done = subprocess.run([sys.executable, "-m", "ntxr.main", flag, f"--workdir={tmp_path}/run"],
                        capture_output=True, text=True, check=False)
  assert (done.returncode, done.stderr) == (2, f"error: {message}\n")
  assert not (tmp_path / "run").exists()



@pytest.mark.parametrize("args, message", [
    (["ntxr.main", "semihard_cross"], "unexpected arguments ['semihard_cross']: flags are "
     "given as --name=value"),
    (["ntxr.main", "--strategy=semihard"], "flag --strategy=semihard: value should be one "
     "of <easy_audio|easy_text|full_batch|hard_audio|hard_cross|hard_text|random|"
     "semihard_cross>"),
    (["ntxr.dcase"], "give --predictions and what to score it against: --ground_truth "
     "(2022-2024), --relevance (2025) or --graded_relevance"),
    (["ntxr.sweep", "--seeds=0", "--config.num_epochs=2"], "--config.num_epochs=2: the runs' "
     "flags go after --, as in python -m ntxr.sweep --strategies=random -- "
     "--config.num_epochs=2"),
    (["ntxr.sweep", "random"], "unexpected arguments ['random']: the runs' flags go after --"),
])
def test_a_usage_mistake_costs_one_line_and_status_2(args, message, tmp_path):
  """Not absl's page of help before the message, nor its status 1 (a failure)."""
  done = subprocess.run([sys.executable, "-m", *args, f"--workdir={tmp_path}/run"
                         if args[0] == "ntxr.main" else f"--root={tmp_path}/sweep"
                         if args[0] == "ntxr.sweep" else f"--output_json={tmp_path}/s.json"],
                        capture_output=True, text=True, check=False)
  assert (done.returncode, done.stderr, done.stdout) == (2, f"error: {message}\n", "")
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--", "--eval_only"], "only --config flags can be given to runs trained together "
     "(Unknown command line flag 'eval_only')"),
    (["--", "--config.num_epoch=2"], "--config.num_epoch: no such config field; did you "
     "mean --config.num_epochs?"),
    (["--processes=2"], "--together trains every run in this one process: leave out "
     "--processes and --gpus"),
    (["--", "--config.seed=3"], "--config.seed=3: the sweep sets it for each run (--seeds, "
     "--root, --strategies, --objectives): leave it out after --"),
])
def test_a_together_sweep_refuses_what_it_cannot_pass_on_in_one_line(tmp_path, args, message):
  done = subprocess.run([sys.executable, "-m", "ntxr.sweep", f"--root={tmp_path}/sweep",
                         "--together", *args], capture_output=True, text=True, check=False)
  assert (done.returncode, done.stderr) == (2, f"error: {message}\n")
  assert not (tmp_path / "sweep").exists()


def test_prepare_prepares_what_training_reads_and_measures_its_batches(tiny_flags):
  done = subprocess.run([sys.executable, "-m", "ntxr.data.prepare", *tiny_flags()],
                        capture_output=True, text=True, check=False)
  assert (done.returncode, done.stderr) == (0, "")
  summary, pipeline = done.stdout.splitlines()[-2:]  # after "Preparing ..." the first time
  assert re.fullmatch(r"generate: [\d.]+ s, prepare: [\d.]+ s, skipped clips or rows: 0, "
                      r"vocabulary: 60", summary), summary
  # 24 training clips of 5 captions, in batches of 8 (the last partial batch dropped).
  assert re.fullmatch(r"input pipeline: 15 batches of 8 in [\d.]+ s = [\d.]+ batches/s",
                      pipeline), pipeline


def test_preparing_a_missing_folder_says_so_in_one_line(tmp_path):
  done = subprocess.run([sys.executable, "-m", "ntxr.data.prepare",
                         f"--config.data_dir={tmp_path}/Clotho", f"--config.cache_dir={tmp_path}"],
                        capture_output=True, text=True, check=False)
  assert (done.returncode, done.stderr) == (
      2, f"error: --config.data_dir={tmp_path}/Clotho: no such folder; pass a Clotho v2 or "
      "AudioCaps folder, or one holding captions.csv\n")
