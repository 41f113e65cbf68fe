"""The blockwise engine: any block processor over a stored volume, on dask.distributed.

Read top-down:

* :mod:`.layout` -- the pure geometry of a job: blocks, halos, read/write boxes,
  reflection at the volume's edges, groups of blocks per task.
* :mod:`.stitching` -- ``crop`` (and its whole-volume reference), ``blend``
  (partition-of-unity weights) and ``slices`` (``blend`` for models made of 2D slices,
  each slice made once per tile of its plane).
* :mod:`.processors` -- :class:`~.processors.ModelSpec` (what a worker loads) and the
  registry of block processors; small deterministic ones for tests and benchmarks.
* :mod:`.jobstate` -- job identity (``job.json``), compact done-state, resume.
* :mod:`.lock` -- one live run per output or work directory (lock files, stale takeover).
* :mod:`.runtime` -- what a worker process keeps between tasks (model, arrays,
  counters) and where it runs (:func:`~.runtime.place_workers`: threads, GPU).
* :mod:`.pyramid` -- the coarser levels of an output, as engine phases.
* :mod:`.tasks` -- what one task does, one function per phase, its blocks streamed through
  a pipelined loop (reads and writes in threads, overlapping the model); and the same phases
  on in-memory regions, for the lazy graph.
* :mod:`.scheduler` -- :func:`~.scheduler.run_blockwise`: the submission loop.
* :mod:`.overlap` -- :func:`~.overlap.lazy_blockwise`: the same job as a lazy Dask array
  (``da.map_overlap``), equal to the batch run bit for bit.
* :mod:`.cluster` -- connecting to or starting a Dask cluster.

Contract: may import :mod:`d2r_dask.io` and :mod:`d2r_dask.errors`; knows no concrete
model (it loads a :class:`~.processors.ModelSpec` through the registry; the stages
register ``restorer`` and ``dgean``); never imports the stages, models or click.
"""
