"""bench/specs.py (bench/ops.py --specs) times every preset's spec on inputs under which its memory stays
finite at the bench's length: a diverged memory makes the op's non-finite containment re-run sequences, and
the table would time that instead (Titans at lr 0.2 with momentum 0.9 overflowed in 64% of its outputs)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import specs  # noqa: E402


@pytest.mark.parametrize("name", list(specs.presets()))
def test_inputs_keep_every_spec_finite(name):
    torch.manual_seed(0)
    specs.SpecCase(name, "op", specs.T).check_finite(name)


def test_a_diverged_spec_stops_the_bench():
    case = specs.SpecCase("titans", "op", specs.T)
    case.gates["lr"].data.mul_(10.0)  # the overflowing step (lr 0.2 sigmoid with m = 0.9)
    with pytest.raises(SystemExit, match="titans's output is non-finite"):
        case.check_finite("titans")
