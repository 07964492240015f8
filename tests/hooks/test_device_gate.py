"""Rule 5 decided on the device (``finiteness="device"``, the CUDA default): the EF hook keeps its
decision in a tensor and selects residuals with ``torch.where``. On CPU it must train exactly as
the host-read gate does, through an overflow on one rank: the same parameters, the same residuals
before and after the skipped step, the same skipped-step count. (RandomK and Cast take the same
two paths as TopK and QSGD.)"""

import pytest
import torch

from tests.conftest import run_world
from tests.hooks.ddp_harness import train

SMALL_BUCKETS = {"bucket_cap_mb": 0.004}  # several buckets per step

GATED = [  # allgather with sparse payloads written in place; allreduce of summable payloads; scales only
    {"compressor": ("TopK", {"density": 0.1})},
    {"compressor": ("QSGD", {"bits": 4, "bucket_size": 64})},
    {"compressor": ("Sign", {})},
]


@pytest.mark.dist
@pytest.mark.parametrize("options", GATED, ids=[o["compressor"][0] for o in GATED])
def test_device_gate_trains_exactly_like_the_host_gate_through_an_overflow(options):
    inf_at = 4
    runs = {}
    for mode in ("host", "device"):
        runs[mode] = run_world(train, 2, kwargs=dict(hook="ef", options={**options, "finiteness": mode}, steps=7,
                                                     ddp_kwargs=SMALL_BUCKETS, inf_at=inf_at,
                                                     snapshots=(inf_at - 1, inf_at, 6)))
    for host, device in zip(runs["host"], runs["device"], strict=True):
        assert torch.equal(host["params"], device["params"])
        assert host["finite"] == device["finite"] == [s != inf_at for s in range(7)]
        assert host["stats"]["skipped_steps"] == device["stats"]["skipped_steps"] == 1
        for step in (inf_at - 1, inf_at, 6):
            residuals_host, residuals_device = host["buffers"][step]["residuals"], device["buffers"][step]["residuals"]
            assert residuals_host.keys() == residuals_device.keys()
            for key in residuals_host:
                assert torch.equal(residuals_host[key], residuals_device[key]), (step, key)


def test_a_bad_finiteness_is_refused():
    from commlib import hooks

    with pytest.raises(ValueError, match="finiteness"):
        hooks.make("ef", finiteness="gpu")
