"""The built-in synthetic corpus, written in the Clotho v2 layout.

Each clip (16 kHz mono, variable length) is a scene of 1 to 3 sound events from 14
procedurally synthesised kinds, at random times, loudness and repetition, over an
optional background texture. Each clip gets five plain-English captions from a varied
grammar. Clips share event kinds, so a caption often partly fits other clips, as in
Clotho; that partial fit is what makes the choice of negatives matter.

Generation is deterministic: every clip draws from its own seed (corpus seed, split,
index), so the same arguments give the same bytes, in any process order. The corpus is
written to a temporary folder and renamed into place once complete, with a manifest.
A folder whose manifest is missing or differs is regenerated. Beside the captions,
`ntxr_events.json` holds each clip's event kinds (the truth of false negatives) and
`metadata_eval.csv` each evaluation caption's matching clips, those with its clip's event
kinds, in DCASE 2025's format (runs report t2a_multi from it).
"""

import collections
import dataclasses
import io
import json
import os
import shutil
import wave
from typing import Callable, Optional

import numpy as np

from ntxr import files, layouts, relevance
from ntxr.data import captions, workers

SAMPLE_RATE = layouts.SYNTHETIC_SAMPLE_RATE
SIZES = layouts.SYNTHETIC_SIZES
# Clip lengths in seconds: the "clotho" size's, and every other size's.
CLIP_SECONDS = {"clotho": (15.0, 30.0)}
SHORT_CLIP_SECONDS = (3.0, 6.0)
MANIFEST = "ntxr_synthetic.json"
EVENTS = "ntxr_events.json"  # each clip's event kinds: the ground truth of false negatives
GENERATOR_VERSION = 2


def _envelope(n: int, attack: float = 0.01, release: float = 0.05) -> np.ndarray:
  """Linear fade in and out over n samples (seconds given at SAMPLE_RATE)."""
  env = np.ones(n)
  a, r = min(n // 2, int(attack * SAMPLE_RATE)), min(n // 2, int(release * SAMPLE_RATE))
  env[:a] = np.linspace(0, 1, a, endpoint=False)
  if r:
    env[-r:] = np.linspace(1, 0, r)
  return env


def _time(n: int) -> np.ndarray:
  return np.arange(n) / SAMPLE_RATE


def _sweep(f0: float, f1: float, n: int) -> np.ndarray:
  """Sine whose frequency moves linearly from f0 to f1 Hz."""
  freq = np.linspace(f0, f1, n)
  return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)


def _filtered_noise(rng, n: int, cutoff: float, high: bool) -> np.ndarray:
  """White noise low- or high-passed by a one-pole filter at `cutoff` Hz."""
  # Imported here: only generation needs SciPy's signal module, slow to import.
  import scipy.signal  # pylint: disable=g-import-not-at-top
  noise = rng.standard_normal(n)
  alpha = np.exp(-2 * np.pi * cutoff / SAMPLE_RATE)
  low = scipy.signal.lfilter([1 - alpha], [1, -alpha], noise)
  out = noise - low if high else low
  return out / (np.abs(out).max() + 1e-9)


def _pulses(rng, n: int, rate: float, pulse: Callable[[int], np.ndarray],
            jitter: float = 0.0) -> np.ndarray:
  """Repeats pulse(length) every 1/rate seconds (with optional timing jitter)."""
  out = np.zeros(n)
  period = SAMPLE_RATE / rate
  position = 0.0
  while position < n:
    start = int(position)
    p = pulse(min(n - start, int(period)))
    out[start:start + len(p)] += p
    position += period * (1 + jitter * rng.uniform(-1, 1))
  return out


PITCH_HZ = {"low": 220.0, "high": 1760.0, None: 660.0}


def _tone(rng, n, pitch):
  return np.sin(2 * np.pi * PITCH_HZ[pitch] * _time(n))


def _whistle(rng, n, pitch):
  vibrato = 1 + 0.02 * np.sin(2 * np.pi * 5 * _time(n))
  return np.sin(2 * np.pi * np.cumsum(2 * PITCH_HZ[pitch] * vibrato) / SAMPLE_RATE)


def _rising(rng, n, pitch):
  return _sweep(400, 2400, n)


def _falling(rng, n, pitch):
  return _sweep(2400, 400, n)


def _siren(rng, n, pitch):
  freq = 900 + 300 * np.sin(2 * np.pi * 0.8 * _time(n))
  return np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE)


def _buzz(rng, n, pitch):
  return np.sign(np.sin(2 * np.pi * 120 * _time(n))) * 0.6


def _hiss(rng, n, pitch):
  return _filtered_noise(rng, n, 3000, high=True)


def _rumble(rng, n, pitch):
  return _filtered_noise(rng, n, 120, high=False)


def _click_pulse(length):
  return np.exp(-np.arange(min(length, 160)) / 20.0) * np.sign(np.sin(np.arange(min(length, 160))))


def _clicks(rng, n, pitch):
  return _pulses(rng, n, {"low": 3.0, "high": 12.0, None: 6.0}[pitch], _click_pulse)


def _knocks(rng, n, pitch):
  thump = lambda length: (np.sin(2 * np.pi * 150 * _time(min(length, 2400)))
                          * np.exp(-_time(min(length, 2400)) * 40))
  return _pulses(rng, n, 2.5, thump, jitter=0.2)


def _bell(rng, n, pitch):
  t = _time(n)
  base = PITCH_HZ[pitch]
  partials = sum(np.sin(2 * np.pi * base * r * t) / (k + 1)
                 for k, r in enumerate((1.0, 2.76, 5.4)))
  return partials * np.exp(-t * 2.5)


def _drips(rng, n, pitch):
  drop = lambda length: (_sweep(900, 1800, min(length, 800))
                         * np.exp(-_time(min(length, 800)) * 60))
  return _pulses(rng, n, 4.0, drop, jitter=0.5)


def _engine(rng, n, pitch):
  t = _time(n)
  hum = sum(np.sin(2 * np.pi * 55 * h * t) / h for h in (1, 2, 3, 4))
  return hum * (0.6 + 0.4 * np.sin(2 * np.pi * 9 * t))


def _bird(rng, n, pitch):
  chirp = lambda length: _sweep(3000, 5000, min(length, 1200)) * _envelope(min(length, 1200))
  return _pulses(rng, n, 5.0, chirp, jitter=0.4)


@dataclasses.dataclass(frozen=True)
class EventKind:
  """A synthesised sound: how it sounds and how captions may name it."""
  name: str
  nouns: tuple
  synth: Callable
  pitched: bool = False


EVENT_KINDS = (
    EventKind("tone", ("beep", "tone", "bleep"), _tone, pitched=True),
    EventKind("whistle", ("whistle", "whistling sound"), _whistle, pitched=True),
    EventKind("rising", ("rising chirp", "upward sweep", "rising whistle"), _rising),
    EventKind("falling", ("falling chirp", "downward sweep", "descending whistle"), _falling),
    EventKind("siren", ("siren", "wailing siren", "alarm"), _siren),
    EventKind("buzz", ("buzz", "buzzer", "harsh buzzing"), _buzz),
    EventKind("hiss", ("hiss", "hissing noise", "static"), _hiss),
    EventKind("rumble", ("rumble", "deep rumbling", "low roar"), _rumble),
    EventKind("clicks", ("clicking", "ticking", "series of clicks"), _clicks, pitched=True),
    EventKind("knocks", ("knocking", "series of knocks", "thudding"), _knocks),
    EventKind("bell", ("bell", "chime", "ringing bell"), _bell, pitched=True),
    EventKind("drips", ("dripping water", "water drops", "dripping"), _drips),
    EventKind("engine", ("engine", "motor", "idling engine"), _engine),
    EventKind("bird", ("bird", "chirping bird", "tweeting bird"), _bird),
)
BACKGROUNDS = (("hiss", ("soft static", "faint hiss")),
               ("rumble", ("distant rumble", "low background noise")))
PITCH_WORDS = {"low": ("low", "deep", "low-pitched"), "high": ("high", "shrill", "high-pitched")}
CLICK_RATE_WORDS = {"low": ("slow",), "high": ("fast", "rapid")}
LOUDNESS_WORDS = {"loud": ("loud", "strong"), "quiet": ("quiet", "soft", "faint")}
COUNT_WORDS = {1: None, 2: ("twice", "two times"), 3: ("three times", "several times")}


@dataclasses.dataclass(frozen=True)
class Event:
  kind: EventKind
  pitch: object  # "low", "high" or None
  loudness: str  # "loud" or "quiet"
  count: int     # repetitions
  onset: float   # seconds
  seconds: float  # total span


def _scene(rng: np.random.Generator, seconds: float) -> tuple:
  """Draws 1 to 3 distinct events (sorted by onset) and an optional background."""
  kinds = rng.choice(len(EVENT_KINDS), size=rng.integers(1, 4), replace=False)
  events = []
  for k in kinds:
    kind = EVENT_KINDS[k]
    count = int(rng.choice([1, 1, 2, 3])) if kind.name in ("tone", "bell", "rising",
                                                          "falling", "whistle") else 1
    span = float(rng.uniform(0.6, min(2.5, seconds * 0.6)))
    onset = float(rng.uniform(0, seconds - span))
    events.append(Event(kind, rng.choice(["low", "high"]) if kind.pitched else None,
                        str(rng.choice(["loud", "quiet"])), count, onset, span))
  events.sort(key=lambda e: e.onset)
  background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))] if rng.random() < 0.4 else None
  return events, background


def _render(rng: np.random.Generator, seconds: float, events, background) -> np.ndarray:
  """The scene's waveform, float in [-1, 1]."""
  n = int(seconds * SAMPLE_RATE)
  audio = np.zeros(n)
  if background is not None:
    kind = next(k for k in EVENT_KINDS if k.name == background[0])
    audio += 0.05 * kind.synth(rng, n, None)
  for event in events:
    gain = 0.8 if event.loudness == "loud" else 0.25
    start, length = int(event.onset * SAMPLE_RATE), int(event.seconds * SAMPLE_RATE)
    piece = length // event.count
    for r in range(event.count):
      sound_length = int(piece * 0.7) if event.count > 1 else piece
      sound = event.kind.synth(rng, sound_length, event.pitch) * _envelope(sound_length)
      begin = start + r * piece
      audio[begin:begin + sound_length] += gain * sound[:n - begin]
  return audio / max(1.0, np.abs(audio).max() / 0.95)


def _phrase(rng, event: Event, brief: bool) -> str:
  """'a loud high beep sounding twice', 'quiet dripping water'; brief drops the extras."""
  words = []
  if not brief and rng.random() < 0.7:
    words.append(rng.choice(LOUDNESS_WORDS[event.loudness]))
  if event.pitch is not None:
    table = CLICK_RATE_WORDS if event.kind.name == "clicks" else PITCH_WORDS
    words.append(rng.choice(table[event.pitch]))
  noun = rng.choice(event.kind.nouns)
  text = " ".join([*words, noun])
  countable = event.kind.name not in ("clicks", "knocks", "drips") or noun.startswith("series")
  if countable:
    text = f"{'an' if text[0] in 'aeiou' else 'a'} {text}"
  if not brief and COUNT_WORDS[event.count]:
    text += f" sounding {rng.choice(COUNT_WORDS[event.count])}"
  return text


VERBS = ("can be heard", "is heard", "sounds", "plays")
JOINERS_SEQUENTIAL = ("followed by", "and then", "before")
JOINERS_OVERLAP = ("while", "as", "together with")
OPENERS = ("", "", "first ", "there is ", "you can hear ")


def caption(rng: np.random.Generator, events, background) -> str:
  """One caption of the scene, 8 to 20 words."""
  for attempt in range(50):
    brief = attempt >= 10  # long scenes fall back to plainer phrases
    parts = [_phrase(rng, events[0], brief)]
    for previous, event in zip(events, events[1:]):
      overlap = event.onset < previous.onset + previous.seconds
      parts.append(rng.choice(JOINERS_OVERLAP if overlap else JOINERS_SEQUENTIAL))
      parts.append(_phrase(rng, event, brief))
    opener = rng.choice(OPENERS)
    text = opener + " ".join(parts)
    if opener.strip() in ("", "first"):
      text += " " + rng.choice(VERBS)
    if background is not None and rng.random() < 0.8:
      text += f" over {rng.choice(background[1])}"
    elif len(text.split()) < 8:
      text += rng.choice([" in a quiet room", " somewhere in the distance",
                          " in an empty space", " close to the microphone"])
    if 8 <= len(text.split()) <= 20:
      return text[0].upper() + text[1:] + "."
  raise RuntimeError("caption grammar found no sentence of 8 to 20 words")


def _draw(seed: int, split: int, index: int, seconds) -> tuple:
  """(the clip's generator, its length in seconds, events, background), from its seed."""
  rng = np.random.default_rng([seed, split, index])
  seconds = float(rng.uniform(*seconds))
  return (rng, seconds, *_scene(rng, seconds))


def event_kinds(seed: int, split: int, index: int, seconds=SHORT_CLIP_SECONDS) -> list:
  """The sorted names of a clip's event kinds, drawn as make_clip draws them."""
  return sorted(event.kind.name for event in _draw(seed, split, index, seconds)[2])


def make_clip(seed: int, split: int, index: int, seconds=SHORT_CLIP_SECONDS) -> tuple:
  """(16-bit PCM wav bytes, five captions) for one clip of `seconds` (a range), from its
  own seed."""
  rng, seconds, events, background = _draw(seed, split, index, seconds)
  audio = _render(rng, seconds, events, background)
  captions = [caption(rng, events, background) for _ in range(5)]
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(SAMPLE_RATE)
    w.writeframes((audio * 32767).astype("<i2").tobytes())
  return buffer.getvalue(), captions


def _make_clip_args(args):
  return make_clip(*args)


def _manifest(size: str, seed: int) -> dict:
  return dict(generator_version=GENERATOR_VERSION, size=size, seed=seed,
              sample_rate=SAMPLE_RATE,
              clips=dict(zip(layouts.SPLITS, SIZES[size])),
              seconds=list(CLIP_SECONDS.get(size, SHORT_CLIP_SECONDS)))


def _file_name(split: int, index: int) -> str:
  return f"{layouts.SPLITS[split][:3]}_{index:05d}.wav"


def _events(size: str, seed: int) -> dict:
  """{split: {file name: sorted event kinds}} of a corpus, without rendering audio."""
  seconds = CLIP_SECONDS.get(size, SHORT_CLIP_SECONDS)
  return {split: {_file_name(s, i): event_kinds(seed, s, i, seconds) for i in range(count)}
          for s, (split, count) in enumerate(zip(layouts.SPLITS, SIZES[size]))}


def _write_relevance(root: str, events: dict) -> None:
  """The test split's several matching clips per caption, in DCASE 2025's format
  (relevance.DCASE2025_FILE): the clips with exactly the caption's clip's event kinds."""
  kinds = events[layouts.SPLITS[2]]
  alike = collections.defaultdict(list)
  for name, clip_kinds in kinds.items():
    alike[tuple(clip_kinds)].append(name)
  clips, _ = captions.read_clotho_captions(
      os.path.join(root, layouts.CLOTHO_CAPTION_FILE.format(split=layouts.SPLITS[2])))
  relevant = {}
  for clip in clips:
    for text in clip.captions:
      relevant.setdefault(text, set()).update(alike[tuple(kinds[clip.file_name])])
  relevance.write_dcase2025(os.path.join(root, relevance.DCASE2025_FILE),
                            {text: sorted(names) for text, names in relevant.items()})


def read_events(root: str) -> Optional[dict]:
  """{split: {file name: event kinds}} of a built-in corpus folder; None for any other."""
  try:
    with open(os.path.join(root, EVENTS)) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def is_complete(root: str, size: str, seed: int) -> bool:
  """Whether root holds a finished corpus of these parameters."""
  try:
    with open(os.path.join(root, MANIFEST)) as f:
      return json.load(f) == _manifest(size, seed)
  except (OSError, ValueError):
    return False


def generate(root: str, size: str = "default", seed: int = 0, processes: int = 0) -> str:
  """Writes the corpus to `root` unless a complete one is there; returns root.

  Args:
    root: the corpus folder (Clotho layout: split folders and caption CSVs).
    size: a key of SIZES.
    seed: corpus seed.
    processes: worker processes (0: as many as the work warrants, see `workers.imap`).
  """
  if size not in SIZES:
    raise ValueError(f"unknown corpus size {size!r}; choose from {sorted(SIZES)}")
  if is_complete(root, size, seed):
    if not os.path.exists(os.path.join(root, EVENTS)):  # a corpus made before events.json
      files.write_json(os.path.join(root, EVENTS), _events(size, seed))
    if not os.path.exists(os.path.join(root, relevance.DCASE2025_FILE)):  # or before that
      _write_relevance(root, read_events(root))
    return root
  files.remove_left_by_dead(root)  # the partial corpora of killed processes
  partial = files.partial_path(root)
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  seconds = CLIP_SECONDS.get(size, SHORT_CLIP_SECONDS)
  jobs = [(seed, s, i, seconds) for s, count in enumerate(SIZES[size]) for i in range(count)]
  rows = {split: [] for split in layouts.SPLITS}
  for split in layouts.SPLITS:
    os.makedirs(os.path.join(partial, split))
  with workers.imap(_make_clip_args, jobs, processes, chunksize=16) as clips:
    for (_, s, i, _), (wav_bytes, texts) in zip(jobs, clips):  # each written as it arrives
      file_name = _file_name(s, i)
      with open(os.path.join(partial, layouts.SPLITS[s], file_name), "wb") as f:
        f.write(wav_bytes)
      rows[layouts.SPLITS[s]].append([file_name] + texts)
  for split in layouts.SPLITS:
    captions.write_clotho_captions(partial, split, rows[split])
  events = _events(size, seed)
  files.write_json(os.path.join(partial, EVENTS), events)
  _write_relevance(partial, events)
  with open(os.path.join(partial, MANIFEST), "w") as f:
    json.dump(_manifest(size, seed), f)
  shutil.rmtree(root, ignore_errors=True)
  os.replace(partial, root)
  return root
