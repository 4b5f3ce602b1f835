"""The emulator's warp shuffles, votes and reductions against a reference written from the CUDA Programming
Guide (srcLane modulo width, width subsections, up/down keeping lanes without a source, xor reading only
earlier groups), for every width, several masks and out-of-range source lanes, offsets and lane masks."""

import re

from . import emu_build


def test_warp_operations_follow_the_programming_guide(emu_bins):
    res = emu_build.run(emu_bins["warp"], "ordered", "reverse", "shuffled:3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    m = re.search(r"summary: (\d+) checks, 0 failures", res.stdout)
    assert m and int(m.group(1)) > 100_000
