"""Neural networks of d2r-dask: the 2D diffusion restorer (stages I-II) and the 3D DGEAN (stages III-IV).

Pure torch: nothing here imports dask, zarr or click.
"""
