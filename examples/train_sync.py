"""Data-parallel training with synchronized batch norm, launched by torchrun.

One machine, 2 processes on CPU (gloo):
    torchrun --nproc-per-node=2 examples/train_sync.py

Two machines, 4 GPUs each (NCCL); run on both, with HOST the first machine's address:
    torchrun --nnodes=2 --nproc-per-node=4 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \
        examples/train_sync.py

Each rank trains on its shard of the data; every batch norm normalises with the statistics of the
global batch, and the moving statistics are identical on every rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import batchnorm


def main(steps: int = 20) -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    # Every batch norm (torch's or ours) becomes a synchronized batchnorm layer.
    model = batchnorm.convert_sync(model).to(device)
    model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    data = TensorDataset(torch.randn(512, 3, 8, 8), torch.randint(0, 10, (512,)))
    sampler = DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=16, sampler=sampler)  # 16 per rank
    step = 0
    while step < steps:
        for x, label in loader:
            loss = nn.functional.cross_entropy(model(x.to(device)), label.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
    norm = model.module[1]
    if rank == 0:
        print(f"{world_size} ranks, {steps} steps, last loss {loss.item():.4f}")
        print(f"moving mean (identical on every rank): {norm.moving_mean[:4].tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
