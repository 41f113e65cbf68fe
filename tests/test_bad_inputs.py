"""The bad-input corpus: every command, fed what a user might feed it by mistake.

Each case runs the real ``d2r`` command (click's CliRunner, real stores on disk) and must
end with exit status 1 and one ``Error:`` line naming the problem and the fix (no
traceback), and leave every input byte-identical: the whole input folder is hashed
before and after. Outputs go to a separate folder, except where the case *is* an output
inside an input.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from d2r_testkit import dgean_checkpoint, restorer_checkpoint, synth_array, write

from d2r_dask.cli import cli

UNREACHABLE = "tcp://127.0.0.1:1"  # nothing listens on port 1: refused at once


def _corrupt_one_chunk(store: Path) -> None:
    """Overwrite one chunk file of the full-resolution array with random bytes (a damaged copy)."""
    chunk = sorted(p for p in (store / "0" / "c").rglob("*") if p.is_file())[-1]
    chunk.write_bytes(np.random.default_rng(0).bytes(chunk.stat().st_size or 64))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder of inputs shared by all cases (read-only for them: hashed around each)."""
    root = tmp_path_factory.mktemp("inputs")
    write(root / "gt.zarr", synth_array((24, 32, 32), seed=1), voxel_size=(10.0, 5.0, 5.0), chunks=(8, 16, 16))
    write(root / "lr.zarr", synth_array((8, 32, 32), seed=2), voxel_size=(40.0, 5.0, 5.0), chunks=(4, 16, 16))
    write(root / "small.zarr", synth_array((3, 12, 12), seed=3), voxel_size=(40.0, 5.0, 5.0))
    write(root / "bad.zarr", synth_array((8, 32, 32), seed=2), voxel_size=(40.0, 5.0, 5.0), chunks=(4, 16, 16))
    _corrupt_one_chunk(root / "bad.zarr")
    write(root / "badgt.zarr", synth_array((24, 32, 32), seed=1), voxel_size=(10.0, 5.0, 5.0), chunks=(8, 16, 16))
    _corrupt_one_chunk(root / "badgt.zarr")
    restorer_checkpoint(root / "restorer")
    dgean_checkpoint(root / "dgean")
    tifffile.imwrite(root / "rgb.tif", np.zeros((2, 8, 8, 3), np.uint8), photometric="rgb")
    bad = np.ones((4, 8, 8), np.float32)
    bad[1, 2, 3] = np.nan
    np.save(root / "nan.npy", bad)
    np.save(root / "stack.npy", np.zeros((4, 8, 8), np.uint8))
    (root / "precious").mkdir()
    (root / "precious" / "thesis.txt").write_text("years of work")
    (root / "huge-preset.yaml").write_text("factor: 4\nrestorer:\n  preset: huge\n")
    return root


def tree(root: Path) -> dict[str, str]:
    """Every file's SHA-256 and every folder under ``root`` (so additions, removals and edits show)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
    return out


Args = Callable[[Path, Path], list[Any]]  # (inputs, outputs) -> command line

CASES: list[tuple[str, Args, tuple[str, ...]]] = [
    # --- convert ---
    ("convert-missing", lambda i, o: ["convert", i / "nope.tif", o / "c.zarr", "--voxel-size", 1, 1, 1],
     ("no such file", "check the path")),
    ("convert-rgb", lambda i, o: ["convert", i / "rgb.tif", o / "c.zarr", "--voxel-size", 1, 1, 1],
     ("colour", "greyscale")),
    ("convert-nan", lambda i, o: ["convert", i / "nan.npy", o / "c.zarr", "--voxel-size", 1, 1, 1],
     ("NaN", "replace them")),
    ("convert-no-voxel-size", lambda i, o: ["convert", i / "stack.npy", o / "c.zarr"], ("--voxel-size Z Y X",)),
    ("convert-into-input", lambda i, o: ["convert", i / "lr.zarr", i / "lr.zarr" / "copy.zarr"],
     ("would overwrite the input", "choose another output path")),
    ("convert-overwrite-foreign", lambda i, o: ["convert", i / "stack.npy", i / "precious", "--voxel-size", 1, 1, 1,
                                                "--overwrite"],
     ("not a Zarr store or folder written by d2r", "will not delete it", "choose another output")),
    ("convert-corrupt-chunk", lambda i, o: ["convert", i / "bad.zarr", o / "c.zarr"],
     ("chunk (1, 1, 1)", "bad.zarr", "array '0'", "re-convert", "copy it again")),
    # --- degrade ---
    ("degrade-factor-1000", lambda i, o: ["degrade", i / "gt.zarr", o / "d.zarr", "--factor", 1000],
     ("24 slices by 1000", "leaves 1 LR slice", "need >= 3", "use --factor 11 or less")),
    ("degrade-factor-1", lambda i, o: ["degrade", i / "gt.zarr", o / "d.zarr", "--factor", 1],
     ("factor must be an integer >= 2",)),
    ("degrade-corrupt-chunk", lambda i, o: ["degrade", i / "badgt.zarr", o / "d.zarr", "--factor", 2],
     ("chunk (2, 1, 1)", "badgt.zarr", "re-convert")),
    ("degrade-into-input", lambda i, o: ["degrade", i / "gt.zarr", i / "gt.zarr" / "lr.zarr", "--factor", 2],
     ("would overwrite the input",)),
    ("degrade-overwrite-foreign", lambda i, o: ["degrade", i / "gt.zarr", i / "precious", "--factor", 2, "--overwrite"],
     ("not a Zarr store or folder written by d2r",)),
    ("degrade-noise-level-alone", lambda i, o: ["degrade", i / "gt.zarr", o / "d.zarr", "--factor", 2,
                                                "--noise-level", 0.1],
     ("needs a noise model", "--noise gaussian")),
    # --- train-restorer ---
    ("restorer-volume-smaller-than-patch", lambda i, o: ["train-restorer", i / "small.zarr", "-s", 4, "--out", o / "m",
                                                         "--steps", 1],
     ("XY training patch needs 1 x 64 x 64", "2 usable slices x 12 x 12", "use --patch 12 or less")),
    ("restorer-corrupt-chunk", lambda i, o: ["train-restorer", i / "bad.zarr", "-s", 4, "--out", o / "m",
                                             "--steps", 1, "--patch", 16],
     ("chunk (1, 1, 1)", "re-convert")),
    ("restorer-out-inside-input", lambda i, o: ["train-restorer", i / "lr.zarr", "-s", 4, "--out",
                                                i / "lr.zarr" / "model", "--steps", 1, "--patch", 16],
     ("would overwrite the input",)),
    ("restorer-zero-steps", lambda i, o: ["train-restorer", i / "lr.zarr", "-s", 4, "--out", o / "m", "--steps", 0],
     ("--steps must be >= 1 (got 0)",)),
    ("restorer-unknown-device", lambda i, o: ["train-restorer", i / "lr.zarr", "-s", 4, "--out", o / "m",
                                              "--device", "gpu"],
     ("--device 'gpu' is not a torch device", "use cpu, cuda or cuda:N")),
    # --- train-dgean ---
    ("dgean-missing-gpu", lambda i, o: ["train-dgean", i / "gt.zarr", "-s", 4, "--out", o / "m",
                                        "--device", "cuda:7"],
     ("--device cuda:7: this machine has",)),
    ("dgean-patch-wider-than-volume", lambda i, o: ["train-dgean", i / "gt.zarr", "-s", 4, "--out", o / "m",
                                                    "--steps", 1, "--patch-xy", 48, "--patch-lr-z", 3],
     ("3D training patch needs 19 x 48 x 48", "x 32 x 32", "use --patch-xy 32 or less")),
    ("dgean-volume-too-thin", lambda i, o: ["train-dgean", i / "small.zarr", "-s", 4, "--out", o / "m",
                                            "--steps", 1, "--patch-xy", 8, "--patch-lr-z", 3],
     ("needs 19 x 8 x 8", "usable slices", "more slices")),
    ("dgean-patch-below-attention", lambda i, o: ["train-dgean", i / "gt.zarr", "-s", 2, "--out", o / "m",
                                                  "--steps", 1, "--patch-xy", 16, "--patch-lr-z", 2],
     ("attention window", "--patch-lr-z >= 3")),
    ("dgean-corrupt-chunk", lambda i, o: ["train-dgean", i / "badgt.zarr", "-s", 4, "--out", o / "m", "--steps", 1,
                                          "--patch-xy", 16, "--patch-lr-z", 3],
     ("chunk (2, 1, 1)", "re-convert")),
    # --- restore ---
    ("restore-model-not-a-checkpoint", lambda i, o: ["restore", i / "lr.zarr", o / "p.zarr", "--model",
                                                     i / "precious", "--serial"],
     ("not a d2r checkpoint", "--out folder of a training run")),
    ("restore-model-of-other-kind", lambda i, o: ["restore", i / "lr.zarr", o / "p.zarr", "--model", i / "dgean",
                                                  "--serial"],
     ("holds a 'dgean' model", "'restorer' model is needed")),
    ("restore-corrupt-chunk", lambda i, o: ["restore", i / "bad.zarr", o / "p.zarr", "--model", i / "restorer",
                                            "--serial"],
     ("chunk (1, 1, 1)", "bad.zarr", "re-convert")),
    ("restore-halo-against-block", lambda i, o: ["restore", i / "lr.zarr", o / "p.zarr", "--model", i / "restorer",
                                                 "--block", 4, 16, 16, "--halo", 3, 4, 4, "--serial"],
     ("blocks at least twice the halo", "block z=4 < 2 x 3", "block of >= 6")),
    ("restore-into-input", lambda i, o: ["restore", i / "lr.zarr", i / "lr.zarr" / "p.zarr", "--model",
                                         i / "restorer", "--serial"],
     ("would overwrite the input",)),
    ("restore-zero-workers", lambda i, o: ["restore", i / "lr.zarr", o / "p.zarr", "--model", i / "restorer",
                                           "--workers", 0],
     ("--workers must be >= 1 (got 0)",)),
    ("restore-unreachable-scheduler", lambda i, o: ["restore", i / "lr.zarr", o / "p.zarr", "--model", i / "restorer",
                                                    "--scheduler", UNREACHABLE],
     (f"cannot reach the Dask scheduler at {UNREACHABLE}", "check that the scheduler is running")),
    ("restore-roi-outside", lambda i, o: ["restore", i / "lr.zarr", o / "p.zarr", "--model", i / "restorer",
                                          "--roi", 0, 0, 0, 9, 40, 40, "--serial"],
     ("outside the volume (8, 32, 32)",)),
    # --- infer ---
    ("infer-corrupt-chunk", lambda i, o: ["infer", i / "bad.zarr", o / "s.zarr", "--model", i / "dgean", "--serial"],
     ("chunk (1, 1, 1)", "re-convert")),
    ("infer-model-of-other-kind", lambda i, o: ["infer", i / "lr.zarr", o / "s.zarr", "--model", i / "restorer",
                                                "--serial"],
     ("holds a 'restorer' model", "'dgean' model is needed")),
    ("infer-zero-block", lambda i, o: ["infer", i / "lr.zarr", o / "s.zarr", "--model", i / "dgean",
                                       "--block", 0, 16, 16, "--serial"],
     ("--block must be >= 1 along every axis (got 0 16 16)",)),
    ("infer-zero-group", lambda i, o: ["infer", i / "lr.zarr", o / "s.zarr", "--model", i / "dgean", "--group", 0],
     ("--group must be >= 1 (got 0)",)),
    ("infer-output-is-input", lambda i, o: ["infer", i / "lr.zarr", i / "lr.zarr", "--model", i / "dgean", "--serial"],
     ("would overwrite the input",)),
    ("infer-unreachable-scheduler", lambda i, o: ["infer", i / "lr.zarr", o / "s.zarr", "--model", i / "dgean",
                                                  "--scheduler", UNREACHABLE],
     ("cannot reach the Dask scheduler",)),
    # --- run ---
    ("run-zero-workers-dry", lambda i, o: ["run", i / "lr.zarr", o / "sr.zarr", "-s", 4, "--workers", 0, "--dry-run"],
     ("--workers must be >= 1",)),
    ("run-unreachable-scheduler-dry", lambda i, o: ["run", i / "lr.zarr", o / "sr.zarr", "-s", 4, "--scheduler",
                                                    UNREACHABLE, "--dry-run"],
     (f"cannot reach the Dask scheduler at {UNREACHABLE}", "drop --scheduler")),
    ("run-output-inside-input", lambda i, o: ["run", i / "lr.zarr", i / "lr.zarr" / "sr.zarr", "-s", 4, "--serial"],
     ("would overwrite the input",)),
    ("run-output-inside-input-dry", lambda i, o: ["run", i / "lr.zarr", i / "lr.zarr" / "sr.zarr", "-s", 4,
                                                  "--dry-run"],
     ("would overwrite the input",)),
    ("run-workdir-inside-input", lambda i, o: ["run", i / "lr.zarr", o / "sr.zarr", "-s", 4, "--workdir",
                                               i / "lr.zarr" / "work", "--dry-run"],
     ("work directory", "would overwrite the input", "choose another work directory path")),
    ("run-unknown-preset-dry", lambda i, o: ["run", i / "lr.zarr", o / "sr.zarr", "--config", i / "huge-preset.yaml",
                                             "--dry-run"],
     ("unknown restorer preset 'huge'", "choose one of auto, full, small, tiny")),
    ("run-lr-too-thin", lambda i, o: ["run", i / "small.zarr", o / "sr.zarr", "-s", 4, "--serial"],
     ("Stage III reads training patches", "has 3", "LR volume of >= 5 slices")),
    ("run-corrupt-chunk", lambda i, o: ["run", i / "bad.zarr", o / "sr.zarr", "-s", 4, "--serial"],
     ("chunk (1, 1, 1)", "re-convert")),
    ("run-overwrite-foreign-workdir", lambda i, o: ["run", i / "lr.zarr", o / "sr.zarr", "-s", 4, "--workdir",
                                                    i / "precious", "--overwrite", "--dry-run"],
     ("precious is not a Zarr store or folder written by d2r",)),
    ("run-unknown-device-dry", lambda i, o: ["run", i / "lr.zarr", o / "sr.zarr", "-s", 4, "--device", "tpu0",
                                             "--dry-run"],
     ("--device 'tpu0' is not a torch device",)),
    ("run-no-factor", lambda i, o: ["run", i / "lr.zarr", o / "sr.zarr", "--dry-run"],
     ("factor is missing", "give --factor")),
    # --- evaluate ---
    ("evaluate-corrupt-gt", lambda i, o: ["evaluate", i / "gt.zarr", i / "badgt.zarr", "--out", o / "r"],
     ("chunk (2, 1, 1)", "badgt.zarr", "re-convert")),
    ("evaluate-missing-result", lambda i, o: ["evaluate", i / "nope.zarr", i / "gt.zarr", "--out", o / "r"],
     ("no such file",)),
    ("evaluate-other-grid", lambda i, o: ["evaluate", i / "lr.zarr", i / "gt.zarr", "--out", o / "r"],
     ("voxel size", "same grid")),
    ("evaluate-report-inside-input", lambda i, o: ["evaluate", i / "gt.zarr", i / "gt.zarr", "--out",
                                                   i / "gt.zarr" / "report"],
     ("would overwrite the input",)),
]


def test_the_corpus_is_broad() -> None:
    commands = {args(Path("i"), Path("o"))[0] for _, args, _ in CASES}
    assert commands == {"convert", "degrade", "train-restorer", "train-dgean", "restore", "infer", "run", "evaluate"}
    assert len(CASES) >= 30 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, args, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name: str, args: Args, fragments: tuple[str, ...], inputs: Path, tmp_path: Path) -> None:
    before = tree(inputs)
    result = CliRunner().invoke(cli, [str(a) for a in args(inputs, tmp_path)])
    out = result.output
    assert result.exit_code == 1, f"exit {result.exit_code}: {out}\n{result.exception!r}"
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and out.rstrip().endswith(errors[0]), f"not one closing error line: {out!r}"
    for fragment in fragments:
        assert fragment.lower() in errors[0].lower(), f"{fragment!r} not in {errors[0]!r}"
    assert tree(inputs) == before, "the inputs changed"
    assert not list(tmp_path.rglob("*.d2r-lock")), "a lock was left behind"
