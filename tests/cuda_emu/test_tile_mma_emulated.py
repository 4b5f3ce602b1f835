"""nvcuda::wmma in the CPU emulator (tests/cuda_emu/emu/wmma.h) and the tensor-core products of
csrc/cuda/memory/tile_mma.cuh (tests/cuda_emu/drivers/tile_mma_driver.cpp).

- wmma: load / mma / store for m16n16k16, m32n8k16 and m8n32k16, every operand layout, __half and __nv_bfloat16,
  two warps, equal bitwise to float sums in k order on the host, and nothing written outside the tiles.
- tile_gemm as rows (X W^T), cols (D W) and outer (P^T Q) products for n in {1, 5, 16, 37, 64} and out, in in
  {3, 17, 64, 100} (480 cases), against a double-precision reference on the same rounded operands, with strided
  operands at unaligned addresses; outputs start as NaN (or random when accumulating) and the entries around
  them must stay untouched.
- Without the __syncthreads between staging and the loads, or without the __syncwarp between storing a tile and
  reading it back, the products are wrong; misuse of wmma (lane-divergent fragments, missing or exited lanes,
  mixed operations, bad pointers) is reported instead of computed.
"""

import re

import pytest

from . import emu_build

ORDERS = ["ordered", "reverse", "shuffled:1"]


def output(emu_bins, mode, schedule):
    res = emu_build.run(emu_bins["tile_mma"], mode, schedule, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr
    return res.stdout


@pytest.mark.parametrize("schedule", ORDERS)
def test_wmma_is_float_sums_in_k_order_for_every_layout(emu_bins, schedule):
    out = output(emu_bins, "wmma", schedule)
    m = re.search(r"summary: (\d+) checks, 0 failures", out)
    assert m and int(m.group(1)) > 150_000, out[-3000:]


@pytest.mark.parametrize("schedule", ORDERS + ["shuffled:2"])
def test_tile_products_match_double_reference_on_rounded_operands(emu_bins, schedule):
    out = output(emu_bins, "products", schedule)
    m = re.search(r"summary: (\d+) cases, 0 failures, max_err=(\S+) max_err_unrounded_half=(\S+) "
                  r"max_err_unrounded_bf16=(\S+)", out)
    assert m, out[-3000:]
    cases, err, unrounded_half, unrounded_bf16 = int(m.group(1)), *map(float, m.groups()[1:])
    assert cases == 3 * 5 * 4 * 4 * 2  # variants x n x out x in x types
    assert err < 2e-6  # float accumulation only
    # What the rounding of the float operands costs (2^-11 and 2^-8 relative per operand).
    assert 1e-4 < unrounded_half < 3e-3
    assert 1e-3 < unrounded_bf16 < 2e-2


@pytest.mark.parametrize("schedule", ["reverse"] + [f"shuffled:{s}" for s in range(6)])
@pytest.mark.parametrize("mode", ["no_staging_barrier", "no_store_syncwarp"])
def test_missing_barrier_is_caught(emu_bins, mode, schedule):
    # no_staging_barrier: warps load chunks that other threads have not staged yet (__syncthreads);
    # no_store_syncwarp: lanes read slab entries that other lanes of the warp have not stored yet (__syncwarp).
    m = re.search(r"result: max_err=(\S+)", output(emu_bins, mode, schedule))
    assert m and float(m.group(1)) > 0.1


WAIT = r"wait in __syncwarp\(mask 0xffffffff\) at tile_mma_driver\.cpp:\d+"

MISUSE = {
    "divergent_fragment": r"in wmma::mma_sync at tile_mma_driver\.cpp:\d+: the 32 lanes must hold identical "
                          r"fragments, but fragment c of lane \d+ differs from lane \d+'s at element \(0, 0\)",
    "divergent_store": r"in wmma::store_matrix_sync at tile_mma_driver\.cpp:\d+: the 32 lanes must hold identical "
                       r"fragments, but fragment \(stored\) of lane \d+ differs from lane \d+'s at element \(0, 5\)",
    "missing_lane": r"deadlock, no thread can move\n(.*\n)*  31 thread\(s\) " + WAIT + r": threads 0-4,6-31",
    "exited_lane": r"lane 5\] exited while lanes of its warp wait for it in __syncwarp|lane 5 has exited but is named",
    "mixed_ops": r"the lanes of a warp must run the same wmma operation, but lane \d+ is in wmma::\w+ at "
                 r"tile_mma_driver\.cpp:\d+ and lane \d+ in wmma::\w+ at",
    "foreign_syncwarp": r"in wmma::mma_sync at tile_mma_driver\.cpp:\d+ was released by a __syncwarp of other lanes",
    "misaligned": r"in wmma::load_matrix_sync at tile_mma_driver\.cpp:\d+: pointer 0x[0-9a-f]+ is not 256-bit aligned",
    "bad_ldm": r"ldm 20 is not a multiple of 16 bytes \(8 elements\)",
    "different_args": r"in wmma::load_matrix_sync at tile_mma_driver\.cpp:\d+: lanes \d+ and \d+ pass different "
                      r"arguments",
}


@pytest.mark.parametrize("schedule", ORDERS)
@pytest.mark.parametrize("mode", list(MISUSE))
def test_wmma_misuse_is_reported(emu_bins, mode, schedule):
    out = output(emu_bins, mode, schedule)
    assert out.startswith("emu error: "), out
    assert re.search(MISUSE[mode], out), out
