"""A long-running process's start-up heap, kept out of the cyclic garbage collector's way."""

import gc


def freeze_startup_heap() -> None:
    """Moves every object alive now (modules, the app, pydantic's validators and schemas) into the
    collector's permanent generation. Each full collection would otherwise traverse all of them
    again while requests allocate: ~15% of the API's CPU per streamed request at 50 concurrent
    (docs/benchmarks.md). Objects made later are collected as before."""
    gc.collect()  # what is already garbage is freed, not frozen
    gc.freeze()
