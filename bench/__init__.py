"""optserve's benchmark harness (`make bench`, `python bench/run.py [--quick]`); never run by `make test`."""
