"""Contender (a): the model alone on pixels decoded into memory before the clock starts: the ceiling.

`unique` images (256) are decoded with ftl's own decode and cycled to reach N; one untimed batch
pays for oneDNN/cuDNN set-up. The rate is images over the timed loop; the process's wall time
(decode and model load included) is reported too, by the parent.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contenders import common


def main() -> None:
    s = common.settings()
    import images
    import numpy as np
    import torch

    from ftl.model import imaging

    tap, spec, _ = common.model(s)
    loaded = time.time()
    files = images.paths(Path(s["root"]))
    limit = common.max_pixels()
    decoded = [imaging.decode_one(Path(p).read_bytes(), spec.preprocess, max_pixels=limit)[0]
               for p in files[: s["unique"]]]
    pixels = torch.from_numpy(np.stack(decoded)).to(s["device"])
    bs, n = s["batch"], len(files)
    batches = [pixels[i : i + bs] for i in range(0, len(pixels), bs)]
    with torch.inference_mode():
        with common.autocast(s):
            tap(batches[0])  # set-up, left out of the rate
        if s["device"] == "cuda":
            torch.cuda.synchronize()
        done, first = 0, time.time()
        while done < n:
            batch = batches[(done // bs) % len(batches)][: n - done]
            with common.autocast(s):
                out = tap(batch)
            [v.float().cpu() for v in out.values()]  # the host copy ends the step, as in the other contenders
            done += len(batch)
    last = time.time()
    common.report(images=done, started=common.STARTED, loaded=loaded, first=first, first_images=0, last=last)


if __name__ == "__main__":
    main()
