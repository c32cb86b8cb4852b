"""A long-running process's heap, kept out of the cyclic garbage collector's way."""

import gc

YOUNG_THRESHOLD = 20_000
"""Allocations between two collections of the youngest generation (Python's default: 700)."""


def tune_garbage_collector() -> None:
    """Moves every object alive now (modules, the app, pydantic's validators and schemas) into the
    collector's permanent generation: each full collection would otherwise traverse all of them
    again while requests allocate (~15% of the API's CPU per streamed request at 50 concurrent).

    Then collects the youngest generation after `YOUNG_THRESHOLD` allocations. Every young
    collection traverses the objects of the requests in flight, though nearly all of a request's
    objects are freed by their reference counts: at 700, collections took 5 to 7% of an API
    process's CPU at 50 concurrent streams; at 20,000, none ran in 1,100 requests
    (docs/benchmarks.md). Cyclic garbage is still collected, in larger batches."""
    gc.collect()  # what is already garbage is freed, not frozen
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
