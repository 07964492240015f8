"""Collective patterns used inside queue jobs: dense mean, payload all-gather, two-phase compressed allreduce."""

from __future__ import annotations

import math

import torch

from commlib.comm.packing import pack, unpack
from commlib.comm.queue import Comm
from commlib.compress.base import Compressor, Payload, derive_seed


def allreduce_mean_(comm: Comm, flat: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place: scale by 1/n first (exactly as DDP does, so fp16 sums do not
    overflow and the result equals DDP's bit for bit), then SUM."""
    flat.mul_(1.0 / comm.world_size)
    return comm.all_reduce(flat)


def split_like(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive pieces of ``flat`` shaped like ``like`` (the inverse of a flat ``cat``)."""
    pieces = flat.split([t.numel() for t in like])
    return [piece.view(t.shape) for piece, t in zip(pieces, like)]


RING_FACTORS = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}


def ring_bytes(kind: str, nbytes, world: int):
    """Bytes one rank sends in a ring ``kind`` over ``world`` ranks on a buffer of ``nbytes`` (the
    whole reduced or gathered buffer): ``(W - 1) / W`` of it, twice for an all-reduce (a
    reduce-scatter then an all-gather). Integer bytes stay integers (floored)."""
    factor = RING_FACTORS[kind]
    if isinstance(nbytes, int):
        return factor * (world - 1) * nbytes // world
    return factor * (world - 1) * nbytes / world


def payloads_like(tensors: list[torch.Tensor], templates: list[Payload]) -> list[Payload]:
    """``tensors`` (the wire tensors of payloads shaped like ``templates``, in order) regrouped into
    payloads with the templates' shapes, dtypes and shared-seed contexts."""
    out, start = [], 0
    for template in templates:
        count = len(template.tensors)
        out.append(Payload(tuple(tensors[start : start + count]), template.shape, template.dtype, template.context))
        start += count
    return out


def allgather_payloads(comm: Comm, payloads: list[Payload]) -> list[list[Payload]]:
    """Every rank's payloads (same layout on all ranks), as ``[rank][i]``, with one all-gather."""
    flat, layout = pack([t for p in payloads for t in p.tensors])
    return [payloads_like(unpack(rank_flat, layout), payloads) for rank_flat in comm.all_gather(flat)]


def two_phase_alignment(compressor: Compressor, world_size: int) -> int:
    """Per-parameter padding unit so each rank's chunk is whole words / buckets of the compressor."""
    unit = math.lcm(32, 8, getattr(compressor, "bucket_size", 8), getattr(compressor, "chunk_size", 0) or 32)
    return unit * world_size


def two_phase_allreduce(
    comm: Comm,
    values: list[torch.Tensor],
    compressor: Compressor,
    server_errors: list[torch.Tensor | None],
    seeds: list[int],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Compressed allreduce in two phases (reduce-scatter, then all-gather), as 1-bit Adam's.

    Each tensor in ``values`` (1-D, length a multiple of :func:`two_phase_alignment`) is split
    into one chunk per rank. Phase 1 (one all-to-all for all tensors): every rank compresses every
    chunk and sends chunk j to rank j, which averages the n decompressed copies (in rank order),
    adds its server error, recompresses and keeps ``server_error = chunk - decompress(sent)``.
    Phase 2 (one all-gather): the recompressed chunks are gathered and decompressed everywhere.
    Bytes per rank stay ~2 C(N) (n-1)/n as the world grows. Chunking is per tensor, so the result
    does not depend on how DDP groups tensors into buckets.

    Returns per tensor: (mean estimate, this rank's own decompressed compression, new server error).
    """
    n = comm.world_size
    chunks = [v.view(n, -1) for v in values]
    local = [[compressor.compress(c[j], seed=derive_seed(seed, 1, j)) for j in range(n)]
             for c, seed in zip(chunks, seeds)]
    local_hat = [torch.cat([compressor.decompress(p).reshape(-1) for p in per_tensor]) for per_tensor in local]
    # destination-major layout: rank j receives chunk j of every tensor, contiguously
    flat, layout = pack([t for j in range(n) for per_tensor in local for t in per_tensor[j].tensors])
    received = comm.all_to_all(flat)
    per_rank = flat.numel() // n
    chunk_layout = layout[: len(layout) // n]
    means = [torch.zeros(c.shape[1], dtype=torch.float32, device=c.device) for c in chunks]
    for src in range(n):  # rank order: the same float sum wherever this chunk is reduced
        tensors = unpack(received[src * per_rank : (src + 1) * per_rank], chunk_layout)
        i = 0
        for t, per_tensor in enumerate(local):
            k = len(per_tensor[0].tensors)
            payload = Payload(tuple(tensors[i : i + k]), (chunks[t].shape[1],), values[t].dtype)
            compressor.decompress_add_(means[t], payload)
            i += k
    server_payloads, new_errors = [], []
    for t, mean in enumerate(means):
        mean.div_(n)
        corrected = mean if server_errors[t] is None else mean + server_errors[t]
        payload = compressor.compress(corrected.to(values[t].dtype), seed=derive_seed(seeds[t], 2, comm.rank))
        server_payloads.append(payload)
        new_errors.append(corrected - compressor.decompress(payload).float())
    gathered = allgather_payloads(comm, server_payloads)
    results = [
        torch.cat([compressor.decompress(gathered[j][t]).reshape(-1) for j in range(n)]).to(values[t].dtype)
        for t in range(len(values))
    ]
    return results, local_hat, new_errors


def two_phase_allreduce_like(
    comm: Comm,
    values: list[torch.Tensor],
    compressor: Compressor,
    server_errors: list[torch.Tensor | None],
    seeds: list[int],
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """:func:`two_phase_allreduce` of tensors of any shape: each is flattened and zero-padded to
    :func:`two_phase_alignment`, and the mean estimates and this rank's decompressed compression come
    back cut and shaped like the inputs (server errors stay per padded chunk)."""
    align = two_phase_alignment(compressor, comm.world_size)
    padded = [torch.nn.functional.pad(v.reshape(-1), (0, -v.numel() % align)) for v in values]
    results, local_hat, new_errors = two_phase_allreduce(comm, padded, compressor, server_errors, seeds)
    results = [r[: v.numel()].view(v.shape) for r, v in zip(results, values)]
    local_hat = [h[: v.numel()].view(v.shape) for h, v in zip(local_hat, values)]
    return results, local_hat, new_errors


class TwoPhaseEF:
    """:func:`two_phase_allreduce` of ``v = g + e`` with error feedback on both sides, fused: the
    gradients and residuals are read in place (nothing padded or materialized), and what depends on
    the step being kept runs only when asked.

    After construction (which runs both collectives) ``finite`` says whether every rank's result
    is finite (read from the gathered payloads); :meth:`commit_residuals` then writes the worker
    residuals ``e <- (g + e) - decompress(sent)`` and the server errors, and :meth:`write_results`
    overwrites the gradients with the mean estimate. Commit before writing: the residuals read the
    gradients. The arithmetic is :func:`two_phase_allreduce_like`'s with ``values = g + e``.
    """

    def __init__(self, comm: Comm, grads: list[torch.Tensor], residuals: list[torch.Tensor | None],
                 compressor: Compressor, server_errors: list[torch.Tensor | None], seeds: list[int]):
        n = comm.world_size
        align = two_phase_alignment(compressor, n)
        self.compressor = compressor
        self.shapes = [g.shape for g in grads]
        self.grads = [g.reshape(-1) for g in grads]
        self.residuals = [None if r is None else r.view(-1) for r in residuals]
        self.server_errors = server_errors
        self.chunk = [-(-g.numel() // align) * align // n for g in self.grads]
        # phase 1: every rank compresses every chunk of v = g + e (the last ones zero-padded)
        self.local = [[compressor.compress_ef(self._piece(g, c, j), self._piece(r, c, j),
                                              seed=derive_seed(seed, 1, j), numel=c) for j in range(n)]
                      for g, r, c, seed in zip(self.grads, self.residuals, self.chunk, seeds)]
        flat, layout = pack([t for j in range(n) for per_tensor in self.local for t in per_tensor[j].tensors])
        received = comm.all_to_all(flat)
        per_rank = flat.numel() // n
        chunk_layout = layout[: len(layout) // n]
        means = [torch.zeros(c, dtype=torch.float32, device=g.device) for g, c in zip(self.grads, self.chunk)]
        for src in range(n):  # rank order: the same float sum wherever this chunk is reduced
            tensors = unpack(received[src * per_rank : (src + 1) * per_rank], chunk_layout)
            i = 0
            for t, per_tensor in enumerate(self.local):
                k = len(per_tensor[0].tensors)
                payload = Payload(tuple(tensors[i : i + k]), (self.chunk[t],), self.grads[t].dtype)
                compressor.decompress_add_(means[t], payload)
                i += k
        # server side: the mean of this rank's chunk, with its own error feedback
        self.means, self.server_payloads, self._server_new = means, [], []
        for t, mean in enumerate(means):
            mean.div_(n)
            seed = derive_seed(seeds[t], 2, comm.rank)
            if self.grads[t].dtype == torch.float32:  # fused: mean + error read in place
                self.server_payloads.append(compressor.compress_ef(mean, server_errors[t], seed=seed))
                self._server_new.append(None)
            else:  # the sum is rounded to the gradient's dtype before compressing
                corrected = mean if server_errors[t] is None else mean + server_errors[t]
                payload = compressor.compress(corrected.to(self.grads[t].dtype), seed=seed)
                self.server_payloads.append(payload)
                self._server_new.append(corrected - compressor.decompress(payload).float())
        # phase 2: everyone gathers the recompressed chunks
        self.gathered = allgather_payloads(comm, self.server_payloads)
        self.finite = all(compressor.payload_finite(rank_payloads[t]) for rank_payloads in self.gathered
                          for t in range(len(self.grads)))

    @staticmethod
    def _piece(flat: torch.Tensor | None, chunk: int, j: int) -> torch.Tensor | None:
        """Chunk ``j`` of a flat tensor, without the padding (possibly empty)."""
        if flat is None:
            return None
        lo = min(j * chunk, flat.numel())
        return flat[lo : min(lo + chunk, flat.numel())]

    def commit_residuals(self, residuals: list[torch.Tensor | None], workers: bool = True
                         ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The new worker residuals (updated in place where ``residuals`` holds one; none when not
        ``workers``) and server errors."""
        new_residuals = []
        for t, g in enumerate(self.grads if workers else []):
            old = residuals[t]
            target = torch.empty_like(g) if old is None else old.view(-1)
            for j, payload in enumerate(self.local[t]):
                piece = self._piece(g, self.chunk[t], j)
                if piece.numel():
                    self.compressor.update_residual_(self._piece(target, self.chunk[t], j), piece, payload,
                                                     accumulate=old is not None)
            new_residuals.append(target.view(self.shapes[t]))
        new_errors = []
        for t, mean in enumerate(self.means):
            if self._server_new[t] is not None:
                new_errors.append(self._server_new[t])
                continue
            old = self.server_errors[t]
            target = torch.empty_like(mean) if old is None else old
            new_errors.append(self.compressor.update_residual_(target, mean, self.server_payloads[t],
                                                               accumulate=old is not None))
        return new_residuals, new_errors

    def write_results(self, outs: list[torch.Tensor]) -> None:
        """Each ``outs[t]`` (shaped like grad t) <- the decompressed mean estimate."""
        for t, out in enumerate(outs):
            flat = out.view(-1)
            for j, rank_payloads in enumerate(self.gathered):
                piece = self._piece(flat, self.chunk[t], j)
                if piece.numel():
                    self.compressor.decompress_into_(piece, rank_payloads[t])
