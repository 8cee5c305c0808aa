"""Pipeline settings a workflow leaves unset, chosen from the hardware the Ray cluster reports.

Extract and predict run the same plan (ftl.pipeline.plan) and share these settings
(config.PipelineConfig). Every choice can be pinned in the workflow; `Tuning.describe()` goes
into the run's summary so that a person can see what was picked and why a rerun on other
hardware behaves differently.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftl.config import PipelineConfig
from ftl.pipeline.allocator import WORKER_ENV


@dataclass(frozen=True)
class Hardware:
    gpus: int  # in the whole cluster
    node_cpus: tuple[float, ...]  # per alive node that has CPUs, GPU nodes included
    worker_env_inherited: bool = False  # workers start with WORKER_ENV already (ftl.pipeline.ray_session)

    @classmethod
    def of_cluster(cls) -> Hardware:
        import ray

        from ftl.pipeline import ray_session

        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        return cls(gpus=int(sum(r.get("GPU", 0) for r in nodes)),
                   node_cpus=tuple(r["CPU"] for r in nodes if r.get("CPU", 0) > 0),
                   worker_env_inherited=ray_session.inherits_worker_env())


@dataclass(frozen=True)
class Runtime:
    """How each model actor runs: its device and numerics, never which model it holds."""

    device: str  # "cuda" or "cpu"
    precision: str  # "fp32", "bf16" or "fp16": the autocast dtype
    channels_last: bool
    compile: bool
    batch_size: int  # with compile, short batches are padded to it: one graph, no recompiles
    decode: str  # "cpu": batches carry pixels (PIL in reader tasks); "device": JPEG bytes the actor decodes
    torch_threads: int | None  # None: the actor uses every core it may
    max_image_pixels: int


@dataclass(frozen=True)
class Tuning:
    runtime: Runtime
    actors: int
    prefetch_batches: int
    concurrent_batches: int
    actor_options: dict  # Ray's asks per actor: CPUs, GPUs, the allocator's environment, placement
    reader_batch_size: int
    reader_cpus: float
    reader_max_bytes: int | None  # objects over it are refused from the listing's size, never read
    buffer_bytes: int  # object store that blocks in flight may take: the pipeline's memory bound
    waits_for_gpus: bool = False

    def describe(self) -> str:
        rt = self.runtime
        decoder = {"cpu": "PIL in CPU tasks", "device": f"torchvision.io on {rt.device}"}[rt.decode]
        return (f"{rt.device}: {self.actors} actor(s) x batch {rt.batch_size}, decode by {decoder}, "
                f"{self.prefetch_batches} batches queued and {self.concurrent_batches} in flight per actor, "
                f"{self.buffer_bytes / 2**20:.0f} MiB of blocks in flight at most"
                + (" (no GPU in the cluster yet: the actors wait for the autoscaler to add GPU nodes)"
                   if self.waits_for_gpus else ""))


def settings_for(cfg: PipelineConfig, hw: Hardware, *, crop: int) -> Tuning:
    """Fill every unset pipeline setting from `hw` for images of `crop` pixels; pinned settings are kept."""
    # device=cuda with no GPU in the cluster yet: the actors ask for one, and an autoscaling
    # cluster (cluster.yaml's gpu_spot workers start at 0) adds GPU nodes for them.
    device = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and hw.gpus) else "cpu"
    gpu = device == "cuda"
    # One actor per GPU: a GPU with two actors holds two models and gains nothing. On CPUs one
    # actor per node uses the node's cores through torch's threads with one copy of the model.
    actors = cfg.actors or (max(1, hw.gpus) if gpu else max(1, len(hw.node_cpus)))
    threads = cfg.torch_threads
    if not gpu and threads is None and actors > 1:
        threads = threads_per_actor(actors, hw.node_cpus)
    batch = cfg.batch_size or (256 if gpu else 64)
    # On GPUs a second call assembles and copies its batch while the first runs on the GPU,
    # and the next batches wait in the actor, so the GPU never waits for its input.
    concurrent = cfg.concurrent_batches or (2 if gpu else 1)
    prefetch = max(cfg.prefetch_batches or (4 if gpu else 2), concurrent)  # a call needs a batch to work on
    runtime = Runtime(
        device=device,
        # bf16 on GPUs; fp32 on CPU, where autocast costs more than it saves.
        precision=cfg.precision if cfg.precision != "auto" else ("bf16" if gpu else "fp32"),
        # channels_last is faster on GPUs and at least as fast with oneDNN on CPUs.
        channels_last=True if cfg.channels_last is None else cfg.channels_last,
        compile=cfg.compile,
        batch_size=batch,
        decode=cfg.decode if cfg.decode != "auto" else ("device" if gpu else "cpu"),
        torch_threads=threads,
        max_image_pixels=cfg.max_image_pixels,
    )
    return Tuning(
        runtime=runtime,
        actors=actors,
        prefetch_batches=prefetch,
        concurrent_batches=concurrent,
        actor_options=actor_options(cfg, gpu, actors, hw.node_cpus, inherited=hw.worker_env_inherited),
        reader_batch_size=cfg.decode_batch_size,
        reader_cpus=cfg.decode_cpus,
        reader_max_bytes=cfg.max_image_bytes,
        buffer_bytes=buffer_bytes(cfg, actors=actors, batch=batch, queued=prefetch + concurrent, crop=crop),
        waits_for_gpus=gpu and not hw.gpus,
    )


def buffer_bytes(cfg: PipelineConfig, *, actors: int, batch: int, queued: int, crop: int) -> int:
    """Room for every actor's queued and running batches, twice over, and never under 256 MiB.

    Decoding outruns the model, and without a bound Ray Data keeps decoding into the object
    store until half of it is full: peak memory then grows with the dataset. This bound keeps
    the queues just deep enough to never starve an actor.
    """
    if cfg.buffer_mib:
        return cfg.buffer_mib * 2**20
    return max(256 * 2**20, 2 * actors * queued * batch * crop * crop * 3)


def actor_options(cfg: PipelineConfig, gpu: bool, actors: int, node_cpus: tuple[float, ...], *,
                  inherited: bool = False) -> dict:
    """Ray's asks for each actor: GPU, CPU (leaving CPU for the readers), environment, placement."""
    # WORKER_ENV must be in the environment when the actor's process starts. A runtime_env of its
    # own makes Ray start a new worker for it, so where every worker inherits it already, the actor
    # asks for none and takes a prestarted worker.
    options = {} if inherited else {"runtime_env": {"env_vars": dict(WORKER_ENV)}}
    if cfg.actor_resources:
        options["resources"] = dict(cfg.actor_resources)
    if gpu:
        return options | {"num_gpus": 1, "num_cpus": cfg.actor_cpus or 1}
    # Torch in the actor uses all cores regardless (see runtime.ModelActor); the ask only has to
    # leave room for reader tasks on the node it lands on: on 2 cores, two actors at num_cpus=1
    # would starve decoding, and on 1-CPU nodes an actor at 0.75 leaves no node a reader fits on.
    per_node = -(-actors // max(1, len(node_cpus)))  # ceil: the busiest node
    room = (max(min(node_cpus or (1,)), 1) - cfg.decode_cpus) / per_node
    options["num_cpus"] = cfg.actor_cpus or min(1.0, max(0.1, room))
    if actors > 1:
        options["scheduling_strategy"] = "SPREAD"  # one actor per node is what torch_threads assumes
    return options


def threads_per_actor(actors: int, node_cpus: tuple[float, ...]) -> int:
    """Share each node's cores among the actors it will hold, instead of each taking them all."""
    per_node = -(-actors // max(1, len(node_cpus)))  # ceil: the busiest node
    return max(1, int(min(node_cpus or (1,)) // per_node))
