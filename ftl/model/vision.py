"""torchvision, imported without torch._dynamo: a second less in every process that builds a backbone.

Every torchvision import runs torchvision.ops.roi_align, which imports `is_compile_supported`
from torch._dynamo.utils and with it all of torch._dynamo: 0.9 s of a quiet core, 1.5 s of a
busy one, in the driver and again in every model actor. ftl never calls roi_align, and
torch.compile imports dynamo itself when it runs. So, while torchvision is first imported,
`torch._dynamo.utils` is a stand-in: its `is_compile_supported` imports the real function on
first call, and any other name read from it loads the real module (should a torchvision
version import dynamo elsewhere, it gets the real thing). The stand-in leaves sys.modules once
torchvision is in, so a later `import torch._dynamo` loads the real package.
"""

from __future__ import annotations

import importlib
import sys
import types

DYNAMO_UTILS = "torch._dynamo.utils"


def real_utils() -> types.ModuleType:
    if isinstance(sys.modules.get(DYNAMO_UTILS), StandIn):
        del sys.modules[DYNAMO_UTILS]
    return importlib.import_module(DYNAMO_UTILS)


class StandIn(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):  # code that walks sys.modules asks every module for __file__ and the like
            raise AttributeError(name)
        return getattr(real_utils(), name)


def is_compile_supported(device_type) -> bool:
    return real_utils().is_compile_supported(device_type)


def load() -> types.ModuleType:
    """`import torchvision`, leaving torch._dynamo unimported where it was not imported yet."""
    stand_in = None
    if "torchvision" not in sys.modules and DYNAMO_UTILS not in sys.modules:
        stand_in = StandIn(DYNAMO_UTILS)
        stand_in.is_compile_supported = is_compile_supported
        sys.modules[DYNAMO_UTILS] = stand_in
    try:
        import torchvision  # a plain statement: tests/model/test_model_package.py reads the shipped code's imports

        return torchvision
    finally:
        if stand_in is not None and sys.modules.get(DYNAMO_UTILS) is stand_in:
            del sys.modules[DYNAMO_UTILS]


torchvision = load()
