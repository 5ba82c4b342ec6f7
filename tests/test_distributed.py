import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import dist_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEVICES = [pytest.param("cpu", id="gloo"),
           pytest.param("cuda", id="nccl-2gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
               torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs for NCCL")])]


@pytest.mark.parametrize("device", DEVICES)
def test_ranks_agree_on_one_backend_and_write_the_cache_once(tmp_path, device):
    cache_dir = tmp_path / "shared-cache"
    mp.spawn(dist_worker.choose_worker, args=(2, free_port(), str(cache_dir), str(tmp_path), device), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["choices"] == ranks[1]["choices"]
    assert len(ranks[0]["choices"]) == 2
    assert ranks[0]["stats"]["cache_writes"] + ranks[1]["stats"]["cache_writes"] == 2  # one per key, one rank
    assert {r["stats"]["cache_writes"] for r in ranks} == {0, 2}
    (path,) = sorted(cache_dir.glob("tuning-*.json"))
    entries = json.loads(path.read_text())["entries"]
    assert len(entries) == 2 and all({"test_skew_a", "test_skew_b", "eager"} <= set(e) for e in entries.values())


def test_opting_out_lets_each_rank_choose_alone(tmp_path):
    """MISHOPS_DIST_SYNC=0: no collective, each rank measures, chooses and writes on its own."""
    mp.spawn(dist_worker.choose_worker, args=(2, free_port(), str(tmp_path / "c"), str(tmp_path), "cpu", "0"),
             nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["stats"]["cache_writes"] for r in ranks] == [2, 2]  # with the agreement: [2, 0] or [0, 2]
    assert ranks[0]["choices"][0] != "test_skew_b" and ranks[1]["choices"][0] != "test_skew_a"  # each its own


@pytest.mark.parametrize("device", DEVICES)
def test_ddp_two_ranks_match_one_rank_with_the_combined_batch(tmp_path, device):
    mp.spawn(dist_worker.ddp_worker, args=(2, free_port(), str(tmp_path / "c"), str(tmp_path), device), nprocs=2)
    grads = torch.load(tmp_path / "grads.pt")
    tol = 1e-5 if device == "cpu" else 2e-3  # on GPU both runs use TF32 convolutions
    for got, want in zip(grads["ddp"], grads["single"]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.gpu
def test_single_gpu_nccl_group_of_one(tmp_path):
    mp.spawn(dist_worker.choose_worker, args=(1, free_port(), str(tmp_path / "c1"), str(tmp_path), "cuda"), nprocs=1)
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    assert len(rank0["choices"]) == 2 and rank0["stats"]["cache_writes"] == 2
