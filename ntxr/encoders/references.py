"""The publishers' PyTorch code that ntxr's encoders are compared with (tests/test_encoder_*.py)
and timed against (`python -m ntxr.bench --jobs=encoders`), imported beside torch's CPU wheel.

Importing this module imports none of them: each function imports its reference when called.
They are the test extra's (`pip install 'ntxr[test]'`), not ntxr's own dependencies; `missing`
names those an encoder's reference lacks.

The test extra installs torch's CPU build, and from PyPI hear21passt's timm (which imports
torchvision) and torchaudio, whose wheels are CUDA builds: their compiled extensions
cannot load beside the CPU torch. No reference uses those compiled parts: transformers
only probes for torchvision, and hear21passt takes from timm its download helper (for
pretrained weights, never used here) and from torchaudio its pure-PyTorch Kaldi mel banks
and masking. Where an extension fails to load, torchvision is hidden from transformers
and stood in for where hear21passt imports it; where builds match, the packages load as
they are.
"""

import functools
import importlib.util
import sys
import types

# The modules each encoder's reference imports, by ntxr's encoder name.
PACKAGES = {"cnn14": ("torch", "panns_inference", "torchlibrosa", "librosa"),
            "passt": ("torch", "hear21passt", "torchaudio"),
            "bert": ("torch", "transformers"), "roberta": ("torch", "transformers")}


def missing(encoders) -> list:
  """The modules of PACKAGES that the references of `encoders` need and are not installed
  (looked up, not imported)."""
  needed = dict.fromkeys(name for encoder in encoders for name in PACKAGES[encoder])
  return [name for name in needed if importlib.util.find_spec(name) is None]


def _forget(package: str) -> None:
  for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
    del sys.modules[name]


@functools.cache
def _torchvision_loads() -> bool:
  try:
    import torchvision  # pylint: disable=unused-import,import-outside-toplevel
  except (ImportError, RuntimeError, OSError):  # not installed, or "operator torchvision::nms
    # does not exist"
    _forget("torchvision")
    sys.modules["torchvision"] = None  # an ImportError for whoever looks for it
    return False
  return True


@functools.cache
def transformers():
  """The transformers package."""
  _torchvision_loads()
  import transformers as package  # pylint: disable=import-outside-toplevel
  return package


@functools.cache
def panns_cnn14():
  """panns_inference.models.Cnn14, imported without the package's __init__, which
  downloads AudioSet's label list at import."""
  if "panns_inference" not in sys.modules:
    package = types.ModuleType("panns_inference")
    package.__path__ = list(importlib.util.find_spec("panns_inference").submodule_search_locations)
    sys.modules["panns_inference"] = package
  from panns_inference.models import Cnn14  # pylint: disable=import-outside-toplevel
  return Cnn14


@functools.cache
def hear21passt() -> types.SimpleNamespace:
  """hear21passt's base, passt (as `reference`) and preprocess modules."""
  stand_ins = {}
  if not _torchvision_loads():  # then timm cannot load: its download helper stood in for
    _forget("timm")
    hub = types.ModuleType("timm.models._hub")

    def download_cached_file(*args, **kwargs):
      raise RuntimeError("the tests download nothing")

    hub.download_cached_file = download_cached_file
    stand_ins = {"timm": types.ModuleType("timm"), "timm.models": types.ModuleType("timm.models"),
                 "timm.models._hub": hub}
    sys.modules.update(stand_ins)
  try:
    import torchaudio  # pylint: disable=unused-import,import-outside-toplevel
  except OSError:  # its _torchaudio.so needs libc10_cuda.so
    _forget("torchaudio")
    extension = types.ModuleType("torchaudio._extension")
    extension._IS_TORCHAUDIO_EXT_AVAILABLE = False  # pylint: disable=protected-access
    extension._IS_ALIGN_AVAILABLE = False  # pylint: disable=protected-access
    extension.fail_if_no_align = lambda function: function
    extension._load_lib = lambda name: False  # pylint: disable=protected-access
    sys.modules["torchaudio._extension"] = extension
  # pylint: disable=import-outside-toplevel
  from hear21passt import base
  from hear21passt.models import passt as reference
  from hear21passt.models import preprocess
  for name in stand_ins:
    del sys.modules[name]
  return types.SimpleNamespace(base=base, reference=reference, preprocess=preprocess)
