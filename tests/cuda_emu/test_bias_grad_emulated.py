"""csrc/cuda/bias_grad_kernels.cuh run through the CPU emulator: forward and backward for every attentional bias
and delta layout, float32/float64/float16/bfloat16, Dv = 7, 33, 100 (9 rows: the last block has exiting warps),
under each schedule. The driver compares with the formulas of csrc/common/bias.h evaluated serially in double
on the same rounded inputs, with outputs initialised to NaN so that unwritten entries fail.
"""

import re

import pytest

from . import emu_build


@pytest.mark.parametrize("schedule", ["ordered", "reverse", "shuffled:1", "shuffled:2"])
def test_bias_grad_kernels_match_host_formulas(emu_bins, schedule):
    res = emu_build.run(emu_bins["bias_grad"], schedule)
    failed = [line for line in res.stdout.splitlines() if not line.startswith(("ok ", "summary:"))]
    assert res.returncode == 0 and not failed, "\n".join(failed) + res.stderr
    m = re.search(r"summary: (\d+) cases, 0 failures", res.stdout)
    # 9 (bias, layout) pairs x 3 row lengths x 4 dtypes
    assert m and int(m.group(1)) == 108, res.stdout[-2000:]
