"""Shape-only (fake/meta) kernels, so the ops trace under torch.compile and FakeTensorMode."""

import torch


def _chunks(numel: int, chunk_size: int) -> int:
    if numel == 0:
        return 0
    chunk = numel if chunk_size == 0 or chunk_size >= numel else chunk_size
    return -(-numel // chunk)


@torch.library.register_fake("commlib::sign_pack")
def _sign_pack(x, chunk_size):
    n = x.numel()
    return x.new_empty(-(-n // 32), dtype=torch.int32), x.new_empty(_chunks(n, chunk_size), dtype=torch.float32)


@torch.library.register_fake("commlib::sign_unpack")
def _sign_unpack(packed, scales, numel, chunk_size, dtype):
    torch._check(packed.numel() == -(-numel // 32))
    return packed.new_empty(numel, dtype=dtype)


@torch.library.register_fake("commlib::qsgd_quantize")
def _qsgd_quantize(x, bits, bucket_size, seed):
    n = x.numel()
    return x.new_empty(-(-n // 8) * bits, dtype=torch.uint8), x.new_empty(-(-n // bucket_size), dtype=torch.float32)


@torch.library.register_fake("commlib::qsgd_dequantize")
def _qsgd_dequantize(codes, scales, bits, bucket_size, numel, dtype):
    torch._check(codes.numel() == -(-numel // 8) * bits)
    return codes.new_empty(numel, dtype=dtype)


@torch.library.register_fake("commlib::topk_abs")
def _topk_abs(x, k, exact):
    return x.new_empty(k), x.new_empty(k, dtype=torch.int32)
