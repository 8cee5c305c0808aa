"""Start-up cuts keep behaviour: torchvision comes in without torch._dynamo, and dynamo still works when asked for."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import ftl.extract.embed, ftl.model.weights
assert "torch._dynamo" not in sys.modules, "torchvision pulled in torch._dynamo"
assert "torch._dynamo.utils" not in sys.modules, "the stand-in outlived torchvision's import"
import torch
import torchvision.ops
roi = sys.modules["torchvision.ops.roi_align"]  # the package exports a function of the same name
# torchvision's own reference to the function works, and loads the real dynamo when called.
assert roi.is_compile_supported("cpu") in (True, False)
assert "torch._dynamo" in sys.modules
from torch._dynamo.utils import is_compile_supported
assert roi.is_compile_supported("cpu") == is_compile_supported("cpu")
out = torch.compile(torch.nn.Linear(3, 2), backend="eager")(torch.ones(1, 3))
assert out.shape == (1, 2)
print("ok")
"""


def test_actor_imports_leave_dynamo_until_it_is_used():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_torchvision_imported_before_ftl_is_left_as_it_is():
    code = "import torchvision, sys; import ftl.model.backbones; assert 'torch._dynamo' in sys.modules; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
