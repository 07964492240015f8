"""Rule 7: the ranks agree on a state's configuration at bind, and a load of another one is refused."""

from __future__ import annotations

import io

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from commlib import compress, hooks
from commlib.comm.agree import disagreements, field_digest
from tests.conftest import run_world

from .ddp_harness import Net, batch, gathered_checkpoint


def _bind_with(rank, world, make_kwargs):
    model = Net()
    ddp = DDP(model)
    name, kwargs = make_kwargs(rank)
    state, hook = hooks.make(name, model=model, **kwargs)
    ddp.register_comm_hook(state, hook)
    x, y = batch(rank, 0)
    try:
        torch.nn.functional.mse_loss(ddp(x), y).backward()
    except Exception as exc:  # the bind error reaches backward() on every rank
        return str(exc)
    finally:
        state.close()
    return None


def _randomk_seeded_by_rank(rank):
    return "ef", {"compressor": compress.RandomK(0.5, seed=rank), "collective": "allreduce"}


def _start_iter_by_rank(rank):
    return "powersgd", {"rank": 2, "start_iter": 2 + rank}


def _same_everywhere(rank):
    return "ef", {"compressor": compress.RandomK(0.5, seed=7), "collective": "allreduce"}


@pytest.mark.parametrize("world", [2, 3])
def test_a_compressor_seeded_by_rank_is_refused_on_every_rank(world):
    """RandomK(0.5, seed=rank) used to train without a word while the ranks' parameters diverged."""
    errors = run_world(_bind_with, world, args=(_randomk_seeded_by_rank,))
    for rank, error in enumerate(errors):
        assert error is not None and "disagree" in error and "'options'" in error, error
        assert f"seed={rank}" in error or f"'seed': {rank}" in error  # this rank's own value is shown


def test_another_option_on_one_rank_names_the_field():
    errors = run_world(_bind_with, 2, args=(_start_iter_by_rank,))
    for error in errors:
        assert error is not None and "'start_iter'" in error


def test_equal_states_bind_and_train():
    assert run_world(_bind_with, 2, args=(_same_everywhere,)) == [None, None]


def test_digest_table_names_the_ranks_that_differ():
    names = ["a", "b"]
    table = torch.tensor([[field_digest(1), field_digest("x")], [field_digest(1), field_digest("y")],
                          [field_digest(2), field_digest("x")]])
    assert disagreements(table, names) == {"a": [2], "b": [1]}
    assert field_digest({"k": [1, 2]}) == field_digest({"k": [1, 2]}) != field_digest({"k": [2, 1]})


def _load_with_other_seed(rank, world):
    model, blob = gathered_checkpoint(rank, "ef", 3, compressor=compress.TopK(0.1), seed=3)
    errors = []
    for kwargs in ({"seed": 4}, {"start_iter": 3}):
        other, _ = hooks.make("ef", model=model, compressor=compress.TopK(0.1), **{"seed": 3, **kwargs})
        other.bind()
        try:
            other.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
        except ValueError as exc:
            errors.append(str(exc))
        other.close()
    dist.barrier()
    return errors


def test_a_load_with_another_seed_or_start_iter_is_refused():
    for errors in run_world(_load_with_other_seed, 2):
        assert len(errors) == 2
        assert "seed=3" in errors[0] and "seed=4" in errors[0]
        assert "start_iter=2" in errors[1]
