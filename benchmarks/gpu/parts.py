"""What bounds a GPU extraction, part by part, each alone on the card: decode, copy, model (eager and compiled).

    python benchmarks/gpu/parts.py --backbone resnet50 --root <imagefolder> [--device cuda] [--batch 256]

- nvJPEG: torchvision.io.decode_jpeg on a batch of JPEG bytes, then ftl's resize and crop on the
  device (ftl.pipeline.device_decode), as ftl's actors do with extract.decode=device.
- host → device: decoded uint8 batches from pinned memory, as ftl copies CPU-decoded pixels.
- model: the tapped backbone (bf16 autocast on GPUs, channels_last) on batches already on the
  device, eager and with torch.compile; one untimed warm-up (and compile) first.
Each prints images/s; none includes the others, so the slowest is the bound of the pipeline.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import images
from contenders import common

from gpu import common as gpu


def rate(step, batches: int, images_per_batch: int, sync) -> float:
    step()  # warm-up: cuDNN/oneDNN set-up, nvJPEG handles, compilation
    sync()
    t = time.perf_counter()
    for _ in range(batches):
        step()
    sync()
    return batches * images_per_batch / (time.perf_counter() - t)


def main() -> None:
    p = gpu.parser(__doc__)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--batches", type=int, default=40, help="timed batches per part")
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    import numpy as np
    import torch

    from ftl.model import imaging
    from ftl.pipeline import device_decode

    s = gpu.settings(args, batch=args.batch)
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    files = images.paths(Path(args.root))[: args.batch]
    blobs = [Path(f).read_bytes() for f in files]
    tap, spec, _ = common.model(s | {"threads": torch.get_num_threads()})
    pre, dev = spec.preprocess, torch.device(args.device)
    decoder = device_decode.DeviceDecoder(pre, args.device, common.max_pixels())

    def nvjpeg():
        decoded = decoder.decode_jpegs(blobs)
        device_decode.resize_crop(torch.stack(decoded), pre)

    host = torch.from_numpy(np.stack([imaging.decode_one(b, pre, max_pixels=common.max_pixels())[0] for b in blobs]))
    host = host.pin_memory() if cuda else host
    on_device = host.to(dev)

    def model(m):
        def step():
            with torch.inference_mode(), common.autocast(s):
                out = m(on_device)
            [v.float().cpu() for v in out.values()]
        return step

    rows = [("nvJPEG decode + resize/crop on the device" if cuda else "decode_jpeg + resize/crop (CPU)", nvjpeg),
            ("host -> device copy, pinned, uint8", lambda: host.to(dev, non_blocking=True)),
            ("model, eager, bf16, channels_last" if cuda else "model, eager", model(tap))]
    if not args.no_compile:
        compiled = common.model(s | {"threads": torch.get_num_threads(), "compile": True})[0]
        rows.append(("model, torch.compile" + (", bf16, channels_last" if cuda else ""), model(compiled)))
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"{args.backbone} on {name}, batch {args.batch}, {len(set(files))} distinct JPEGs cycled")
    for label, step in rows:
        t = time.perf_counter()
        r = rate(step, args.batches, args.batch, sync)
        print(f"  {label:<50} {r:>9.0f} img/s   ({time.perf_counter() - t:.0f}s with warm-up)", flush=True)


if __name__ == "__main__":
    main()
