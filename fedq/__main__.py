"""``python -m fedq``: the same CLI as the ``fedq`` console script."""

from fedq.cli import main

if __name__ == "__main__":
    main()
