"""``python -m vitopt``: the same command line as the ``vitopt`` script.

This is what ``torchrun --nproc_per_node N -m vitopt run RECIPE`` starts on every rank
(:mod:`vitopt.train.distributed` joins the process group from torchrun's environment).
"""

from vitopt.cli import main

if __name__ == "__main__":
    main()
