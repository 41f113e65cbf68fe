"""Evaluation: how good a result is, against ground truth and against baselines.

* :mod:`.metrics` -- pure numpy metrics: PSNR, SSIM per orientation, FRC z-resolution,
  membrane boundary agreement, stripes at the LR-slice period, z-interpolation baselines.
* :mod:`.selfcheck` -- a training run's verdict against interpolation on held-out patches
  (no ground truth needed).
* :mod:`.evaluate` -- scores stored volumes blockwise (bounded memory) against ground truth.
* :mod:`.report` -- ``metrics.json``, ``report.md`` and figures from those scores.
* :mod:`.seams` -- a seam detector for blockwise outputs (used by the engine's tests).

Contract: may import :mod:`d2r_dask.io`, :mod:`d2r_dask.data` and
:mod:`d2r_dask.errors`; never torch, the engine or the stages. Imports run one way:
evaluate -> metrics, selfcheck and report; report, metrics and selfcheck import none of them.
"""
