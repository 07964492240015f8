"""Training workloads for the examples, the benchmarks and the launch tests; not part of commlib.

* :mod:`workloads.data`: the Python install's own sources as bytes, scikit-learn's bundled digits,
  the emulated link's byte counter;
* :mod:`workloads.models`: models from ``transformers`` configs (random init, nothing downloaded),
  their losses, the optimizer recipes;
* :mod:`workloads.train`: one trainer (``python -m workloads.train``) with a DDP mode (any commlib
  hook, PyTorch's own hooks, or local steps) and an FSDP2 mode (compressed reduce-scatter, int8
  all-gather, HSDP);
* :mod:`workloads.coded`: the coded data-parallel runtime on the digits (``python -m workloads.coded``).

commlib never imports this package (an import-linter contract in the test suite checks it).
"""
