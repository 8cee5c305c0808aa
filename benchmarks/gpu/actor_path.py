"""ftl's actor path without Ray: the Embedder actor class fed by a thread pool of ftl's reader functions.

    python benchmarks/gpu/actor_path.py --backbone resnet50 --root <imagefolder> [--device cuda]

The same plan, tuning and code as `ftl extract` (reader batches → actor batches of
extract.batch_size, `concurrent_batches` calls at once, a CUDA stream each), minus Ray: no
object store, no task scheduling, no worker processes. Set against the full pipeline on the
same card, the difference is what Ray's transfers and scheduling cost; set against the model
alone (parts.py), what decoding and the actor's own work cost.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from contenders import common

from gpu import common as gpu


def numpy_batch(table) -> dict:
    """A pyarrow table as Ray Data's numpy batch format hands it to an actor: one array per column."""
    import numpy as np
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        column = table[name].combine_chunks()
        if isinstance(column.type, pa.ExtensionType):  # Ray's tensor column: CPU-decoded pixels
            out[name] = column.to_numpy_ndarray()
        elif pa.types.is_binary(column.type) or pa.types.is_string(column.type):
            out[name] = np.array(column.to_pylist(), dtype=object)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


def failures(rows) -> int:
    from ftl.io import schema

    return sum(e != schema.ERROR_NONE for e in rows["error"].to_pylist())


def main() -> None:
    p = gpu.parser(__doc__)
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "device"], help="ftl's extract.decode")
    p.add_argument("--readers", type=int, default=max(1, len(os.sched_getaffinity(0)) - 2), help="reader threads")
    args = p.parse_args()
    import pyarrow as pa

    from ftl import config
    from ftl.extract import stage
    from ftl.extract.embed import Embedder
    from ftl.pipeline import plan, tuning
    from ftl.sources import listing

    s = gpu.settings(args, decode=args.decode)
    started = time.perf_counter()
    wf = config.validate(common.workflow_data(s), source="benchmark")
    spec, prov = stage.model_spec(wf)
    cpus = float(len(os.sched_getaffinity(0)))
    tuned = tuning.settings_for(wf.extract, tuning.Hardware(gpus=int(args.device == "cuda"), node_cpus=(cpus,)),
                           crop=spec.preprocess.crop)
    rt = tuned.runtime
    actor = Embedder(spec, prov=prov, runtime=rt)
    loaded = time.perf_counter()
    todo = listing.list_unique(wf.source)[0]
    reader = plan.READERS[rt.decode]
    kwargs = {"pre": spec.preprocess, "max_pixels": rt.max_image_pixels, "max_bytes": None, "storage_options": None}
    blocks = [todo.slice(i, tuned.reader_batch_size) for i in range(0, todo.num_rows, tuned.reader_batch_size)]
    done = failed = 0
    first = None
    with ThreadPoolExecutor(args.readers) as readers, ThreadPoolExecutor(tuned.concurrent_batches) as calls:
        read = readers.map(lambda b: reader(b, **kwargs), blocks)
        pending, running = [], []
        for table in read:
            pending.append(table)
            if sum(t.num_rows for t in pending) >= rt.batch_size:
                running.append(calls.submit(actor, numpy_batch(pa.concat_tables(pending))))
                pending = []
            while len(running) > tuned.prefetch_batches:
                rows = running.pop(0).result()
                done, failed = done + rows.num_rows, failed + failures(rows)
                first = first or (time.perf_counter(), done)
        if pending:
            running.append(calls.submit(actor, numpy_batch(pa.concat_tables(pending))))
        for f in running:
            rows = f.result()
            done, failed = done + rows.num_rows, failed + failures(rows)
            first = first or (time.perf_counter(), done)
    ended = time.perf_counter()
    streaming = f"{(done - first[1]) / (ended - first[0]):.0f} img/s" if done > first[1] else "one batch: no"
    print(f"{args.backbone}: actor path without Ray on {tuned.describe()}; {args.readers} reader threads")
    print(f"  {done} images ({failed} failed) in {ended - started:.1f}s: {done / (ended - started):.0f} img/s with "
          f"model load ({loaded - started:.1f}s), {streaming} streaming")


if __name__ == "__main__":
    main()
