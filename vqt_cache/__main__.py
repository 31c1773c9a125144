"""`python -m vqt_cache` (and `torchrun -m vqt_cache extract ...`) runs the command line."""

from vqt_cache.cli import main

main()
