"""`python -m hybridlm` (what `torchrun -m hybridlm` runs)."""

from hybridlm.cli import main

main()
