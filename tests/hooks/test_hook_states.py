"""Hook states without a process group: argument checks (ValueError before any group is made)."""

import pytest
import torch

from commlib import compress, hooks


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("nope", {}, r"unknown hook 'nope'"),
        ("ef", {"compressor": "topk"}, r"compressor must be a commlib.compress.Compressor"),
        ("ef", {"compressor": compress.PowerSGD(2)}, r"use hooks.make\('powersgd'"),
        ("ef", {"collective": "ring"}, r"collective must be one of"),
        ("ef", {"compressor": compress.TopK(0.1), "collective": "allreduce"}, r"needs a summable compressor"),
        ("ef", {"error_feedback": 1}, r"error_feedback must be True or False"),
        ("powersgd", {"rank": 0}, r"rank must be an integer >= 1"),
        ("powersgd", {"min_compression_rate": -1}, r"min_compression_rate must be a number >= 0"),
        ("powersgd", {"warm_start": "yes"}, r"warm_start must be True or False"),
        ("powersgd", {"orthogonalization_epsilon": -1.0}, r"orthogonalization_epsilon must be a finite number >= 0"),
        ("powersgd", {"start_iter": 1}, r"start_iter must be an integer >= 2"),
        ("powersgd", {"seed": -1}, r"seed must be an integer >= 0"),
        ("ef", {"timeout": 0}, r"timeout must be a number > 0 \(seconds\)"),
        ("lgreco", {"family": "svd"}, r"family must be one of"),
        ("lgreco", {"family": "powersgd", "rank": 4, "candidates": [1, 2]}, r"default setting 4 must be one of"),
        ("lgreco", {"family": "powersgd", "alpha": 0}, r"alpha must be a finite number > 0"),
        ("lgreco", {"family": "powersgd", "retune_every": 0}, r"retune_every must be an integer >= 1"),
        ("lgreco", {"family": "powersgd", "retune_every": 5, "accumulate_steps": 6}, r"accumulate_steps must be <="),
        ("lgreco", {"family": "powersgd", "rank": 1, "candidates": [0, 1]}, r"candidates \(PowerSGD ranks\) must be an integer >= 1, got 0"),
        ("lgreco", {"family": "topk", "density": 0.5, "candidates": [0.5, 2.0]}, r"density must be a number in"),
        ("lgreco", {"family": "qsgd", "bits": 4, "candidates": [4, 9]}, r"bits must be an integer in \[1, 8\]"),
        ("lgreco", {"family": "topk", "collective": "two_phase"}, r"use collective='allgather'"),
    ],
)
def test_invalid_options_raise_value_error(name, options, match):
    with pytest.raises(ValueError, match=match):
        hooks.make(name, **options)


def test_invalid_on_mismatch_policy_raises():
    state, _ = hooks.make("ef")
    with pytest.raises(ValueError, match="on_mismatch must be one of"):
        state.load_state_dict({}, on_mismatch="ignore")


def test_a_state_of_the_old_format_is_refused():
    state, _ = hooks.make("ef")
    with pytest.raises(ValueError, match="not a commlib hook state of format"):
        state.load_state_dict({"method": "ef", "step": 3, "buffers": {}})


def test_names_list_every_hook():
    assert hooks.names() == ["allreduce", "fp16", "bf16", "ef", "ef21", "ef21w", "powersgd", "lgreco", "agvm", "dp_ef", "gc", "lowrank"]


def test_states_build_before_init_and_bind_at_first_use():
    import pickle

    state, _ = hooks.make("powersgd", rank=2)  # Lightning builds the state before init_process_group
    assert not state.bound
    clone = pickle.loads(pickle.dumps(state))  # spawned workers receive it pickled
    assert clone.matrix_approximation_rank == 2 and not clone.bound
    with pytest.raises(RuntimeError, match="initialized torch.distributed process group"):
        state.bind()


def test_cast_state_rejects_other_dtypes():
    with pytest.raises(ValueError, match="dtype must be torch.float16 or torch.bfloat16"):
        hooks.CastState(dtype=torch.float32)


def test_agvm_state_refuses_other_module_groups_before_any_process_group():
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    saved, _ = hooks.make("agvm", model=model, groups={"a": ["0."], "b": ["1."]}, tau=5)
    state = {"method": "agvm", "groups": list(saved.group_names), "options": saved.options()}  # what it records
    other, _ = hooks.make("agvm", model=model, groups={"b": ["1."], "a": ["0."]}, tau=5)
    with pytest.raises(ValueError, match="saved for module groups"):  # mu holds one multiplier per group
        other.load_state_dict(state)


def test_agvm_state_refuses_other_options_at_load():
    """tau, momentum, estimator and warm-up shape mu's history; they used to be saved and ignored."""
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    saved, _ = hooks.make("agvm", model=model, groups={"a": ["0."], "b": ["1."]}, tau=5)
    state = {"method": "agvm", "groups": list(saved.group_names), "options": saved.options()}
    other, _ = hooks.make("agvm", model=model, groups={"a": ["0."], "b": ["1."]}, tau=7)
    with pytest.raises(ValueError, match="tau=5 \\(now 7\\)"):
        other.load_state_dict(state)
