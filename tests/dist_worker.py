"""One rank of the distributed tests (started by torch.multiprocessing.spawn in test_distributed)."""

import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mishops
from mishops import registry, tuning
from tests.fake_backends import EagerLike
from tests.reference import Model


class RankSkewedA(EagerLike):
    """Fast on rank 0, slow on rank 1: alone, each rank would choose differently."""

    name = "test_skew_a"
    priority = 40

    @property
    def delay_s(self):
        return 0.0 if dist.get_rank() == 0 else 0.01


class RankSkewedB(EagerLike):
    name = "test_skew_b"
    priority = 41

    @property
    def delay_s(self):
        return 0.01 if dist.get_rank() == 0 else 0.0


def _init(rank, world, port, cache_dir, device):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MISHOPS_CACHE_DIR=cache_dir)
    if device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
        return torch.device("cuda", rank)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    return torch.device("cpu")


def choose_worker(rank, world, port, cache_dir, out_dir, device="cpu", sync="1"):
    os.environ["MISHOPS_DIST_SYNC"] = sync
    dev = _init(rank, world, port, cache_dir, device)
    registry.register(RankSkewedA)
    registry.register(RankSkewedB)
    torch.manual_seed(rank)
    for shape in [(32, 8), (5, 5, 5)]:
        mishops.mish2(torch.randn(shape, device=dev))
    result = {"choices": [c.winner for c in mishops.last_choices()], "stats": dict(tuning.stats)}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    _leave()


def ddp_worker(rank, world, port, cache_dir, out_dir, device="cpu"):
    dev = _init(rank, world, port, cache_dir, device)
    torch.manual_seed(0)
    ref = Model(3, 4, 3).to(dev)
    model = mishops.ModelNew(3, 4, 3).to(dev)
    model.load_state_dict(ref.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x = torch.randn(4, 3, 10, 10, device=dev)  # the same combined batch on every rank; each takes its share
    target = torch.randn(4, 4, 8, 8, device=dev)
    share = slice(rank * 4 // world, (rank + 1) * 4 // world)
    F.mse_loss(ddp(x[share]), target[share]).backward()
    if rank == 0:
        F.mse_loss(ref(x), target).backward()
        torch.save({"ddp": [p.grad.cpu() for p in model.parameters()],
                    "single": [p.grad.cpu() for p in ref.parameters()]},
                   os.path.join(out_dir, "grads.pt"))
    _leave()


def _leave():
    """Leave together: a rank that tore gloo down while its peer still worked (rank 0 saving its
    results) aborted now and then with "terminate called without an active exception"."""
    dist.barrier()
    dist.destroy_process_group()
