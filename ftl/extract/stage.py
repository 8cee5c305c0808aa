"""Extract: list images → reader tasks → backbone actor pool → Parquet features (ftl.pipeline.plan).

Output layout under `extract.output`:
    _ftl.json               provenance of the feature set this folder holds
    features/part-*.parquet one row per image, one fixed_size_list column per layer
    quarantine/part-*.parquet  images that could not be read or decoded, with the reason
Images already in either folder are skipped, so a rerun does only what is missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

from ftl.config import ExtractConfig, Workflow
from ftl.errors import ExtractError
from ftl.extract.embed import Embedder, ModelSpec
from ftl.io import incremental, schema, storage
from ftl.io.sink import FEATURES, QUARANTINE, feature_sink
from ftl.model import backbones, imaging, weights
from ftl.pipeline import tuning
from ftl.pipeline.plan import Tally, blocks, build
from ftl.pipeline.runtime import ensure_ray
from ftl.sources import listing, webdataset

PROVENANCE_FILE = "_ftl.json"


@dataclass
class ExtractResult(Tally):
    output: str
    features_uri: str
    quarantine_uri: str
    feature_set: str
    provenance: dict = field(repr=False)
    shards_skipped: int = 0  # WebDataset shards finished by an earlier run, not opened
    superseded: int = 0  # old rows of images that changed since they were extracted
    gone: int = 0  # rows of images no longer in the source (kept, not deleted)
    settings: str = ""  # the hardware-dependent choices of this run (ftl.pipeline.tuning)

    def summary(self) -> str:
        lines = [self.tally(ok_as="extracted")]
        if self.superseded:
            lines.append(f"changed since last run: {self.superseded} (old rows replaced)")
        if self.shards_skipped:
            lines.append(f"shards finished by earlier runs, skipped unopened: {self.shards_skipped}")
        if self.gone:
            lines.append(f"gone from the source: {self.gone} (rows kept in the output)")
        if self.settings:
            lines.append(f"ran on {self.settings}")
        lines += [f"features:   {self.features_uri}", f"quarantine: {self.quarantine_uri}",
                  f"feature set {self.feature_set}: {self.provenance['backbone']} "
                  f"{[l['name'] for l in self.provenance['layers']]}"]
        return "\n".join(lines)


def resolve_preprocess(cfg: ExtractConfig, ref: weights.WeightsRef) -> imaging.Preprocess:
    """What the weights prescribe, with the workflow's overrides on top."""
    base = backbones.preprocess_defaults(cfg.backbone, ref.id if ref.kind == "enum" else None)
    over = {k: v for k, v in cfg.preprocess.model_dump().items() if v is not None}
    merged = {**base, **over}
    if "resize" in over and "crop" not in over:
        merged["crop"] = min(merged["crop"], merged["resize"])
    return imaging.Preprocess(merged["resize"], merged["crop"], tuple(merged["mean"]), tuple(merged["std"]))


def plan(wf: Workflow) -> tuple[ModelSpec, dict]:
    """Validate layers and resolve weights on the driver, before any Ray work starts."""
    cfg = wf.extract
    layers = backbones.check_layers(cfg.backbone, cfg.layers)
    ref = weights.resolve(cfg.backbone, cfg.weights, storage_options=wf.storage.options)
    pre = resolve_preprocess(cfg, ref)
    dims = backbones.layer_dims(cfg.backbone, layers, pooling=cfg.pooling, size=pre.crop)
    prov = schema.provenance(
        backbone=cfg.backbone,
        weights=ref.to_dict(),
        layers=[{"name": l, "column": schema.column(l), "dim": dims[l], "pooling": cfg.pooling} for l in layers],
        preprocess=asdict(pre) | {"mean": list(pre.mean), "std": list(pre.std)},
        feature_dtype=cfg.feature_dtype,
    )
    spec = ModelSpec(backbone=cfg.backbone, weights=ref, layers=tuple(layers), pooling=cfg.pooling, preprocess=pre)
    return spec, prov


def claim_output(out: storage.Location, prov: dict) -> None:
    """One output holds one feature set: a different one is an error, never a silent mix."""
    marker = out.join(PROVENANCE_FILE)
    if out.fs.exists(marker.path):
        existing = json.loads(out.fs.cat_file(marker.path))
        if existing["feature_set"] != prov["feature_set"]:
            differ = ", ".join(schema.differences(existing, prov))
            raise ExtractError(
                f"{out.uri} already holds feature set {existing['feature_set']}, which differs in: {differ}. "
                f"Set extract.output to a new location for this feature set."
            )
        return
    out.fs.makedirs(out.path, exist_ok=True)
    with out.fs.open(marker.path, "wb") as f:
        f.write(json.dumps(prov, indent=2, sort_keys=True).encode())


def run(wf: Workflow) -> ExtractResult:
    """Extract features for every listed image not yet in the output."""
    cfg = wf.extract
    started = time.perf_counter()
    spec, prov = plan(wf)
    out = storage.locate(cfg.output, wf.storage.options)
    claim_output(out, prov)
    result = ExtractResult(
        listed=0, already_done=0, ok=0, quarantined=0, retry=0, seconds=0.0, output=out.uri,
        features_uri=out.join(FEATURES).uri, quarantine_uri=out.join(QUARANTINE).uri,
        feature_set=prov["feature_set"], provenance=prov,
    )
    if wf.source.format == "webdataset":
        images, shards = webdataset_input(wf, out, result)
    else:
        images, shards = listed_input(wf, out, result), None
    if images is not None:
        sink = feature_sink(out, prov, rows_per_file=cfg.rows_per_file)
        tuned = tuning.resolve(cfg, tuning.Hardware.of_cluster(), crop=spec.preprocess.crop)
        result.settings = tuned.describe()
        pipeline(images, spec, prov, tuned=tuned, storage_options=wf.storage.options).write_datasink(sink)
        counts = sink.counts
        result.ok, result.quarantined, result.retry = counts["ok"], counts["quarantined"], counts["retry"]
        if shards is not None:  # images inside shards are counted as they stream by
            result.already_done += counts["done"]
            result.listed += sum(counts.values())
            if not result.retry:  # a shard with rows left for the next run must be opened again
                webdataset.record_finished(out, shards)
    result.seconds = time.perf_counter() - started
    processed = result.ok + result.quarantined
    if processed and result.quarantined / processed > cfg.max_error_fraction:
        raise ExtractError(
            f"{result.quarantined} of {processed} images were quarantined, over extract.max_error_fraction="
            f"{cfg.max_error_fraction}; see {result.quarantine_uri} for the reasons.\n{result.summary()}"
        )
    return result


def listed_input(wf: Workflow, out: storage.Location, result: ExtractResult):
    """Imagefolder and manifest sources: diff the listing on the driver, supersede changed rows."""
    images = listing.list_images(wf.source, storage_options=wf.storage.options)
    work = incremental.diff(images, out, (FEATURES, QUARANTINE))
    incremental.supersede(out, work.superseded)
    result.listed, result.already_done = images.num_rows, work.already_done
    result.superseded, result.gone = work.superseded_rows, work.gone
    if not work.todo.num_rows:
        return None
    ensure_ray()
    return blocks(work.todo, rows=wf.extract.decode_batch_size)


def webdataset_input(wf: Workflow, out: storage.Location, result: ExtractResult):
    """WebDataset shards: finished shards are skipped unopened, done images inside others pass by."""
    import ray

    src = wf.source
    shards = webdataset.list_shards(src, wf.storage.options)
    todo = webdataset.pending_shards(shards, out)
    result.shards_skipped = shards.num_rows - todo.num_rows
    if not todo.num_rows:
        return None, None
    ensure_ray()
    loc = storage.locate(src.uri, wf.storage.options)
    done = ray.put(webdataset.done_keys(out, (FEATURES, QUARANTINE)))
    ds = ray.data.read_webdataset(
        [storage.strip_scheme(u) for u in todo["uri"].to_pylist()], filesystem=storage.arrow_filesystem(loc),
        decoder=None,
    )
    versions = {u: (v, s) for u, v, s in zip(*(todo[c].to_pylist() for c in ("uri", "version", "split")))}
    images = ds.map_batches(
        webdataset.to_images, batch_format="pyarrow", batch_size=wf.extract.decode_batch_size,
        fn_kwargs={"shards": versions, "done": done, "image_keys": src.image_keys, "label_key": src.label_key},
    )
    return images, todo


def pipeline(images, spec: ModelSpec, prov: dict, *, tuned: tuning.Tuning, storage_options: dict):
    """The extract plan: images (listed rows or inline bytes) → reader tasks → a pool of backbone Embedders."""
    kwargs = {"spec": spec, "prov": prov, "runtime": tuned.runtime, "storage_options": storage_options or None}
    return build(images, actor=Embedder, actor_kwargs=kwargs, pre=spec.preprocess, tuned=tuned,
                 storage_options=storage_options)
