"""Extraction settings a workflow leaves unset, chosen from the hardware the Ray cluster reports.

Every choice here can be pinned in the workflow; `Tuning.describe()` goes into the run's summary
so that a person can see what was picked and why a rerun on other hardware behaves differently.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftl.config import ExtractConfig


@dataclass(frozen=True)
class Hardware:
    gpus: int  # in the whole cluster
    node_cpus: tuple[float, ...]  # per alive node that has CPUs, GPU nodes included

    @classmethod
    def of_cluster(cls) -> "Hardware":
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        return cls(gpus=int(sum(r.get("GPU", 0) for r in nodes)),
                   node_cpus=tuple(r["CPU"] for r in nodes if r.get("CPU", 0) > 0))


@dataclass(frozen=True)
class Tuning:
    device: str  # "cuda" or "cpu"
    actors: int
    batch_size: int
    decode: str  # "cpu" (PIL in tasks) or "device" (torchvision.io in the actor)
    prefetch_batches: int
    concurrent_batches: int
    torch_threads: int | None  # None: the Embedder uses every core it may
    actor_resources: dict
    buffer_bytes: int  # object store that blocks in flight may take: the pipeline's memory bound
    waits_for_gpus: bool = False

    def describe(self) -> str:
        decoder = {"cpu": "PIL in CPU tasks", "device": f"torchvision.io on {self.device}"}[self.decode]
        return (f"{self.device}: {self.actors} actor(s) x batch {self.batch_size}, decode by {decoder}, "
                f"{self.prefetch_batches} batches queued and {self.concurrent_batches} in flight per actor, "
                f"{self.buffer_bytes / 2**20:.0f} MiB of blocks in flight at most"
                + (" (no GPU in the cluster yet: the actors wait for the autoscaler to add GPU nodes)"
                   if self.waits_for_gpus else ""))


def resolve(cfg: ExtractConfig, hw: Hardware) -> Tuning:
    """Fill every unset extraction setting from `hw`; pinned settings are kept as they are."""
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
    return Tuning(
        device=device,
        actors=actors,
        batch_size=batch,
        decode=cfg.decode if cfg.decode != "auto" else ("device" if gpu else "cpu"),
        prefetch_batches=prefetch,
        concurrent_batches=concurrent,
        torch_threads=threads,
        actor_resources=actor_resources(cfg, gpu, actors, sum(hw.node_cpus)),
        waits_for_gpus=gpu and not hw.gpus,
        buffer_bytes=buffer_bytes(cfg, actors, batch, prefetch, concurrent),
    )


def buffer_bytes(cfg: ExtractConfig, actors: int, batch: int, prefetch: int, concurrent: int) -> int:
    """Room for every actor's queued and running batches, twice over, and never under 256 MiB.

    Decoding outruns the model, and without a bound Ray Data keeps decoding into the object
    store until half of it is full: peak memory then grows with the dataset. This bound keeps
    the queues just deep enough to never starve an actor.
    """
    if cfg.buffer_mib:
        return cfg.buffer_mib * 2**20
    crop = cfg.preprocess.crop or 224
    return max(256 * 2**20, 2 * actors * (prefetch + concurrent) * batch * crop * crop * 3)


def actor_resources(cfg: ExtractConfig, gpu: bool, actors: int, cpus: float) -> dict:
    """CPU and GPU asks for each actor, leaving CPU for the decode tasks."""
    if gpu:
        return {"num_gpus": 1, "num_cpus": cfg.actor_cpus or 1}
    # Torch in the actor uses all cores regardless (see Embedder); the ask only has to leave
    # room for decode tasks: on 2 cores, two actors at num_cpus=1 would starve decoding.
    return {"num_cpus": cfg.actor_cpus or min(1.0, max(0.1, (max(cpus, 1) - cfg.decode_cpus) / actors))}


def threads_per_actor(actors: int, node_cpus: tuple[float, ...]) -> int:
    """Share each node's cores among the actors it will hold, instead of each taking them all."""
    per_node = -(-actors // max(1, len(node_cpus)))  # ceil: the busiest node
    return max(1, int(min(node_cpus or (1,)) // per_node))
