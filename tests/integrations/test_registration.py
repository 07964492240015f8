"""commlib.integrations' registration helpers: right model, once, and refusals that name the trap."""

import pytest
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import hooks
from commlib.integrations import parameter_digest, register_comm_hook, registered_state
from tests.conftest import run_world


def test_a_hook_on_the_unwrapped_model_is_refused():
    state, hook = hooks.make("allreduce")
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        register_comm_hook(nn.Linear(2, 2), state, hook)


def test_parameter_digest_sees_one_bit():
    model = nn.Linear(4, 4)
    before = parameter_digest(model)
    with torch.no_grad():
        flat = model.weight.view(-1).view(torch.int32)
        flat[3] ^= 1  # the lowest mantissa bit of one weight
    assert parameter_digest(model) != before


def test_accelerate_kwargs_with_a_function_hook_are_refused():
    accelerate = pytest.importorskip("accelerate")
    from commlib.integrations.accelerate import register_comm_hook as register_after_prepare

    class Prepared:  # what Accelerator exposes: its DistributedDataParallelKwargs handler
        ddp_handler = accelerate.DistributedDataParallelKwargs(comm_hook=lambda state, bucket: None)

    state, hook = hooks.make("allreduce")
    with pytest.raises(ValueError, match="comm_hook"):
        register_after_prepare(nn.Linear(2, 2), state, hook, accelerator=Prepared())


def _register_twice(rank, world_size):
    torch.manual_seed(0)
    ddp = DDP(nn.Linear(8, 8))
    state, hook = hooks.make("allreduce")
    first = register_comm_hook(ddp, state, hook)
    again = register_comm_hook(ddp, state, hook)  # a callback that fires on a second fit(): no error
    other, other_hook = hooks.make("fp16")
    try:
        register_comm_hook(ddp, other, other_hook)
        refused = False
    except RuntimeError:
        refused = True
    ddp(torch.randn(4, 8)).sum().backward()
    return first, again, refused, registered_state(ddp) is state, state.stats()["total_bytes_sent"]


@pytest.mark.dist
def test_registration_is_idempotent_and_one_hook_per_model():
    for first, again, refused, kept, sent in run_world(_register_twice, 2):
        assert first and not again and refused and kept and sent > 0
