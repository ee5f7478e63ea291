"""`python -m experiments.world`: the world experiment (run.py)."""

from experiments.world.run import main

main()
