"""AGVM around other hooks: mu against a one-process reference, identical ranks, exact no-ops, bad groupings."""

import io
import math

import pytest
import torch
import torch.distributed as dist
from conftest import WorkerError, run_world
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import hooks
from commlib.hooks.agvm import halves_phi, modulation, scalar_phi

GROUPS = {"backbone": "backbone", "neck": "neck", "head_a": "head_a", "head_b": "head_b"}
SMALL_BUCKETS = {"bucket_cap_mb": 0.004}


class Detector(nn.Module):
    """Backbone, neck and two heads with very different gradient statistics."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.backbone = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 32))
        self.neck = nn.Linear(32, 32)
        self.head_a = nn.Linear(32, 6)
        self.head_b = nn.Linear(32, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)

    def forward(self, x):
        h = torch.tanh(self.neck(torch.tanh(self.backbone(x))))
        return self.head_a(h), self.head_b(h)


def loss_of(model, rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(16, 20, generator=gen)
    ya, yb = torch.randn(16, 6, generator=gen), torch.randn(16, 1, generator=gen)
    a, b = model(x)
    return nn.functional.mse_loss(a, ya) + nn.functional.mse_loss(b, yb)


def _train(rank, world_size, hook, options, steps=8, modulate=True, record=False):
    model = Detector()
    ddp = DDP(model, **SMALL_BUCKETS)
    state, fn = hooks.make(hook, model=model, **options)
    records = {}
    if record:
        def recording(st, bucket):
            step = st.step
            for p, g in zip(bucket.parameters(), bucket.gradients()):
                records.setdefault(step, {})[st._param_names[id(p)]] = g.detach().clone()
            return fn(st, bucket)

        ddp.register_comm_hook(state, recording)
    else:
        ddp.register_comm_hook(state, fn)
    groups = hooks.param_groups_by_module(model, options.get("groups", GROUPS)) if hook == "agvm" else None
    opt = torch.optim.SGD(groups if groups else model.parameters(), lr=0.05)
    extra = []
    for step in range(steps):
        opt.zero_grad()
        loss_of(ddp, rank, step).backward()
        if hook == "agvm" and modulate:
            with state.modulate(opt):
                opt.step()
            extra.append(state.stats()["extra_bytes_last_step"])
        else:
            opt.step()
    dist.barrier()
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    saved = io.BytesIO()
    torch.save(state.state_dict(), saved)
    return {"params": params, "state_dict": saved.getvalue(), "stats": state.stats() if hook == "agvm" else None, "records": records,
            "extra": extra, "lrs": [g["lr"] for g in opt.param_groups]}


AGVM = {"groups": GROUPS, "tau": 2, "start_iter": 2}


def reference_mu(records_per_rank, world, estimator, tau=2, start=2, momentum=0.97):
    names = list(dict.fromkeys(GROUPS.values()))
    half = world // 2
    mu = [1.0] * len(names)
    history = []
    for step in sorted(records_per_rank[0]):
        if step < start or (step - start) % tau:
            continue
        stats = [[0.0, 0.0, 0.0] for _ in names]
        for key in records_per_rank[0][step]:
            i = names.index(GROUPS[key.split(".")[0]])
            grads = [records_per_rank[r][step][key].double() for r in range(world)]
            if estimator == "halves":
                ga = sum(grads[:half]) / half
                gb = sum(grads[half:]) / (world - half)
                stats[i][0] += float((ga * gb).sum())
                stats[i][1] += float(ga.pow(2).sum())
                stats[i][2] += float(gb.pow(2).sum())
            else:
                mean = sum(grads) / world
                stats[i][0] += sum(float(g.pow(2).sum()) for g in grads) / world
                stats[i][1] += float(mean.pow(2).sum())
        phis = [halves_phi(*s) if estimator == "halves" else scalar_phi(s[0], s[1]) for s in stats]
        new = [modulation(phis[0], p) for p in phis]
        mu = [momentum * m + (1 - momentum) * n for m, n in zip(mu, new)]
        history.append(mu)
    return history


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("estimator", ["halves", "scalar"])
def test_mu_equals_the_reference_and_ranks_agree(world, estimator):
    out = run_world(_train, world, kwargs=dict(hook="agvm", options=dict(AGVM, estimator=estimator), record=True))
    expected = reference_mu([o["records"] for o in out], world, estimator)
    got = [h["mu"] for h in out[0]["stats"]["history"]]
    assert len(got) == len(expected) == 3
    for g, e in zip(got, expected):
        assert g[0] == 1.0  # the reference group
        assert g == pytest.approx(e, rel=1e-5)
    assert any(abs(m - 1.0) > 1e-4 for m in got[-1])  # the heads really are modulated
    for o in out[1:]:
        assert o["stats"]["history"] == out[0]["stats"]["history"]
        assert torch.equal(o["params"], out[0]["params"])
    extra = out[0]["extra"]  # added communication: only on estimation steps (2, 4, 6)
    assert [e > 0 for e in extra] == [s >= 2 and s % 2 == 0 for s in range(8)]


@pytest.mark.parametrize("inner,options", [("powersgd", {"rank": 2}), ("ef", {})])
def test_wrapping_keeps_the_inner_hook_results(inner, options):
    alone = run_world(_train, 2, kwargs=dict(hook=inner, options=options))
    wrapped = run_world(_train, 2, kwargs=dict(hook="agvm", options=dict(AGVM, inner=inner, inner_options=options),
                                               modulate=False))
    assert torch.equal(alone[0]["params"], wrapped[0]["params"])  # the reduction itself is untouched
    modulated = run_world(_train, 2, kwargs=dict(hook="agvm", options=dict(AGVM, inner=inner, inner_options=options)))
    assert torch.equal(modulated[0]["params"], modulated[1]["params"])
    assert not torch.equal(modulated[0]["params"], alone[0]["params"])


def test_one_group_changes_nothing():
    alone = run_world(_train, 2, kwargs=dict(hook="powersgd", options={"rank": 2}))
    one = {"groups": {"": "all"}, "tau": 2, "start_iter": 2, "inner": "powersgd", "inner_options": {"rank": 2}}
    one["groups"] = {"backbone": "all", "neck": "all", "head_a": "all", "head_b": "all"}
    wrapped = run_world(_train, 2, kwargs=dict(hook="agvm", options=one))
    assert torch.equal(alone[0]["params"], wrapped[0]["params"])
    assert wrapped[0]["lrs"] == [0.05]
    assert wrapped[0]["extra"] == [0] * 8


def _make(rank, world_size, **options):
    hooks.make("agvm", model=Detector(), **options)


@pytest.mark.parametrize("groups,match", [
    ({"backbone": "b", "backbone.0": "c", "neck": "n", "head_a": "a", "head_b": "h"}, "overlapping"),
    ({"backbone": "b", "neck": "n"}, "in no group"),
    ({}, "non-empty"),
])
def test_invalid_groupings_raise(groups, match):
    with pytest.raises(WorkerError, match=f"ValueError: .*{match}"):
        run_world(_make, 2, kwargs=dict(groups=groups))


def test_bad_options_and_spanning_param_groups_raise():
    with pytest.raises(WorkerError, match="ValueError: tau"):
        run_world(_make, 2, kwargs=dict(groups=GROUPS, tau=0))
    with pytest.raises(WorkerError, match="ValueError: estimator"):
        run_world(_make, 2, kwargs=dict(groups=GROUPS, estimator="full"))
    with pytest.raises(WorkerError, match="spans module groups"):
        run_world(_spanning, 2)


def _spanning(rank, world_size):
    model = Detector()
    state, _ = hooks.make("agvm", model=model, groups=GROUPS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with state.modulate(opt):
        pass


def test_propose_groups_and_state_dict_round_trip():
    model = Detector()
    assert hooks.propose_groups(model) == GROUPS
    out = run_world(_round_trip, 2)
    assert out[0]["mu"] == out[1]["mu"] and out[0]["loaded"] == out[0]["mu"]


def _round_trip(rank, world_size):
    result = _train(rank, world_size, "agvm", dict(AGVM))
    model = Detector()
    state, _ = hooks.make("agvm", model=model, **AGVM)  # the options it was saved with
    state.load_state_dict(torch.load(io.BytesIO(result["state_dict"]), weights_only=True))
    assert state.stats()["history"] == result["stats"]["history"] and state.step == 8
    return {"mu": result["stats"]["mu"], "loaded": state.multipliers()}


def test_modulation_math():
    assert modulation(0.3, 0.3) == 1.0
    assert modulation(1.0, 0.0) == pytest.approx(math.sqrt(10))  # clamped
    assert modulation(0.0, 1.0) == pytest.approx(math.sqrt(0.5))
    assert halves_phi(1.0, 1.0, 1.0) == 0.0 and halves_phi(-2.0, 1.0, 4.0) == 2.0


def test_design_group_format_is_accepted():
    model = Detector()
    listed = {"backbone": ["backbone."], "neck": ["neck."], "heads": ["head_a.", "head_b"]}
    from commlib.hooks.agvm import assign_groups, group_order

    assignment = assign_groups(model, listed)
    assert group_order(listed) == ["backbone", "neck", "heads"]
    assert assignment["head_a.weight"] == "heads" and assignment["head_b.bias"] == "heads"
    assert assignment["backbone.0.weight"] == "backbone"
    with pytest.raises(ValueError, match="overlapping"):
        assign_groups(model, {"a": ["backbone."], "b": ["backbone.0"], "c": ["neck", "head_a", "head_b"]})
