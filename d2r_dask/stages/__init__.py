"""The four D2R stages and the pipeline that runs them.

* :mod:`.train` -- Stage I (diffusion restorer on XY patches) and Stage III (DGEAN on
  the pseudo-HR): one training loop with EMA, validation, atomic checkpoints, resume.
* :mod:`.loader` -- training batches from a torch ``DataLoader``, drawn ahead in worker
  processes, the same batches whatever their number.
* :mod:`.remote` -- training on one worker of a Dask cluster (a GPU one), progress and errors
  back in the client.
* :mod:`.restore` -- Stage II: the restorer as a ``slices`` block processor (XZ/YZ slices, each once).
* :mod:`.infer` -- Stage IV: DGEAN as a ``crop`` block processor (the Stage IV block function).
* :mod:`.config` -- :class:`~.config.RunConfig`: every option of ``d2r run``, validated;
  ``auto`` presets resolved per device (:func:`~.config.resolve_auto`).
* :mod:`.pipeline` -- plan and run Stages I-IV in a work directory, resumable.

Contract: may import :mod:`d2r_dask.blockwise`, :mod:`d2r_dask.models`,
:mod:`d2r_dask.io`, :mod:`d2r_dask.data` and (for validation during training)
:mod:`d2r_dask.evaluation.metrics` and :mod:`d2r_dask.evaluation.selfcheck`; never click or
the front door.
"""
