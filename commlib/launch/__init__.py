"""Launchers: the emulated multi-node cluster (:mod:`.cluster`) and MPI-to-torch.distributed mapping (:mod:`.mpi`)."""
