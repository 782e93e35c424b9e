import torch
import torch.distributed as dist
from multirank import run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t


def test_run_ranks_all_reduce():
    results = run_ranks(_sum_ranks, 2)
    assert [r.item() for r in results] == [1.0, 1.0]
