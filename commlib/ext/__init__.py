"""``python -m commlib.ext build|info``: warm the kernel cache before launching ranks, or show it."""
