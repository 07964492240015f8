"""The low-rank optimizers under DDP (gloo, 2 ranks), with gradient accumulation, and under DeepSpeed."""

import importlib.util

import pytest
import torch
import torch.distributed as dist
from conftest import run_world
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib.optim import FiraAdamW, FrugalAdamW, GaLoreAdamW

from .test_optimizers import Tiny, batch, flat, groups

CASES = [
    (GaLoreAdamW, {"rank": 4, "update_proj_gap": 2}),
    (GaLoreAdamW, {"rank": 4, "update_proj_gap": 2, "projector": "dct"}),
    (FiraAdamW, {"rank": 4, "update_proj_gap": 2, "projector": "random"}),
    (FrugalAdamW, {"density": 0.25, "update_proj_gap": 2}),
]
IDS = [f"{c.__name__}-{o.get('projector', 'svd')}" for c, o in CASES]
STEPS, MICRO = 6, 2


def _ddp_train(rank, world_size, cls, options):
    model = Tiny()
    ddp = DDP(model)
    opt = cls(groups(model, **options), lr=1e-2)
    for step in range(STEPS):
        opt.zero_grad()
        for micro in range(MICRO):  # gradient accumulation: DDP averages once, at the last micro-batch
            x, y = batch(1000 * step + 10 * micro + rank)
            if micro < MICRO - 1:
                with ddp.no_sync():
                    (nn.functional.mse_loss(ddp(x), y) / MICRO).backward()
            else:
                (nn.functional.mse_loss(ddp(x), y) / MICRO).backward()
        opt.step()
    dist.barrier()
    return flat(model)


def reference(cls, options, world):
    """One process: the gradient DDP produces (mean over ranks of the accumulated micro-batches)."""
    model = Tiny()
    opt = cls(groups(model, **options), lr=1e-2)
    for step in range(STEPS):
        opt.zero_grad()
        for rank in range(world):
            for micro in range(MICRO):
                x, y = batch(1000 * step + 10 * micro + rank)
                (nn.functional.mse_loss(model(x), y) / (MICRO * world)).backward()
        opt.step()
    return flat(model)


@pytest.mark.parametrize("cls,options", CASES, ids=IDS)
def test_ddp_with_accumulation_keeps_ranks_identical_and_follows_the_mean_gradient(cls, options):
    out = run_world(_ddp_train, 2, kwargs=dict(cls=cls, options=options))
    assert torch.equal(out[0], out[1])  # the projector comes from the averaged gradient: same everywhere
    torch.testing.assert_close(out[0], reference(cls, options, 2), rtol=1e-4, atol=1e-5)


def _deepspeed_train(rank, world_size, cls, options):
    import os

    os.environ["LOCAL_RANK"] = str(rank)  # what DeepSpeed's launcher would set
    import deepspeed

    model = Tiny()
    opt = cls(groups(model, **options), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config,
                                           dist_init_required=False)
    for step in range(STEPS):
        x, y = batch(1000 * step + rank)
        loss = nn.functional.mse_loss(engine(x), y)
        engine.backward(loss)
        engine.step()
    dist.barrier()
    return flat(model)


def _ddp_plain(rank, world_size, cls, options):
    model = Tiny()
    ddp = DDP(model)
    opt = cls(groups(model, **options), lr=1e-2)
    for step in range(STEPS):
        x, y = batch(1000 * step + rank)
        opt.zero_grad()
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    return flat(model)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (.[deepspeed])")
@pytest.mark.parametrize("cls,options", CASES[:1] + CASES[2:], ids=IDS[:1] + IDS[2:])
def test_deepspeed_client_optimizer_zero0(cls, options, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    out = run_world(_deepspeed_train, 2, kwargs=dict(cls=cls, options=options), timeout=180)
    assert torch.equal(out[0], out[1])
    ddp = run_world(_ddp_plain, 2, kwargs=dict(cls=cls, options=options))
    torch.testing.assert_close(out[0], ddp[0], rtol=1e-5, atol=1e-6)  # ZeRO-0 = DDP averaging + our step


def _deepspeed_zero(rank, world_size, cls, options, stage):
    import os

    os.environ["LOCAL_RANK"] = str(rank)
    import deepspeed

    model = Tiny()
    opt = cls(groups(model, **options), lr=1e-2)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9, "gradient_clipping": 0.0}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config, dist_init_required=False)
    before = flat(model).clone()
    x, y = batch(rank)
    engine.backward(nn.functional.mse_loss(engine(x), y))
    try:
        engine.step()
    except RuntimeError as err:
        return str(err), torch.equal(before, flat(model))
    return "trained", False


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (.[deepspeed])")
@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("cls,options", [CASES[0], CASES[3]], ids=[IDS[0], IDS[3]])
def test_deepspeed_zero_flattening_is_refused(cls, options, stage, monkeypatch):
    """ZeRO >= 1 hands the client optimizer 1-D flat partitions: the low-rank optimizer raises at its
    first step, naming ZeRO and the way out, and leaves the parameters untouched."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for message, untouched in run_world(_deepspeed_zero, 2, args=(cls, options, stage), timeout=180):
        assert "ZeRO stage >= 1" in message and "FSDP2" in message, message
        assert untouched


# ------------------------------------------------------------------------------------------------ DCP
def _dcp_optim(rank, world_size, cls, options, path, phase, steps):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = Tiny()
    ddp = DDP(model)
    opt = cls(groups(model, **options), lr=1e-2)
    start = 0
    if phase == "resume":
        # get_state_dict of a fresh optimizer runs one step with lr = 0 to make its state; the load
        # must then overwrite every part of it (step counters, projectors, moments)
        model_sd, optim_sd = get_state_dict(model, opt)
        holder = {"model": model_sd, "optim": optim_sd, "start": 0}
        dcp.load(holder, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=holder["model"], optim_state_dict=holder["optim"])
        start = holder["start"]
    for step in range(start, start + steps):
        opt.zero_grad()
        x, y = batch(1000 * step + rank)
        nn.functional.mse_loss(ddp(x), y).backward()
        opt.step()
    if phase == "save":
        model_sd, optim_sd = get_state_dict(model, opt)
        dcp.save({"model": model_sd, "optim": optim_sd, "start": steps}, checkpoint_id=path)
    return flat(model)


@pytest.mark.parametrize("cls,options", CASES, ids=IDS)
def test_dcp_save_and_resume_in_fresh_processes_is_bit_identical(cls, options):
    """Optimizer state through torch.distributed.checkpoint (get/set_state_dict), across refreshes."""
    import tempfile

    full = run_world(_dcp_optim, 2, args=(cls, options, None, "plain", 7))
    with tempfile.TemporaryDirectory() as path:
        run_world(_dcp_optim, 2, args=(cls, options, path, "save", 3))
        resumed = run_world(_dcp_optim, 2, args=(cls, options, path, "resume", 4))
    for r in resumed:
        assert torch.equal(r, full[0])
