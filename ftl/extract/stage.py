"""Extract: list images → reader tasks → backbone actor pool → a Delta table of features (ftl.pipeline.plan).

Output layout under `extract.output`:
    _ftl.json     provenance of the feature set this folder holds
    _ftl.lease    the lease of the run writing it now
    features/     a Delta table: one row per image, one float vector column per layer
    quarantine/   a Delta table: images that could not be read or decoded, with the reason
Images already in either table are skipped, so a rerun does only what is missing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ftl import logs
from ftl.config import ExtractConfig, Workflow
from ftl.errors import ExtractError
from ftl.extract.embed import Embedder, ModelSpec, ship
from ftl.io import distributed_diff, incremental, output, schema, storage, table
from ftl.io.sink import FEATURES, QUARANTINE, feature_sink
from ftl.model import backbones, imaging, weights
from ftl.pipeline import tuning
from ftl.pipeline.plan import Tally, blocks, build, write
from ftl.pipeline.progress import Progress
from ftl.pipeline.runtime import ensure_ray
from ftl.sources import distributed, listing, webdataset


@dataclass
class ExtractResult(Tally):
    output: str
    features_uri: str
    quarantine_uri: str
    feature_set: str
    provenance: schema.Provenance = field(repr=False)
    duplicates: int = 0  # rows of a manifest naming an image already listed: one image, extracted once
    shards_skipped: int = 0  # WebDataset shards finished by an earlier run, not opened
    superseded: int = 0  # old rows of images that changed since they were extracted
    gone: int = 0  # rows of images no longer in the source (kept, not deleted)
    settings: str = ""  # the hardware-dependent choices of this run (ftl.pipeline.tuning)
    versions: dict = field(default_factory=dict)  # table folder → its version after this run
    ended: float = field(default_factory=time.time)  # wall clock at the end: the MLflow run spans ended - seconds

    def summary(self) -> str:
        lines = [self.tally(ok_as="extracted")]
        if self.retry:
            lines.append(f"{self.retry} could not be read (timeouts, throttling, permissions) and will be retried "
                         f"by the next run")
        if self.duplicates:
            lines.append(f"duplicates in the listing: {self.duplicates} (listed once)")
        if self.superseded:
            lines.append(f"changed since last run: {self.superseded} (old rows replaced)")
        if self.shards_skipped:
            lines.append(f"shards finished by earlier runs, skipped unopened: {self.shards_skipped}")
        if self.gone:
            lines.append(f"gone from the source: {self.gone} (rows kept in the output)")
        if self.settings:
            lines.append(f"ran on {self.settings}")
        lines.append(f"features:   {self.features_uri}{version(self.versions.get(FEATURES))}")
        if self.quarantined:  # the reasons, where this run put them
            lines.append(f"quarantine: {self.quarantine_uri}{version(self.versions.get(QUARANTINE))}")
        lines.append(f"feature set {self.feature_set}: {self.provenance.backbone} {self.provenance.layer_names}")
        return "\n".join(lines)


def version(v: int | None) -> str:
    return f" (version {v})" if v is not None else ""


def resolve_preprocess(cfg: ExtractConfig, ref: weights.WeightsRef) -> imaging.Preprocess:
    """What the weights prescribe, with the workflow's overrides on top."""
    base = backbones.preprocess_defaults(cfg.backbone, ref.id if ref.kind == "enum" else None)
    over = {k: v for k, v in cfg.preprocess.model_dump().items() if v is not None}
    merged = {**base, **over}
    if "resize" in over and "crop" not in over:
        merged["crop"] = min(merged["crop"], merged["resize"])
    return imaging.Preprocess(merged["resize"], merged["crop"], tuple(merged["mean"]), tuple(merged["std"]))


def model_spec(wf: Workflow) -> tuple[ModelSpec, schema.Provenance]:
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


def mismatch(existing: dict, prov: dict) -> ExtractError:  # both as stored
    differ = ", ".join(schema.differences(existing, prov))
    return ExtractError(f"the output already holds feature set {existing['feature_set']}, which differs in: {differ}. "
                        f"Set extract.output to a new location for this feature set.")


def provenance_of_parts(out: storage.Location) -> dict | None:
    """The feature set the features table holds, from its own description: to rebuild `_ftl.json`."""
    features = table.Table.at(out.join(FEATURES))
    return features.description() or None if features.exists() else None


def run(wf: Workflow) -> ExtractResult:
    """Extract features for every listed image not yet in the output; one run per output at a time."""
    cfg = wf.extract
    started = time.perf_counter()
    spec, prov = model_spec(wf)
    out = storage.locate(cfg.output, wf.storage.options)
    listing.check_exists(wf.source, storage_options=wf.storage.options)  # before the output is touched
    schemas = {FEATURES: schema.features(prov), QUARANTINE: schema.QUARANTINE}
    # The lease comes before the listing: a run learns at once that another holds the output.
    stored = prov.to_dict()
    with output.writing(out, identity=stored, key="feature_set", storage_cfg=wf.storage, what="extraction",
                        mismatch=mismatch, schemas=schemas, description=stored,
                        recover=lambda: provenance_of_parts(out)) as held:
        listed = list_source(wf)
        counts = extract_into(out, wf, spec, prov, listed, fence=held.fence)
        counts["versions"] = held.versions()
    result = ExtractResult(**counts, seconds=time.perf_counter() - started, output=out.uri,
                           features_uri=out.join(FEATURES).uri, quarantine_uri=out.join(QUARANTINE).uri,
                           feature_set=prov.feature_set, provenance=prov)
    attempted = result.ok + result.quarantined + result.retry
    failed = result.quarantined + result.retry
    if attempted and failed / attempted > cfg.max_error_fraction:
        raise ExtractError(
            f"{failed} of the {attempted} images this run tried failed ({result.quarantined} quarantined, "
            f"{result.retry} to retry), over extract.max_error_fraction={cfg.max_error_fraction}; what was "
            f"read is committed. See {result.quarantine_uri} for the reasons.\n{result.summary()}")
    return result


def list_source(wf: Workflow):
    """The listing and its dropped duplicates, or for WebDataset the shards (their images are listed as read)."""
    if wf.source.format == "webdataset":
        return webdataset.list_shards(wf.source, wf.storage.options)
    if distributed.wanted(wf.source, wf.storage.options):
        return distributed.list_source(wf.source, wf.storage.options)
    return listing.list_unique(wf.source, storage_options=wf.storage.options)


def extract_into(out: storage.Location, wf: Workflow, spec: ModelSpec, prov: schema.Provenance, listed, *, fence) -> dict:
    """The work under the lease: diff, run the pipeline; returns the counts of the result."""
    counts = dict(listed=0, already_done=0, ok=0, quarantined=0, retry=0, duplicates=0, shards_skipped=0,
                  superseded=0, gone=0, settings="")
    if wf.source.format == "webdataset":
        images, shards = webdataset_input(wf, out, listed, counts, fence=fence)
    elif isinstance(listed, distributed.ScaledListing):
        images, shards = scaled_input(wf, out, listed, counts, fence=fence), None
    else:
        images, shards = listed_input(wf, out, listed, counts, fence=fence), None
    if images is None:
        return counts
    cfg = wf.extract
    sink = feature_sink(out, prov, rows_per_file=cfg.rows_per_file, fence=fence)
    tuned = tuning.settings_for(cfg, tuning.Hardware.of_cluster(), crop=spec.preprocess.crop)
    counts["settings"] = tuned.describe()
    todo = None if shards is not None else counts["listed"] - counts["already_done"]  # shards: known as read
    with Progress("extract", total=todo) as progress:
        write(pipeline(images, spec, prov, tuned=tuned, storage_options=wf.storage.options,
                       progress=progress.handle), sink)
    done = sink.counts
    counts.update(ok=done["ok"], quarantined=done["quarantined"], retry=done["retry"])
    if shards is not None:  # images inside shards are counted as they stream by
        counts["already_done"] += done["done"]
        counts["listed"] += sum(done.values())
        if not done["retry"]:  # a shard with rows left for the next run must be opened again
            webdataset.record_finished(out, shards)
    return counts


def listed_input(wf: Workflow, out: storage.Location, listed: tuple, counts: dict, *, fence):
    """Imagefolder and manifest sources: diff the listing on the driver, supersede changed rows."""
    images, counts["duplicates"] = listed
    work = incremental.diff(images, out, (FEATURES, QUARANTINE))
    incremental.supersede(out, work.superseded, fence=fence)
    counts.update(listed=images.num_rows, already_done=work.already_done, superseded=work.superseded_rows,
                  gone=work.gone)
    if not work.todo.num_rows:
        return None
    ensure_ray()
    return blocks(work.todo, rows=wf.extract.decode_batch_size)


def scaled_input(wf: Workflow, out: storage.Location, listed: distributed.ScaledListing, counts: dict, *, fence):
    """A listing held in the object store: the diff is a Ray Data join, the driver sees counts."""
    logs.say(f"diffing {listed.listed:,} listed images against {out.uri}")
    work = distributed_diff.diff(listed.rows, listed.listed, out, (FEATURES, QUARANTINE))
    incremental.supersede(out, work.superseded, fence=fence)
    counts.update(listed=listed.listed, duplicates=listed.duplicates, already_done=work.already_done,
                  superseded=work.superseded_rows, gone=work.gone)
    if not work.todo_rows:
        return None
    return work.todo.repartition(target_num_rows_per_block=wf.extract.decode_batch_size)


def webdataset_input(wf: Workflow, out: storage.Location, shards, counts: dict, *, fence):
    """WebDataset shards: finished shards are skipped unopened, done images inside others pass by."""
    import ray

    src = wf.source
    todo = webdataset.pending_shards(shards, out)
    counts["shards_skipped"] = shards.num_rows - todo.num_rows
    if not todo.num_rows:
        return None, None
    # A shard that changed since its rows were written: those rows go, as a changed image's do.
    stale = webdataset.superseded(out, todo, (FEATURES, QUARANTINE))
    incremental.supersede(out, stale, fence=fence)
    counts["superseded"] = sum(len(ids) for ids in stale.values())
    ensure_ray()
    done = ray.put(webdataset.done_keys(out, (FEATURES, QUARANTINE)))
    images = webdataset.read(todo, image_keys=src.image_keys, label_key=src.label_key, done=done,
                             rows=wf.extract.decode_batch_size, storage_options=wf.storage.options,
                             max_bytes=wf.extract.max_image_bytes)
    return images, todo


def pipeline(images, spec: ModelSpec, prov: schema.Provenance, *, tuned: tuning.Tuning, storage_options: dict, progress=None):
    """The extract plan: images (listed rows or inline bytes) → reader tasks → a pool of backbone Embedders."""
    kwargs = {"spec": ship(spec, storage_options=storage_options), "prov": prov, "runtime": tuned.runtime,
              "storage_options": storage_options or None}
    return build(images, actor=Embedder, actor_kwargs=kwargs, pre=spec.preprocess, tuned=tuned, progress=progress,
                 storage_options=storage_options)
