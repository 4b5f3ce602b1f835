"""The `miras` command: train, evaluate, sample from and compare Miras models; run the benchmarks.

    miras train                         # a tiny Moneta on MQAR, a few minutes on a 2-core CPU
    miras train --preset yaad --task lm --steps 500
    miras eval runs/train --lengths 64 128 256
    miras generate runs/lm --prompt "def main():"
    miras compare --task mqar
    miras bench decode
    torchrun --nproc-per-node 2 -m miras_ext.cli train ...   # DistributedDataParallel (gloo on CPU)
"""

from __future__ import annotations

import argparse
import sys

from .commands import main, build_parser

__all__ = ["build_parser", "main"]
