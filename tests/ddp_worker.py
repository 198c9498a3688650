"""Run by tests/test_distributed.py under torchrun: train, then save this process's weights.

With DCAL_TEST_RANK_DIRS set, each process first moves into its own folder <dirs>/rank<R>, so a
relative run.output_dir is a different place per process (nodes without a shared file system);
DCAL_TEST_RESUME is passed as --resume.
"""

from __future__ import annotations

import os
import sys

import torch

from dual_cross_attention.config import load_config
from dual_cross_attention.distributed import cleanup
from dual_cross_attention.trainer import train


def main() -> None:
    out_dir, overrides = os.path.abspath(sys.argv[1]), sys.argv[2:]
    rank = int(os.environ["RANK"])
    if "DCAL_TEST_RANK_DIRS" in os.environ:
        os.chdir(os.path.join(os.environ["DCAL_TEST_RANK_DIRS"], f"rank{rank}"))
    cfg = load_config(None, overrides)
    result = train(cfg, resume=os.environ.get("DCAL_TEST_RESUME"), show_progress=False)
    torch.save(result.model.state_dict(), os.path.join(out_dir, f"weights_rank{rank}.pt"))
    cleanup()


if __name__ == "__main__":
    main()
