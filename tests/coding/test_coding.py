"""Gradient codes, the (B, W, lambda) straggler model, and SR-SGC / M-SGC with real vector arithmetic."""

import itertools
import math

import numpy as np
import pytest

from commlib import coding


def full_gradient_check(code, stragglers, dim=3, seed=0):
    g = np.random.default_rng(seed).standard_normal((code.n, dim))
    alive = [i for i in range(code.n) if i not in stragglers]
    a = code.decode(alive)
    assert np.all(a[list(stragglers)] == 0)
    messages = np.stack([code.encode(i, g) for i in range(code.n)])
    return np.abs(a @ messages - g.sum(0)).max(), a


@pytest.mark.parametrize("n,s", [(3, 1), (6, 1), (6, 2), (8, 3), (9, 2), (12, 2), (12, 3)])
@pytest.mark.parametrize("kind", ["cyclic", "frc"])
def test_every_pattern_up_to_s_decodes_exactly(n, s, kind):
    if kind == "frc" and n % (s + 1):
        pytest.skip("fractional repetition needs (s+1) | n")
    code = coding.CyclicRepetition(n, s) if kind == "cyclic" else coding.FractionalRepetition(n, s)
    assert all(len(code.parts(i)) == s + 1 for i in range(n))  # load (s+1)/n
    assert code.normalized_load == (s + 1) / n
    for k in range(s + 1):
        for stragglers in itertools.combinations(range(n), k):
            error, a = full_gradient_check(code, stragglers)
            assert error < 1e-8, (stragglers, error)
            assert np.abs(a @ code.B - 1).max() < 1e-8


@pytest.mark.parametrize("n,s", [(6, 1), (8, 2), (12, 3)])
@pytest.mark.parametrize("kind", ["cyclic", "frc"])
def test_s_plus_one_stragglers_are_detected_never_silently_wrong(n, s, kind):
    if kind == "frc" and n % (s + 1):
        pytest.skip("fractional repetition needs (s+1) | n")
    code = coding.CyclicRepetition(n, s) if kind == "cyclic" else coding.FractionalRepetition(n, s)
    failures = 0
    for stragglers in itertools.combinations(range(n), s + 1):
        try:
            error, _ = full_gradient_check(code, stragglers)
        except coding.Undecodable:
            failures += 1
            continue
        assert error < 1e-8  # when it does decode, it is right
    assert failures > 0


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="s must"):
        coding.CyclicRepetition(4, 4)
    with pytest.raises(ValueError, match=r"\(s\+1\) \| n"):
        coding.FractionalRepetition(7, 1)
    with pytest.raises(ValueError, match="B | \\(W - 1\\)"):
        coding.SRSGC(8, B=2, W=4, lam=2)
    with pytest.raises(ValueError, match="B must be <= W"):
        coding.StragglerModel(B=4, W=3, lam=1)
    assert issubclass(coding.Undecodable, ValueError)


def test_straggler_model_check():
    model = coding.StragglerModel(B=2, W=4, lam=2)
    ok = np.zeros((8, 5), dtype=int)
    ok[1:3, 0] = 1  # one burst of 2
    ok[5, 1] = 1
    assert model.check(ok)
    too_long = ok.copy()
    too_long[3, 0] = 1  # burst of 3 > B
    assert not model.check(too_long)
    two_bursts = ok.copy()
    two_bursts[4, 0] = 1  # worker 0 again inside the window
    assert not model.check(two_bursts)
    crowded = np.zeros((4, 5), dtype=int)
    crowded[0, 0] = crowded[1, 1] = crowded[2, 2] = 1  # 3 distinct in a window of 4 > lam
    assert not model.check(crowded)


@pytest.mark.parametrize("B,W,lam,n", [(1, 2, 4, 8), (1, 3, 4, 8), (2, 5, 4, 10), (2, 3, 3, 12), (1, 3, 6, 12)])
def test_sampled_patterns_follow_the_model(B, W, lam, n):
    model = coding.StragglerModel(B, W, lam)
    pattern = model.sample(n, 60, generator=B * 100 + W * 10 + lam)
    assert model.check(pattern) and pattern.sum() > 10


SCHEMES = [(1, 2, 4, 8), (1, 3, 4, 8), (2, 5, 4, 10), (1, 3, 6, 12), (2, 3, 3, 12)]


@pytest.mark.parametrize("B,W,lam,n", SCHEMES)
@pytest.mark.parametrize("scheme", ["SRSGC", "MSGC"])
def test_sequential_schemes_decode_every_job_by_its_deadline(scheme, B, W, lam, n):
    if scheme == "SRSGC" and (W - 1) % B:
        pytest.skip("SR-SGC needs B | (W - 1)")
    sgc = getattr(coding, scheme)(n, B, W, lam)
    jobs = 40
    for trial in range(5):
        pattern = sgc.model.sample(n, jobs + sgc.T, generator=1000 * trial + n)
        assert sgc.model.check(pattern)
        result = sgc.simulate(pattern, jobs, seed=trial)
        assert len(result.decoded_round) == jobs
        assert [r for r in result.decoded_round] == [t + sgc.T for t in range(jobs)]
        assert max(result.max_error) < 1e-9
        steady = result.work[sgc.T + 1: jobs]  # rounds with a full pipeline
        np.testing.assert_allclose(steady, sgc.normalized_load, rtol=1e-12)


def test_loads_match_the_paper_table_and_beat_gc():
    """n = 256 (the note's table): SR-SGC's s and M-SGC's load against GC(lam)'s (lam+1)/n."""
    n = 256
    table = {(1, 2, 4): (2, 1.67), (1, 3, 8): (3, 1.42), (2, 5, 16): (6, 1.46), (2, 7, 32): (8, 1.32)}
    for (B, W, lam), (s, msgc_load_times_n) in table.items():
        assert coding.SRSGC.parameter_s(B, W, lam) == s
        load = coding.MSGC.load_formula(n, B, W, lam)
        assert load * n == pytest.approx(msgc_load_times_n, abs=0.005)
        assert load < (s + 1) / n < (lam + 1) / n  # M-SGC < SR-SGC < GC(lam)


def test_gc_fails_where_sequential_codes_succeed():
    """A burst that puts 4 stragglers in one round breaks GC(s=2) but not SR-SGC / M-SGC (lam=4)."""
    n, B, W, lam = 8, 1, 3, 4
    pattern = np.zeros((12, n), dtype=int)
    pattern[3, :4] = 1
    assert coding.StragglerModel(B, W, lam).check(pattern)
    gc = coding.GCScheme(n, 2).simulate(pattern, 10)
    assert not gc.all_decoded
    for scheme in (coding.SRSGC(n, B, W, lam), coding.MSGC(n, B, W, lam)):
        result = scheme.simulate(pattern, 10)
        assert result.all_decoded and max(result.max_error) < 1e-9


# ------------------------------------------------------------------------------------------------ scale
def test_codes_and_schemes_build_at_n_256_in_seconds_and_bounded_memory():
    """The papers' worker counts: C(256, 16) ~ 1e25 straggler sets are sampled, never enumerated
    (the cyclic code used to build the list of all of them and die with MemoryError)."""
    import time
    import tracemalloc

    tracemalloc.start()
    try:
        for build in (lambda: coding.CyclicRepetition(256, 16), lambda: coding.FractionalRepetition(256, 15),
                      lambda: coding.SRSGC(256, 2, 5, 16), lambda: coding.MSGC(256, 2, 5, 16)):
            start = time.perf_counter()
            built = build()
            assert time.perf_counter() - start < 20.0, built
        assert tracemalloc.get_traced_memory()[1] < 64 * 2**20  # bytes at the peak
    finally:
        tracemalloc.stop()


def test_n_256_codes_decode_sampled_straggler_sets_exactly():
    rng = np.random.default_rng(5)
    cyclic = coding.CyclicRepetition(256, 16)
    frc = coding.FractionalRepetition(256, 15)
    for code in (cyclic, frc):
        assert code.normalized_load == 17 / 256 if code is cyclic else 16 / 256
        for _ in range(6):
            stragglers = set(rng.choice(256, code.s, replace=False).tolist())
            a = code.decode([i for i in range(256) if i not in stragglers])
            assert np.abs(a @ code.B - 1.0).max() < 1e-8
            assert all(a[i] == 0 for i in stragglers)
    with pytest.raises(coding.Undecodable):  # s + 1 stragglers of one FRC group
        frc.decode([i for i in range(256) if i >= 16])


def test_n_256_schemes_have_the_formula_loads_and_decode_sampled_bursts():
    model = coding.StragglerModel(B=2, W=5, lam=16)
    sr = coding.SRSGC(256, 2, 5, 16)
    ms = coding.MSGC(256, 2, 5, 16)
    assert sr.s == math.ceil(2 * 16 / (5 - 1 + 2)) and sr.normalized_load == (sr.s + 1) / 256
    assert ms.normalized_load == pytest.approx(17 * 6 / (256 * (2 + 4 * 17)))
    pattern = model.sample(256, 12, np.random.default_rng(3), start_probability=0.02)
    assert model.check(pattern)
    for scheme in (sr, ms):
        sim = scheme.simulate(pattern, jobs=6, dim=2)
        assert sim.all_decoded and max(sim.max_error) < 1e-6
        assert sim.work.max(axis=1).max() == pytest.approx(scheme.normalized_load)
