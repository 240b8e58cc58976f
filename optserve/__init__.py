"""optserve: optimizer-as-a-service for PyTorch.

`from optserve import RemoteAdam` gives the worker-side optimizer; `optserve serve` runs a shard.
"""
__version__ = "0.1.0"
__all__ = ["RemoteAdam", "run_server", "__version__"]


def __getattr__(name):
    # Imported lazily: the server side imports this package for __version__ without pulling the client.
    if name == "RemoteAdam":
        from optserve.client.remote_adam import RemoteAdam
        return RemoteAdam
    if name == "run_server":
        from optserve.server.main import run_server
        return run_server
    raise AttributeError(f"module 'optserve' has no attribute {name!r}")
