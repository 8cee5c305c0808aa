"""Contender (b): a tuned hand-written loop: DataLoader workers decode, the model runs, pyarrow writes Parquet.

The same decode, resize and crop as ftl (`ftl.model.imaging.decode_one` on the file's bytes), the
same tapped backbone, torch threads and batch size as ftl's actor, the same Parquet columns and
rows per file. One decode worker per core, each single-threaded, with batches prefetched, as
ftl's reader tasks share the cores with its actor.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contenders import common


class Decoded:
    """Image files → (uint8 HWC pixels, width, height, index), decoded as ftl's reader tasks decode."""

    def __init__(self, files: list[str], pre, max_pixels: int):
        self.files, self.pre, self.max_pixels = files, pre, max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        import torch

        from ftl.model import imaging

        pixels, width, height = imaging.decode_one(Path(self.files[i]).read_bytes(), self.pre,
                                                   max_pixels=self.max_pixels)
        return torch.from_numpy(pixels), width, height, i


def one_thread(_worker: int) -> None:
    import torch

    torch.set_num_threads(1)  # loader workers only decode; more threads there would fight the model


def main() -> None:
    s = common.settings()
    import _common
    import images
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from ftl.io import schema

    tap, spec, prov = common.model(s)
    loaded = time.time()
    files = images.paths(Path(s["root"]))
    table_schema = schema.features(prov)
    out = Path(s["output"])
    out.mkdir(parents=True, exist_ok=True)
    workers = s["loader_workers"]
    loader = torch.utils.data.DataLoader(
        Decoded(files, spec.preprocess, common.max_pixels()), batch_size=s["batch"], num_workers=workers,
        worker_init_fn=one_thread, pin_memory=s["device"] == "cuda", prefetch_factor=4 if workers else None)
    pending, parts, done, first, first_images = [], 0, 0, None, 0
    with torch.inference_mode():
        for pixels, widths, heights, idx in loader:
            with common.autocast(s):
                feats = tap(pixels.to(s["device"], non_blocking=True))
            feats = {k: v.float().cpu().numpy() for k, v in feats.items()}
            pending.append(_common.rows_table(files, idx.tolist(), widths, heights, feats, prov, table_schema))
            done += len(idx)
            if sum(p.num_rows for p in pending) >= s["rows_per_file"] or done == len(files):
                pq.write_table(pa.concat_tables(pending), out / f"part-{parts:05d}.parquet")
                pending, parts = [], parts + 1
            if first is None:
                first, first_images = time.time(), done
    common.report(images=done, started=common.STARTED, loaded=loaded, first=first, first_images=first_images,
                  last=time.time())


if __name__ == "__main__":
    main()
