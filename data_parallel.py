"""
Data parallelism under torchrun, in the few lines it takes. Alone, train.py is rank 0 of 1 and nothing here runs.

Under torchrun each rank works on every world-th target of a meta-batch (and of the held-out targets). A target and
its sampling seed depend only on (seed, step, index), so the split changes who computes what, not what is computed.
Per meta-step there is one all-reduce, of the per-target gradients of eta and psi, after which every rank adds them up
in target order, as one process would: every rank holds the same eta and psi as a single-process run, bit for bit.
Rank 0 alone writes logs, checkpoints and results.

    torchrun --nproc_per_node=2 train.py --preset tiny    # gloo on CPU, nccl on GPU (one GPU per rank)
"""
import os

import torch
import torch.distributed as dist


def start(device):
    """(rank, world, device): under torchrun, this process joins the group and takes its GPU; alone, (0, 1, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world, device


def take_grads(params):
    """The parameters' gradients as one vector (zeros where there are none); the gradients are cleared."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
    for p in params:
        p.grad = None
    return flat


def sum_grads(per_target, params):
    """per_target: (meta_batch, P), each row a target's gradient, filled by the rank that worked on it (zeros
    elsewhere). One all-reduce fills every row on every rank; the rows are then added in target order, the same
    additions in the same order as one process accumulating .grad target by target, and become the .grad of params."""
    dist.all_reduce(per_target)
    total = per_target[0]
    for row in per_target[1:]:
        total = total + row
    for p, g in zip(params, total.split([p.numel() for p in params])):
        p.grad = g.view_as(p).clone()


def gather(mine):
    """Every rank's `mine` (any picklable object), in rank order."""
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def in_order(per_rank, n):
    """The n items of all ranks in their original order: rank r's list holds items r, r + world, r + 2 world, ..."""
    world = len(per_rank)
    return [per_rank[i % world][i // world] for i in range(n)]
