"""Hardware-chosen extraction settings: what a GPU cluster, a CPU cluster and pinned settings get."""

from ftl.config import ExtractConfig
from ftl.pipeline.tuning import Hardware, resolve


def cfg(**kw) -> ExtractConfig:
    return ExtractConfig(output="/out", **kw)


def test_gpu_cluster_gets_an_actor_per_gpu_device_decode_and_overlap():
    # Two 8-GPU nodes and two CPU-only nodes: the actors go to GPUs, decode tasks anywhere.
    t = resolve(cfg(), Hardware(gpus=16, node_cpus=(96, 96, 32, 32)))
    assert (t.device, t.actors, t.batch_size, t.decode) == ("cuda", 16, 256, "device")
    assert (t.prefetch_batches, t.concurrent_batches) == (4, 2)
    assert t.actor_resources == {"num_gpus": 1, "num_cpus": 1}
    assert "cuda: 16 actor(s) x batch 256, decode by torchvision.io on cuda" in t.describe()


def test_cpu_cluster_gets_an_actor_per_node_sharing_its_cores():
    t = resolve(cfg(), Hardware(gpus=0, node_cpus=(16, 16, 16)))
    assert (t.device, t.actors, t.batch_size, t.decode, t.concurrent_batches) == ("cpu", 3, 64, "cpu", 1)
    assert t.torch_threads == 16
    one = resolve(cfg(), Hardware(gpus=0, node_cpus=(2,)))
    assert (one.actors, one.torch_threads) == (1, None)  # None: the actor takes every core it sees
    assert one.actor_resources["num_cpus"] == 1.0
    crowded = resolve(cfg(actors=4), Hardware(gpus=0, node_cpus=(8, 8)))
    assert crowded.torch_threads == 4  # two actors per node split its 8 cores


def test_pinned_settings_win_over_hardware():
    t = resolve(cfg(device="cpu", batch_size=32, decode="device", actors=2, prefetch_batches=5,
                    concurrent_batches=3, buffer_mib=100), Hardware(gpus=4, node_cpus=(64,)))
    assert (t.device, t.actors, t.batch_size, t.decode, t.prefetch_batches, t.concurrent_batches) == (
        "cpu", 2, 32, "device", 5, 3)
    assert t.buffer_bytes == 100 * 2**20
    # Fewer batches queued than run at once would leave calls idle: the queue is raised to match.
    assert resolve(cfg(prefetch_batches=1, concurrent_batches=3), Hardware(gpus=1, node_cpus=(8,))).prefetch_batches == 3


def test_cuda_before_the_autoscaler_adds_gpus_asks_for_them_and_says_so():
    t = resolve(cfg(device="cuda"), Hardware(gpus=0, node_cpus=(8,)))
    assert (t.device, t.actors, t.actor_resources["num_gpus"]) == ("cuda", 1, 1)
    assert "the actors wait for the autoscaler to add GPU nodes" in t.describe()
    assert resolve(cfg(), Hardware(gpus=0, node_cpus=(8,))).device == "cpu"  # auto never waits for a GPU
