"""``python -m lowbit``: the same command line as the ``lowbit`` console script."""

from lowbit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
