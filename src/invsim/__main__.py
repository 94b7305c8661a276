"""``python -m invsim`` (also ``torchrun -m invsim``): the command line."""

from invsim.cli import main

if __name__ == "__main__":
    main()
