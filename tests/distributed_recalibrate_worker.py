"""One rank of the distributed recalibrate test: ``python worker.py RANK WORLD PORT OUT``.

Each rank recalibrates the same model on its own batches under a gloo process group and saves
its state_dict and batches to OUT for the test to compare.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn

from batchnorm import BatchNormalization, recalibrate


class TwoNormNet(nn.Module):
    """Linear -> Dropout -> our BN (biased) -> ReLU -> Linear -> torch BN (unbiased)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 6)
        self.drop = nn.Dropout(0.5)
        self.bn1 = BatchNormalization(6, momentum=0.9, epsilon=1e-3)
        self.lin2 = nn.Linear(6, 3)
        self.bn2 = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.lin2(torch.relu(self.bn1(self.drop(self.lin1(x))))))


def rank_batches(rank: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    sizes = (3, 7) if rank == 0 else (11,)
    return [torch.randn(n, 4, generator=generator) * 2 + 1 for n in sizes]


def main(rank: int, world_size: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        model = TwoNormNet()
        batches = rank_batches(rank)
        result = recalibrate(model, batches, progress=False)
        torch.save({"state": model.state_dict(), "batches": result.batches}, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
