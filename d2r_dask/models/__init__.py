"""Neural networks of d2r-dask: the 2D diffusion restorer (stages I-II) and the 3D DGEAN (stages III-IV).

* :mod:`.nafnet` + :mod:`.sde` -- the restorer: conditional NAFNet and the IR-SDE with its samplers.
* :mod:`.dgean` -- DGEAN, its presets and its receptive field (the engine's halo in Stage IV).
* :mod:`.noise` -- the keyed Gaussian noise of :mod:`d2r_dask.data.noise`, made with torch on the
  device (the Stage II sampler's noise on a GPU; the same values).
* :mod:`.intensity` -- the intensity maps and the cast to the stored dtype, with torch on the device
  (the same bits as :class:`~d2r_dask.data.intensity.Intensity` and :func:`d2r_dask.io.volume.to_dtype`).
* :mod:`.losses` -- training losses.
* :mod:`.precision` -- bf16 autocast on a GPU, channels-last memory on every device.
* :mod:`.config` -- strict parsing of stored model configs.
* :mod:`.checkpoint` -- ``weights.safetensors`` + ``config.json``, and loading each family from them.

Pure torch: nothing here imports dask, zarr, xarray or click. May import only
:mod:`d2r_dask.io.geometry` (the LR <-> HR mapping), :mod:`d2r_dask.io.files` (atomic
writes), :mod:`d2r_dask.data.intensity`, :mod:`d2r_dask.data.noise` (the hash the torch twin
repeats) and :mod:`d2r_dask.errors`.
"""
