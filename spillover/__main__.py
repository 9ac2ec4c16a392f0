"""`python -m spillover ...` runs the same command line as the `spillover` script."""

from spillover.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
