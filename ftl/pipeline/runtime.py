"""Where a stage runs: the Ray runtime it joins, and what every model actor sets up on its device."""

from __future__ import annotations

import contextlib
import os
import threading

import numpy as np
import pyarrow as pa
import torch

from ftl.io import schema
from ftl.model import imaging
from ftl.pipeline import allocator, device_decode
from ftl.pipeline.progress import report
from ftl.pipeline.ray_session import ensure_ray  # noqa: F401  (where the stages import it from)
from ftl.pipeline.tuning import Runtime

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str) -> str:
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda but this worker sees no GPU; set the stage's device to auto or cpu")
    return "cuda" if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()) else "cpu"


def place(module: torch.nn.Module, *, device: str, channels_last: bool, compile: bool) -> torch.nn.Module:
    """A backbone Tap on its device, in its memory format, compiled if asked."""
    module = module.to(device)
    module = module.to(memory_format=torch.channels_last) if channels_last else module
    if compile:
        # Static shapes: every call gets a full batch (ModelActor.inputs pads), so one graph serves all.
        module.body = torch.compile(module.body, dynamic=False)
    return module


class ModelActor:
    """Ray Data callable class: picks its device once, loads in __init__, computes in __call__.

    Subclasses load their model and define `forward` (pixels on the device → outputs) and
    `rows` (the batch, its outputs and row status → an Arrow table).
    """

    def __init__(self, runtime: Runtime, *, pre: imaging.Preprocess, progress=None):
        self.runtime, self.progress = runtime, progress  # progress: the run's ftl.pipeline.progress counter
        self.device = pick_device(runtime.device)
        allocator.reuse_freed_memory()
        # Ray sets OMP_NUM_THREADS to the actor's num_cpus (often 1); on CPU the model should
        # use the cores, which reader tasks share (they are light next to the model).
        threads = runtime.torch_threads or (len(os.sched_getaffinity(0)) if self.device == "cpu" else None)
        if threads:
            torch.set_num_threads(threads)
        self.dtype = AUTOCAST[runtime.precision]
        self.pad_to = runtime.batch_size if runtime.compile else None
        self.decoder = (device_decode.DeviceDecoder(pre, self.device, runtime.max_image_pixels)
                        if runtime.decode == "device" else None)
        self.local = threading.local()  # a CUDA stream per thread when batches run concurrently

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        rt = self.runtime
        return place(module, device=self.device, channels_last=rt.channels_last, compile=rt.compile)

    def autocast(self):
        return torch.autocast(self.device, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def inputs(self, pixels: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, int]:
        """(N, H, W, 3) uint8 on the host or the device → on the device, padded for a compiled model; and N."""
        x = torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels
        if x.device.type != self.device:
            x = device_decode.to_device(x, torch.device(self.device))
        n = len(x)
        if self.pad_to and n % self.pad_to:
            x = torch.cat([x, x.new_zeros((self.pad_to - n % self.pad_to, *x.shape[1:]))])
        return x, n

    def stream(self):
        """This thread's CUDA stream, so that two concurrent batches overlap copies and compute."""
        if self.device != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self.local, "stream"):
            self.local.stream = torch.cuda.Stream()
        return torch.cuda.stream(self.local.stream)

    def pixels(self, batch: dict[str, np.ndarray], ok: np.ndarray, stage: np.ndarray, error: np.ndarray):
        """The ok rows' pixels; rows the device decoder could not decode are marked in place."""
        if self.decoder is None:
            return batch["pixels"][ok]
        _, pixels, failed = self.decoder(batch, np.flatnonzero(ok))
        for row, reason in failed.items():
            ok[row], stage[row], error[row] = False, "decode", reason
        return pixels

    def forward(self, pixels):
        raise NotImplementedError

    def rows(self, batch: dict[str, np.ndarray], out, ok: np.ndarray, stage: np.ndarray, error: np.ndarray) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = (batch["error"] == schema.ERROR_NONE) & (batch["stage"] != schema.STAGE_DONE)
        stage, error = batch["stage"].copy(), batch["error"].copy()
        with self.stream():
            pixels = self.pixels(batch, ok, stage, error) if ok.any() else []
            out = self.forward(pixels) if len(pixels) else None
        done = int((batch["stage"] == schema.STAGE_DONE).sum())
        report(self.progress, ok=int(ok.sum()), failed=len(ok) - int(ok.sum()) - done, done=done)
        return self.rows(batch, out, ok, stage, error)
