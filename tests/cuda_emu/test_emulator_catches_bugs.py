"""The emulator exposes broken kernels: missing barriers (through the schedules), barrier divergence,
deadlocks and misuse of warp operations are reported with who waits where, instead of hanging."""

import re

import pytest

from . import emu_build

ORDERS = ["ordered", "reverse", "shuffled:1"]
SEEDS = range(10)


def result(emu_bins, mode, schedule, binary="checks"):
    res = emu_build.run(emu_bins[binary], mode, schedule, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def max_err(out):
    m = re.search(r"result: max_err=(\S+)", out)
    assert m, out
    return float(m.group(1))


@pytest.mark.parametrize("schedule", ORDERS)
def test_correct_kernels_pass_in_every_order(emu_bins, schedule):
    assert max_err(result(emu_bins, "matmul_ok", schedule)) < 1e-5
    assert max_err(result(emu_bins, "stencil_ok", schedule)) == 0
    assert max_err(result(emu_bins, "dyn_template", schedule)) == 0


@pytest.mark.parametrize("variant", ["matmul_no_sync_after_load", "matmul_no_sync_after_use"])
@pytest.mark.parametrize("schedule", ["reverse"] + [f"shuffled:{s}" for s in SEEDS])
def test_tiled_matmul_missing_syncthreads_is_caught(emu_bins, variant, schedule):
    assert max_err(result(emu_bins, variant, schedule)) > 0.1


def test_stencil_without_barrier_passes_in_order_but_fails_reversed_and_shuffled(emu_bins):
    # Each thread reads its left neighbour's shared value: in index order the neighbour has always written it.
    assert max_err(result(emu_bins, "stencil_no_sync", "ordered")) == 0
    assert max_err(result(emu_bins, "stencil_no_sync", "reverse")) > 0.1
    caught = [max_err(result(emu_bins, "stencil_no_sync", f"shuffled:{s}")) > 0.1 for s in SEEDS]
    assert all(caught), caught


def test_uninitialised_dynamic_shared_memory_reads_nan(emu_bins):
    assert max_err(result(emu_bins, "stencil_dyn_no_sync", "ordered")) == 0
    assert max_err(result(emu_bins, "stencil_dyn_no_sync", "reverse")) == float("inf")


@pytest.mark.parametrize("schedule", ORDERS)
def test_barrier_in_divergent_branch_is_reported(emu_bins, schedule):
    out = result(emu_bins, "divergent_barrier", schedule)
    assert "divergent __syncthreads" in out, out
    assert re.search(r"32 thread\(s\) wait in __syncthreads at emu_checks\.cpp:\d+: threads 0-31", out), out
    assert re.search(r"32 thread\(s\) wait in __syncthreads at emu_checks\.cpp:\d+: threads 32-63", out), out


@pytest.mark.parametrize("schedule", ORDERS)
def test_deadlock_is_reported_with_who_waits_where(emu_bins, schedule):
    out = result(emu_bins, "barrier_vs_shuffle", schedule)
    assert "deadlock, no thread can move" in out, out
    assert re.search(r"32 thread\(s\) wait in __syncthreads at emu_checks\.cpp:\d+: threads 0,2,4,", out), out
    assert re.search(r"32 thread\(s\) wait in __shfl_xor_sync\(mask 0xffffffff\) at emu_checks\.cpp:\d+: threads 1,3,",
                     out), out


def test_warp_operation_misuse_is_reported(emu_bins):
    out = result(emu_bins, "exited_lane", "ordered")
    assert "lane 5] exited while lanes of its warp wait for it in __shfl_down_sync" in out, out
    out = result(emu_bins, "bad_mask", "ordered")
    assert "with mask 0x0000ffff, which does not name the calling lane" in out, out


@pytest.mark.parametrize("schedule", ORDERS)
def test_spin_wait_with_nanosleep_and_atomics(emu_bins, schedule):
    assert "result: flag=1 out1=42" in result(emu_bins, "spin_wait", schedule)
    assert "result: bins_match=1 fsum=10000" in result(emu_bins, "atomics", schedule)


def test_ucontext_fallback(emu_bins):
    assert max_err(result(emu_bins, "matmul_ok", "shuffled:4", binary="checks_ucontext")) < 1e-5
    assert max_err(result(emu_bins, "stencil_no_sync", "reverse", binary="checks_ucontext")) > 0.1
    assert "deadlock" in result(emu_bins, "barrier_vs_shuffle", "reverse", binary="checks_ucontext")
