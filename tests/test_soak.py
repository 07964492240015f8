"""Soak (``-m slow``; about 4 minutes): 1000 steps of every hook on 2 ranks, then 50 states made,
bound and closed. ``python benchmarks/soak.py`` prints and saves the same measurements."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("soak", os.path.join(ROOT, "benchmarks", "soak.py"))
soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(soak)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in soak.HOOKS if n != "none"])
def test_a_thousand_steps_hold_memory_threads_and_fds_flat(name):
    baseline = soak.run_hook("none", 1000)
    ranks = soak.run_hook(name, 1000)
    for base, r in zip(baseline, ranks):
        assert r["step"] == 1000
        # a per-step leak of a gradient-sized buffer (here ~50 KB) would add ~50 MB per 1000 steps;
        # DDP's own loop grows ~1.5 MB per 1000 steps on this machine
        assert r["rss_slope_kib_per_1000_steps"] - base["rss_slope_kib_per_1000_steps"] < 2048
        warm, end, closed = r["threads"]
        assert warm == end and closed == base["threads"][2]  # the queue's thread is gone after close()
        assert r["fds"][0] == r["fds"][1] and r["fds"][2] <= base["fds"][2] + 1


@pytest.mark.slow
def test_fifty_states_made_bound_and_closed_leave_nothing_behind():
    for rank in soak.churn(50):
        assert rank["after"]["groups"] == rank["before"]["groups"]
        assert rank["after"]["threads"] == rank["before"]["threads"]
        assert rank["after"]["fds"] <= rank["before"]["fds"] + 1
