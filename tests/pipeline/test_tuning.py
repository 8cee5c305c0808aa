"""Hardware-chosen pipeline settings: what GPU clusters, CPU clusters and pinned settings get, extract and predict."""

from ftl.config import ExtractConfig, PredictConfig
from ftl.pipeline import allocator
from ftl.pipeline.tuning import WORKER_ENV, Hardware, settings_for


def cfg(**kw) -> ExtractConfig:
    return ExtractConfig(output="/out", **kw)


def test_gpu_cluster_gets_an_actor_per_gpu_device_decode_and_overlap():
    # Two 8-GPU nodes and two CPU-only nodes: the actors go to GPUs, decode tasks anywhere.
    t = settings_for(cfg(), Hardware(gpus=16, node_cpus=(96, 96, 32, 32)), crop=224)
    rt = t.runtime
    assert (rt.device, t.actors, rt.batch_size, rt.decode, rt.precision, rt.channels_last) == (
        "cuda", 16, 256, "device", "bf16", True)
    assert (t.prefetch_batches, t.concurrent_batches) == (4, 2)
    assert t.actor_options == {"num_gpus": 1, "num_cpus": 1, "runtime_env": {"env_vars": WORKER_ENV}}
    assert "cuda: 16 actor(s) x batch 256, decode by torchvision.io on cuda" in t.describe()


def test_cpu_cluster_gets_an_actor_per_node_sharing_its_cores():
    t = settings_for(cfg(), Hardware(gpus=0, node_cpus=(16, 16, 16)), crop=224)
    rt = t.runtime
    assert (rt.device, t.actors, rt.batch_size, rt.decode, t.concurrent_batches) == ("cpu", 3, 64, "cpu", 1)
    assert (rt.torch_threads, rt.precision) == (16, "fp32")
    assert t.actor_options["scheduling_strategy"] == "SPREAD"  # one actor per node, as the threads assume
    assert t.actor_options["runtime_env"] == {"env_vars": WORKER_ENV}  # the actor's malloc from its start
    assert allocator.ENV.items() <= WORKER_ENV.items()
    one = settings_for(cfg(), Hardware(gpus=0, node_cpus=(2,)), crop=224)
    assert (one.actors, one.runtime.torch_threads) == (1, None)  # None: the actor takes every core it sees
    assert one.actor_options["num_cpus"] == 1.0 and "scheduling_strategy" not in one.actor_options
    assert (one.reader_batch_size, one.reader_cpus, one.reader_max_bytes) == (64, 0.5, None)
    crowded = settings_for(cfg(actors=4), Hardware(gpus=0, node_cpus=(8, 8)), crop=224)
    assert crowded.runtime.torch_threads == 4  # two actors per node split its 8 cores


def test_workers_that_inherit_the_worker_env_get_no_runtime_env_of_their_own():
    """A local runtime started with WORKER_ENV in its environment: an actor with a runtime_env would
    need a new worker process, one without takes a prestarted one."""
    for gpus, nodes in ((0, (2,)), (1, (8,))):
        t = settings_for(cfg(), Hardware(gpus=gpus, node_cpus=nodes, worker_env_inherited=True), crop=224)
        assert "runtime_env" not in t.actor_options
        assert t.actor_options["num_cpus"] >= 1.0


def test_small_nodes_keep_room_for_a_reader_beside_each_actor():
    # Two 1-CPU workers: an actor per node must leave a reader's share on its node, or nothing decodes.
    for nodes, actors in (((1, 1), None), ((1, 1, 1), None), ((2, 2), 4), ((1.5, 4), None)):
        t = settings_for(cfg(actors=actors), Hardware(gpus=0, node_cpus=nodes), crop=224)
        per_node = -(-t.actors // len(nodes))
        assert min(nodes) - per_node * t.actor_options["num_cpus"] >= t.reader_cpus, (nodes, t.actor_options)


def test_pinned_settings_win_over_hardware():
    pinned = cfg(device="cpu", batch_size=32, decode="device", actors=2, prefetch_batches=5, concurrent_batches=3,
                 buffer_mib=100, precision="bf16", channels_last=False, compile=True, decode_batch_size=16,
                 decode_cpus=0.25, actor_cpus=2, max_image_pixels=1000, max_image_bytes=5000)
    t = settings_for(pinned, Hardware(gpus=4, node_cpus=(64,)), crop=224)
    rt = t.runtime
    assert (rt.device, t.actors, rt.batch_size, rt.decode, t.prefetch_batches, t.concurrent_batches) == (
        "cpu", 2, 32, "device", 5, 3)
    assert (rt.precision, rt.channels_last, rt.compile, rt.max_image_pixels) == ("bf16", False, True, 1000)
    assert (t.reader_batch_size, t.reader_cpus, t.reader_max_bytes, t.actor_options["num_cpus"]) == (16, 0.25, 5000, 2)
    assert t.buffer_bytes == 100 * 2**20
    # Fewer batches queued than run at once would leave calls idle: the queue is raised to match.
    gpu = Hardware(gpus=1, node_cpus=(8,))
    assert settings_for(cfg(prefetch_batches=1, concurrent_batches=3), gpu, crop=224).prefetch_batches == 3


def test_buffer_holds_every_actors_batches_of_the_models_crop():
    gpu = Hardware(gpus=8, node_cpus=(64,))
    # 8 actors x (4 queued + 2 running) x 256 images x 3 x crop² bytes, twice over.
    assert settings_for(cfg(), gpu, crop=224).buffer_bytes == 2 * 8 * 6 * 256 * 224 * 224 * 3
    assert settings_for(cfg(), gpu, crop=96).buffer_bytes == 2 * 8 * 6 * 256 * 96 * 96 * 3
    assert settings_for(cfg(), Hardware(gpus=0, node_cpus=(8,)), crop=96).buffer_bytes == 256 * 2**20  # the floor


def test_cuda_before_the_autoscaler_adds_gpus_asks_for_them_and_says_so():
    t = settings_for(cfg(device="cuda"), Hardware(gpus=0, node_cpus=(8,)), crop=224)
    assert (t.runtime.device, t.actors, t.actor_options["num_gpus"]) == ("cuda", 1, 1)
    assert "the actors wait for the autoscaler to add GPU nodes" in t.describe()
    assert settings_for(cfg(), Hardware(gpus=0, node_cpus=(8,)), crop=224).runtime.device == "cpu"  # auto never waits


def test_predict_gets_the_same_gpu_defaults_and_device_decode_as_extract():
    predict = PredictConfig(model="models:/m/1", input="/in", output="/out")
    gpu = Hardware(gpus=2, node_cpus=(32, 32))
    assert settings_for(predict, gpu, crop=224) == settings_for(cfg(), gpu, crop=224)
    t = settings_for(predict, gpu, crop=224)
    assert (t.runtime.device, t.runtime.decode, t.runtime.precision, t.actors, t.runtime.batch_size) == (
        "cuda", "device", "bf16", 2, 256)
    cpu = settings_for(predict.model_copy(update={"batch_size": 16}), Hardware(gpus=0, node_cpus=(4,)), crop=224)
    assert (cpu.runtime.device, cpu.runtime.decode, cpu.runtime.batch_size) == ("cpu", "cpu", 16)
