"""`python -m optserve ...` runs the command line, as `optserve ...` does."""
from optserve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
