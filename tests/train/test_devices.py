"""Device choice per process without GPUs: a fake CUDA device count and launcher variables."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

from inkpipe.pipeline.errors import ConfigError
from inkpipe.train import distributed as distributed_module
from inkpipe.train.devices import Launch, check_device, read_launch, select_device
from inkpipe.train.distributed import Dist, distributed

# what torchrun --nproc-per-node 2 sets for its second process
RANK_1_OF_2 = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_check_device_accepts_the_names_and_cuda_n(name):
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda:1:2", ""])
def test_check_device_refuses_anything_else_in_one_line(name):
    with pytest.raises(ConfigError, match=r"unknown device .*choose from auto, cpu, cuda") as e:
        check_device(name)
    assert "\n" not in str(e.value) and "cuda:N" in str(e.value)


def test_without_a_gpu_auto_is_the_cpu_and_cuda_is_refused(no_gpu):
    assert select_device("auto", {}) == torch.device("cpu")
    assert select_device("cpu", RANK_1_OF_2) == torch.device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device {name} was asked for but no CUDA GPU"):
            select_device(name, {})


def test_one_process_takes_gpu_0(two_gpus):
    assert select_device("auto", {}) == torch.device("cuda", 0)
    assert select_device("cuda", {}) == torch.device("cuda", 0)


def test_each_torchrun_process_takes_the_gpu_of_its_local_rank(two_gpus):
    rank_0 = {**RANK_1_OF_2, "RANK": "0", "LOCAL_RANK": "0"}
    assert select_device("cuda", rank_0) == torch.device("cuda", 0)
    assert select_device("cuda", RANK_1_OF_2) == torch.device("cuda", 1)
    assert select_device("auto", RANK_1_OF_2) == torch.device("cuda", 1)
    # second node of two: global rank 3, local rank 1
    node_2 = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    assert select_device("cuda", node_2) == torch.device("cuda", 1)


def test_the_environment_is_read_by_default(two_gpus, monkeypatch):
    for name, value in RANK_1_OF_2.items():
        monkeypatch.setenv(name, value)
    assert select_device("cuda") == torch.device("cuda", 1)


def test_more_processes_than_gpus_is_one_line_with_the_fix(two_gpus):
    env = {"RANK": "2", "LOCAL_RANK": "2", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "3"}
    with pytest.raises(ConfigError) as e:
        select_device("cuda", env)
    message = str(e.value)
    assert message.startswith("LOCAL_RANK 2 has no GPU of its own: 2 CUDA GPU(s) are visible")
    assert message.endswith("(torchrun --nproc-per-node 2)") and "\n" not in message


def test_cuda_n_picks_that_gpu_in_one_process(two_gpus):
    assert select_device("cuda:1", {}) == torch.device("cuda", 1)
    # one process per node (two nodes): each may name its GPU
    one_per_node = {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}
    assert select_device("cuda:1", one_per_node) == torch.device("cuda", 1)


def test_cuda_n_beyond_the_gpus_is_one_line(two_gpus):
    with pytest.raises(ConfigError) as e:
        select_device("cuda:2", {})
    assert str(e.value) == (
        "--device cuda:2: there is no GPU 2, 2 CUDA GPU(s) are visible (cuda:0 … cuda:1); "
        "choose one of them, or cuda"
    )


def test_cuda_n_shared_by_the_processes_of_a_node_is_refused(two_gpus):
    with pytest.raises(ConfigError, match="would put all 2 processes of this node on one GPU"):
        select_device("cuda:0", RANK_1_OF_2)


def test_read_launch_defaults_to_one_process():
    assert read_launch({}) == Launch(rank=0, local_rank=0, world_size=1, local_world_size=1)
    assert read_launch(RANK_1_OF_2) == Launch(1, 1, 2, 2)
    # LOCAL_WORLD_SIZE missing: one node
    assert read_launch({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}) == Launch(1, 1, 2, 2)


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"LOCAL_RANK": "one"}, "environment variable LOCAL_RANK='one': expected an integer >= 0"),
        ({"WORLD_SIZE": "0"}, "environment variable WORLD_SIZE='0': expected an integer >= 1"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK 2 of WORLD_SIZE 2"),
        ({"LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK 1 of"),
    ],
)
def test_read_launch_refuses_broken_variables(env, words):
    with pytest.raises(ConfigError, match="torchrun") as e:
        read_launch(env)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_distributed_makes_the_gpu_current_in_one_process(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed(torch.device("cuda", 1)) as d:
        assert d == Dist()
    with distributed(torch.device("cpu")) as d:
        assert d == Dist()
    assert current == [torch.device("cuda", 1)]


@pytest.mark.parametrize("device", [torch.device("cuda", 1), torch.device("cpu")])
def test_distributed_joins_the_group_on_its_device(monkeypatch, device):
    calls = []
    dist = distributed_module.dist
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **k: calls.append(("init", a, k)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append(("destroy",)))
    for name, value in RANK_1_OF_2.items():
        monkeypatch.setenv(name, value)
    with distributed(device) as d:
        assert d == Dist(rank=1, world_size=2) and not d.main
    timeout = distributed_module.TIMEOUT
    assert timeout >= timedelta(hours=1)  # rank 0 may validate a whole fragment meanwhile
    if device.type == "cuda":
        init = ("init", ("nccl",), {"timeout": timeout, "device_id": device})
        assert calls == [("set_device", device), init, ("destroy",)]
    else:
        assert calls == [("init", ("gloo",), {"timeout": timeout}), ("destroy",)]
