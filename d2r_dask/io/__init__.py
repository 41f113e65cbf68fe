"""Storage and geometry: where voxels are, and how they are read and written.

* :mod:`.geometry` -- voxel boxes, block grids, LR <-> SR index and physical mapping,
  :class:`~.geometry.Geometry` (voxel size + origin in nm). Pure numpy.
* :mod:`.volume` -- OME-Zarr volumes: open (lazy xarray), create, write, finalize
  (metadata last, so unfinished outputs never look complete). The only module that
  imports zarr.
* :mod:`.convert` -- any stack (TIFF, PNG folder, HDF5, .npy, Zarr) to OME-Zarr.
* :mod:`.files` -- atomic writes of small files (JSON, text, checkpoints, figures).
* :mod:`.stores` -- where a volume lives: a local path or an object-store URL (``s3://``,
  ``gs://``), and small files (job state, done-state, locks) on both.

Contract: may import only :mod:`d2r_dask.errors` and third-party storage libraries
(numpy, zarr, xarray, dask, tifffile, fsspec); never torch, data, models, the engine or the stages.
"""
