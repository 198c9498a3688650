"""Run by tests/test_distributed.py under torchrun: train, then save this process's weights."""

from __future__ import annotations

import os
import sys

import torch

from dual_cross_attention.config import load_config
from dual_cross_attention.distributed import cleanup
from dual_cross_attention.trainer import train


def main() -> None:
    out_dir, overrides = sys.argv[1], sys.argv[2:]
    result = train(load_config(None, overrides), show_progress=False)
    rank = int(os.environ["RANK"])
    torch.save(result.model.state_dict(), os.path.join(out_dir, f"weights_rank{rank}.pt"))
    cleanup()


if __name__ == "__main__":
    main()
