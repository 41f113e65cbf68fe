"""Data: how an acquisition degrades z, and the data the networks learn from.

* :mod:`.degrade` -- axial degradation (decimate / mean, blur, noise) and its inverse
  baselines (z-interpolation), on numpy and lazily on dask.
* :mod:`.noise` -- noise keyed by global voxel coordinates (chunking never changes it).
* :mod:`.synth` -- synthetic vEM neuropil, blockwise and deterministic.
* :mod:`.intensity` -- stored intensities <-> the unit range the networks see.
* :mod:`.patches` -- training patches read from a stored volume, and their pairs.

Contract: numpy/scipy/dask arrays only; may import :mod:`d2r_dask.io` and
:mod:`d2r_dask.errors`; never torch, models, the engine or the stages.
"""
