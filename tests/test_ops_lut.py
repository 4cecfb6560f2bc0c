"""The quantised lookup-table forward of the C++ kernels (``csrc/rpq_kernels.cpp``, ``lut_forward``).

Batches of one or two rows with 33-256 codewords and uint8 codes compute through 32-bit tables (the automatic
``"compressed"`` path where the CPU has AVX-512 VBMI); ``path="lut8"`` / ``"lut16"`` opt in to 8- and 16-bit tables.
Checked: the VBMI permutes against the scalar loop (the same bits), each width against an exact float64 reference
within the bound its quantisation allows, the 32-bit path within float32's tolerance against the stock-op kernels
(forward and backward, float32 and bfloat16), the opt-in paths' routing, and the work split between the calling
thread and a helper (``split_phases``): bit for bit the one-thread result, and a caller that never waits for a helper
that has not started. ``rpq_fx::_lut_split_hooks`` (tests only) forces the split on tiny calls and delays helpers.
"""

import os
import time

import pytest
import torch
from hypothesis import given, settings, strategies as st

import rpq_fx.ops as ops
from conftest import make_case, reference_expand
from rpq_fx import _kernels
from rpq_fx.ops import compute_path, linear
from rpq_fx.ops import policy
from rpq_fx.ops.policy import choose_path

pytestmark = pytest.mark.skipif(not _kernels.available(), reason=f"C++ kernels not built: {_kernels.build_error()}")

lut = torch.ops.rpq_fx._linear_lut if _kernels.available() else None
# the slices that share one scale (kLutGroup in the kernel); the bound below holds for any grouping
GROUP = 64


def _tables(x: torch.Tensor, codebooks: torch.Tensor, C: int) -> torch.Tensor:
    """Each row's table T[b, c, k] = codebooks[g(c), k] . x[b, c-th slice], in float64."""
    B, d = x.shape[0], codebooks.shape[2]
    cb = codebooks.double().expand(C, -1, -1)
    return torch.einsum("bcd,ckd->bck", x.double().view(B, C, d), cb)


def _quantisation_bound(x, codebooks, C: int, bits: int) -> torch.Tensor:
    """Per batch row: the most the quantised tables can move an output, C lookups each off by at most half a step of
    the widest slice's range over 2^bits - 2 steps (a group's step is at most that)."""
    T = _tables(x, codebooks, C)
    widest = (T.amax(-1) - T.amin(-1)).amax(-1)  # [B]
    return C * widest / (2 ** bits - 2) / 2


@settings(max_examples=30, deadline=None)
@given(C=st.integers(1, 70), K=st.integers(2, 256), d=st.sampled_from([1, 2, 3, 4, 8]), N=st.integers(1, 300),
       B=st.integers(1, 3), shared=st.booleans(), bits=st.sampled_from([8, 16, 24, 32]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_tables_are_within_their_quantisation_bound_and_simd_equals_scalar(C, K, d, N, B, shared, bits, dtype, seed):
    codebooks, ucodes, codes = make_case(C, K, d, N, shared, torch.float32, seed)
    codebooks = codebooks.to(dtype)
    x = torch.randn(B, C * d, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    out = lut(x, codebooks, codes, bits)
    assert out.shape == (B, N) and out.dtype == dtype
    assert torch.equal(out, lut(x, codebooks, codes, bits, False))  # VBMI permutes and the scalar loop: same bits

    exact = x.double() @ reference_expand(codebooks.double(), ucodes).t()
    magnitude = x.double().abs() @ reference_expand(codebooks.double(), ucodes).abs().t()
    # float32 sums (and the bfloat16 result's one rounding) on top of the quantisation
    rounding = 1e-6 * magnitude + (2.0 ** -8 * exact.abs() if dtype == torch.bfloat16 else 0)
    bound = _quantisation_bound(x, codebooks, C, bits).unsqueeze(1) * 1.001 + rounding + 1e-30
    assert (out.double() - exact).abs().le(bound).all()


def test_a_wrong_lookup_breaks_the_bound():
    """The bound is tight enough to catch one entry looked up at the wrong code."""
    codebooks, ucodes, codes = make_case(4, 256, 4, 200, True, torch.float32, 3)
    x = torch.randn(1, 16, generator=torch.Generator().manual_seed(4))
    wrong = ucodes.clone()
    wrong[2, 7] = (wrong[2, 7] + 128) % 256
    exact_wrong = x.double() @ reference_expand(codebooks.double(), wrong).t()
    out = lut(x, codebooks, codes, 8)
    bound = _quantisation_bound(x, codebooks, 4, 8)
    assert (out.double() - exact_wrong).abs().amax() > 3 * bound.item()


@pytest.mark.parametrize("d", [1, 2, 4, 8])
@pytest.mark.parametrize("K", [48, 256])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_automatic_small_batch_path_matches_the_stock_ops(d, K, shared, dtype):
    """Batches of one and two rows (32-bit tables where the CPU has VBMI) against the stock-op kernels, forward and
    backward: within float32's tolerance (bfloat16: one rounding of the result)."""
    C, N = 131, 203  # several groups of 64 slices, a last group of 3; blocks of 64 rows and a tail of 11
    codebooks, _, codes = make_case(C, K, d, N, shared, torch.float32, d * K)
    codebooks = codebooks.to(dtype)
    for B in (1, 2):
        x = torch.randn(B, C * d, generator=torch.Generator().manual_seed(B)).to(dtype)
        grad = torch.randn(B, N, generator=torch.Generator().manual_seed(B + 9)).to(dtype)
        results = []
        for stock in (False, True):
            xs, cbs = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
            with ops.stock_ops() if stock else compute_path("auto"):
                out = linear(xs, cbs, codes, None, "compressed")
                out.backward(grad)
            results.append((out.detach(), xs.grad, cbs.grad))
        (out, gx, gcb), (ref, rgx, rgcb) = results
        tol = dict(rtol=1e-4, atol=1e-5 * ref.abs().max().item()) if dtype == torch.float32 else \
            dict(rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
        torch.testing.assert_close(out, ref, **tol)
        torch.testing.assert_close(gx, rgx, **tol)
        torch.testing.assert_close(gcb, rgcb, rtol=tol["rtol"], atol=tol["rtol"] * rgcb.abs().max().item())


def test_lut_paths_are_opt_in_and_their_backward_is_exact():
    codebooks, _, codes = make_case(256, 256, 4, 512, True, torch.float32, 0)
    x = torch.randn(1, 1024)
    for path in ("auto", "compressed", "expand"):
        assert choose_path(x, codebooks, codes, path) in ("compressed", "expand")  # never an approximate path
    assert choose_path(x, codebooks, codes, "lut8") == "lut8"
    assert choose_path(x, codebooks, codes, "lut8", backward=True) == "compressed"
    assert choose_path(x.expand(8, -1), codebooks, codes, "lut16") == "lut16"
    assert choose_path(x.expand(9, -1), codebooks, codes, "lut16") == "compressed"  # row by row: slower there
    grad = torch.randn(1, 512)
    got = []
    for path in ("lut8", "compressed"):
        xs, cbs = x.clone().requires_grad_(), codebooks.clone().requires_grad_()
        with compute_path(path):
            out = linear(xs, cbs, codes)
        out.backward(grad)
        got.append((out.detach(), xs.grad, cbs.grad))
    assert torch.equal(got[0][0], lut(x, codebooks, codes, 8))  # the forward is the 8-bit kernel's
    assert not torch.equal(got[0][0], got[1][0])  # and it is approximate
    assert torch.equal(got[0][1], got[1][1]) and torch.equal(got[0][2], got[1][2])  # the backward is not
    torch.testing.assert_close(linear(x, codebooks, codes, None, "lut16"), lut(x, codebooks, codes, 16), rtol=0, atol=0)


def test_lut_paths_fall_back_where_the_kernel_does_not_apply(monkeypatch):
    wide_cb, _, wide_codes = make_case(3, 300, 2, 40, True, torch.float32, 1)  # int16 codes
    x = torch.randn(1, 6)
    narrow_cb, _, narrow_codes = make_case(3, 40, 2, 40, True, torch.float32, 1)
    assert choose_path(x, narrow_cb, narrow_codes, "lut8") == "lut8"
    with monkeypatch.context() as patch:
        patch.setattr(policy, "_cpu_has_vbmi", lambda: False)  # the scalar loop would be slower than float32's kernel
        assert choose_path(x, narrow_cb, narrow_codes, "lut8") == "compressed"
        assert policy._lut_max_rows() == 0
    assert choose_path(x, wide_cb, wide_codes, "lut8") == "compressed"
    torch.testing.assert_close(linear(x, wide_cb, wide_codes, None, "lut8"),
                               linear(x, wide_cb, wide_codes, None, "compressed"), rtol=0, atol=0)
    x64 = torch.randn(1, 6, dtype=torch.float64)
    assert choose_path(x64, wide_cb.double(), wide_codes, "lut16") == "compressed"
    with pytest.raises(RuntimeError, match="uint8 codes, at most 256 codewords"):
        lut(x, wide_cb, wide_codes, 8)
    cb, _, codes = make_case(3, 40, 2, 40, True, torch.float32, 1)
    with pytest.raises(RuntimeError, match="bits must be 8, 16, 24 or 32, got 12"):
        lut(x, cb, codes, 12)
    bad = codes.clone()
    bad[1, 5] = 40
    with pytest.raises(IndexError, match="code 40 is out of range for 40 codewords"):
        lut(x, cb, bad, 8)


@pytest.mark.parametrize("bits", [8, 32])
def test_a_non_finite_input_makes_its_row_nan(bits):
    cb, _, codes = make_case(70, 64, 2, 130, False, torch.float32, 2)
    x = torch.randn(2, 140)
    x[1, 77] = float("inf")
    out = lut(x, cb, codes, bits)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()
    x[1, 77] = float("nan")
    assert torch.isnan(lut(x, cb, codes, bits, False)[1]).all()


# ------------------------------------------------------------------ the split between the calling thread and a helper
split_hooks = torch.ops.rpq_fx._lut_split_hooks if _kernels.available() else None
NEVER = 1 << 62  # no call is estimated at this many ns: everything on the calling thread
threads = torch.get_num_threads()
# reason: xdist workers run torch with one thread (tests/conftest.py); the split needs a second, so these tests set two
needs_two = pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: nothing to split")


LAUNCHED, TEAM = 0, 1  # who helps the caller: helpers on the inter-op pool, or the intra-op (OpenMP) team


def hooks(min_ns: int = -1, helper_delay_us: int = 0, caller_delay_us: int = 0, mode: int = -1) -> int:
    """Sets the kernel's test hooks; the number of tasks helpers have run so far."""
    return split_hooks(min_ns, helper_delay_us, caller_delay_us, mode)[3]


@pytest.fixture
def defaults():
    """Two torch threads for the test (a helper to split with); the kernel's defaults (split from its threshold, no
    delays) and torch's threads restored after it."""
    torch.set_num_threads(2)
    yield
    hooks()
    torch.set_num_threads(threads)


def _one_thread_and_split(x, codebooks, codes, bits=32, mode=-1):
    """The kernel's result on the calling thread alone, and split with the caller held back 1 ms, so that a helper
    computes most tasks even of a tiny call."""
    hooks(NEVER)
    alone = lut(x, codebooks, codes, bits)
    hooks(0, 0, 1000, mode)
    return alone, lut(x, codebooks, codes, bits)


@needs_two
@pytest.mark.parametrize("d", [1, 2, 4, 8, 128])
@pytest.mark.parametrize("K", [16, 256])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", [LAUNCHED, TEAM])
def test_the_split_is_bit_identical_to_one_thread_and_matches_the_stock_ops(defaults, d, K, shared, dtype, mode):
    """Odd sizes (a last group of 3 slices, a last band of 11 rows), both table layouts (a group per task for cheap
    tables; a few slices per task, then a quantisation phase, for long slices), one to three rows."""
    C, N = (131, 523) if d < 128 else (67, 523)
    codebooks, _, codes = make_case(C, K, d, N, shared, torch.float32, d * K + shared)
    codebooks = codebooks.to(dtype)
    before = hooks()
    for B in (1, 2, 3):
        x = torch.randn(B, C * d, generator=torch.Generator().manual_seed(B)).to(dtype)
        alone, split = _one_thread_and_split(x, codebooks, codes, mode=mode)
        assert torch.equal(alone, split)
        assert torch.equal(*_one_thread_and_split(x, codebooks, codes, 8, mode))  # narrower tables: the same phases
        with ops.stock_ops():
            ref = linear(x, codebooks, codes, None, "compressed")
        tol = dict(rtol=1e-4, atol=1e-5 * ref.abs().max().item()) if dtype == torch.float32 else \
            dict(rtol=2 ** -7, atol=2 ** -7 * ref.abs().max().item())
        torch.testing.assert_close(split, ref, **tol)
    assert hooks() > before  # helpers computed some of it


@needs_two
@pytest.mark.parametrize("d, shared", [(4, True), (128, False)])
def test_a_helper_takes_part_without_hooks_delaying_the_caller(defaults, d, shared):
    """At the default threshold, calls of a layer big enough to outlast a helper's wake-up hand it tasks, and every
    result is the one-thread one."""
    C, N = (1024, 4096) if d == 4 else (72, 4096)
    codebooks, _, codes = make_case(C, 256, d, N, shared, torch.float32, 5)
    x = torch.randn(1, C * d)
    hooks(NEVER)
    alone = lut(x, codebooks, codes, 32)
    before = hooks()
    deadline = time.monotonic() + 10.0  # reason: a busy machine may keep the helper off a core for a while
    while hooks() == before and time.monotonic() < deadline:
        assert torch.equal(lut(x, codebooks, codes, 32), alone)
    assert hooks() > before, "no helper ran a task in 10 s of calls"


def test_one_thread_never_splits(defaults):
    codebooks, _, codes = make_case(1024, 256, 4, 4096, True, torch.float32, 6)
    x = torch.randn(1, 4096)
    torch.set_num_threads(1)
    before = hooks(0, 0, 1000)
    for _ in range(5):
        lut(x, codebooks, codes, 32)
    assert hooks() == before


@needs_two
def test_the_caller_does_not_wait_for_a_helper_that_never_starts(defaults):
    """With every helper held back 200 ms, a call of about a millisecond returns in far less than that, with the
    right result, its helper having run nothing; the helper, starting after the call returned and its tensors were
    freed, runs nothing either and touches only the state it shares (scripts/asan.sh runs this under ASan)."""
    codebooks, _, codes = make_case(1024, 256, 4, 4096, True, torch.float32, 7)
    x = torch.randn(2, 4096)
    hooks(NEVER)
    alone = lut(x, codebooks, codes, 32)
    before = hooks(0, 200_000, 0, LAUNCHED)
    start = time.perf_counter()
    out = lut(x, codebooks, codes, 32)
    elapsed = time.perf_counter() - start
    assert torch.equal(out, alone)
    assert elapsed < 0.1, f"the call took {elapsed * 1e3:.0f} ms: it waited for the delayed helper"
    assert hooks(0, 200_000, 0, LAUNCHED) == before
    del out, x, codebooks, codes
    time.sleep(0.4)  # the late helper starts, finds every counter spent and leaves
    assert hooks() == before


@needs_two
def test_a_late_team_sends_the_next_calls_to_launched_helpers(defaults):
    """The intra-op team's join waits for its worker: held back 50 ms, the first call waits for it; the calls after
    it go to launched helpers (the caller never waits for those) and return in far less; all give the one-thread
    result. After the back-off the team is tried again and, joined in time, keeps the calls."""
    codebooks, _, codes = make_case(1024, 256, 4, 4096, True, torch.float32, 7)
    x = torch.randn(1, 4096)
    hooks(NEVER)
    alone = lut(x, codebooks, codes, 32)
    hooks(0, 0, 0, TEAM)  # forgets any lateness measured before
    assert split_hooks(0, 50_000, 0, -1)[5] == 1  # the next call goes to the team
    start = time.perf_counter()
    assert torch.equal(lut(x, codebooks, codes, 32), alone)
    assert time.perf_counter() - start >= 0.05  # it waited at the join
    assert split_hooks(0, 50_000, 0, -1)[5] == 0  # the team is backed off
    start = time.perf_counter()
    assert torch.equal(lut(x, codebooks, codes, 32), alone)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.04, f"the call took {elapsed * 1e3:.0f} ms: it waited for the late team"
    time.sleep(0.15)  # past the back-off (100 ms)
    assert split_hooks(0, 0, 0, -1)[5] == 1  # the team is tried again (its worker no longer held back) ...
    for _ in range(50):  # reason: on a busy machine the worker may still be late (that is the point)
        hooks(0, 0, 0, TEAM)  # (forgets the lateness)
        split_hooks(0, 0, 0, -1)
        assert torch.equal(lut(x, codebooks, codes, 32), alone)
        if split_hooks(0, 0, 0, -1)[5] == 1:
            break  # ... and, joined in time, keeps the calls
    else:
        pytest.fail("the team never joined in time in 50 calls")


@needs_two
@pytest.mark.parametrize("mode", [LAUNCHED, TEAM])
def test_a_caller_inside_a_parallel_region_computes_every_task(defaults, mode):
    """Called by each thread of a two-thread ATen parallel region (the team's region then runs inline on the caller,
    whose thread number there is 0 or 1), the split computes every output: the one-thread result, on both threads."""
    codebooks, _, codes = make_case(72, 256, 128, 1024, False, torch.float32, 11)
    x = torch.randn(1, 72 * 128)
    hooks(NEVER)
    alone = lut(x, codebooks, codes, 32)
    hooks(0, 0, 0, mode)
    results = torch.ops.rpq_fx._linear_lut_in_region(x, codebooks, codes)
    assert len(results) == 2 and all(torch.equal(r, alone) for r in results)


@needs_two
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_computes_without_helpers(defaults):
    """After the parent's helpers have run, a forked child (a DataLoader worker) computes on its own thread: at::launch
    there blocked for ever (the pool's threads are not in the child)."""
    codebooks, _, codes = make_case(256, 256, 4, 1024, True, torch.float32, 8)
    x = torch.randn(1, 1024)
    hooks(NEVER)
    alone = lut(x, codebooks, codes, 32)
    hooks(0, 0, 1000)
    lut(x, codebooks, codes, 32)  # the parent's inter-op pool is running
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether it computed the one-thread result, and exit without pytest's teardown
        ok = torch.equal(lut(x, codebooks, codes, 32), alone)
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    deadline = time.monotonic() + 30.0
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    assert os.read(read, 1) == b"1"
    os.close(read)


CALLS = 20
TASKS_PER_CALL = 16  # this case's tasks in all phases: a helper runs all 16 when the caller is held back 20 ms


@needs_two
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not os.path.isdir("/proc/self/task"), reason="Linux only")
def test_a_helper_on_the_callers_cpu_leaves_it_to_the_caller(defaults):
    """Every thread of the process held to one CPU: a helper can only run where the caller runs (it would preempt the
    caller and run every task itself), so it leaves without claiming any, and the result is the one-thread one."""
    codebooks, _, codes = make_case(512, 256, 4, 2048, True, torch.float32, 9)
    x = torch.randn(1, 2048)
    hooks(NEVER)
    alone = lut(x, codebooks, codes, 32)
    hooks(0, 0, 0, LAUNCHED)
    lut(x, codebooks, codes, 32)  # the inter-op pool's threads exist before the affinity is set
    tasks = [int(t) for t in os.listdir("/proc/self/task")]
    saved = {t: os.sched_getaffinity(t) for t in tasks}
    cpu = min(saved[os.getpid()])
    try:
        for t in tasks:
            os.sched_setaffinity(t, {cpu})
        before = hooks(0, 0, 0, LAUNCHED)
        for _ in range(CALLS):
            assert torch.equal(lut(x, codebooks, codes, 32), alone)
        # reason: on a busy machine (two busy loops beside `pytest -n 2`) helpers still ran 21-43% of the tasks in 3
        # of 12 runs (why is not known yet: a note on issue 23); without the leave check a helper woken there runs
        # nearly all of them, so the bound is half
        assert hooks(0, 0, 0, LAUNCHED) - before < CALLS * TASKS_PER_CALL / 2
    finally:
        for t, mask in saved.items():
            try:
                os.sched_setaffinity(t, mask)
            except OSError:  # reason: a thread that ended meanwhile
                pass
