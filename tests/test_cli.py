"""Tests for the `cryomamba` command line, run in-process through `main(argv)`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mrcfile
import nibabel as nib
import nrrd
import numpy as np
import pytest
from PIL import Image

import cryomamba as cm
from cryomamba import artifacts
from cryomamba.cli import main
from cryomamba.executors.local import LocalExecutor

REAL_MRC = Path(__file__).parent / "data" / "real-mrc"
SHAPE = (24, 48, 48)
ARTIFACTS = {"mask.mrc", "mask.nii.gz", "mask.nrrd", "stats.json", "overview.png"}


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """A tiny random-weights nnU-Net folder (labels: background, membrane)."""
    from cryomamba.testing import make_model_folder

    folder = make_model_folder(
        tmp_path_factory.mktemp("cli-model") / "m", patch_size=(16, 16, 16), features=(4, 8)
    )
    return str(folder)


@pytest.fixture(scope="module")
def tomogram(tmp_path_factory) -> Path:
    """A small synthetic tomogram on disk, 10 Å voxels like the model."""
    from cryomamba.synth import synthesize, write_mrc

    path = tmp_path_factory.mktemp("cli-data") / "tomo.mrc"
    write_mrc(synthesize(SHAPE, seed=1), path)
    return path


def run(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def segment_args(tomogram: Path, out: Path, model: str, *extra: object) -> list[object]:
    return ["segment", tomogram, "-o", out, "--model", model, "--device", "cpu", *extra]


def assert_one_error(err: str, *needles: str) -> str:
    """Exactly one `error:` line, no traceback; return that line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


# -- segment ---------------------------------------------------------------------------------


def test_segment_writes_every_artifact_that_reads_back(capsys, tmp_path, tomogram, model):
    out = tmp_path / "out"
    code, stdout, _ = run(capsys, *segment_args(tomogram, out, model, "--tile-step", "1.0"))

    assert code == 0
    assert {p.name for p in out.iterdir()} == ARTIFACTS
    with mrcfile.open(tomogram) as src, mrcfile.open(out / "mask.mrc") as mask:
        assert mask.data.shape == src.data.shape == SHAPE
        assert mask.voxel_size == src.voxel_size
        assert set(np.unique(mask.data)) <= {0, 1}
    assert nib.load(out / "mask.nii.gz").shape == SHAPE[::-1]  # NIfTI is x, y, z
    assert nrrd.read(str(out / "mask.nrrd"))[0].shape == SHAPE[::-1]
    stats = json.loads((out / "stats.json").read_text())
    assert isinstance(stats["labels"], list)
    assert stats["shape"] == list(SHAPE)
    with Image.open(out / "overview.png") as png:
        assert png.format == "PNG"
    for name in ARTIFACTS:
        assert name in stdout
    assert "segmented tomo.mrc" in stdout
    assert "device cpu, float32, tile step 1, mirroring (TTA) off" in stdout
    # one measurement: the seconds printed are stats.json's, and fp16 says what ran
    provenance = stats["provenance"]
    assert provenance["config"]["fp16"] is False and provenance["device"] == "cpu"
    assert f"mirroring (TTA) off, {provenance['seconds']:.1f} s" in stdout


def test_the_summary_says_how_the_job_ran(capsys, tmp_path, tomogram, model):
    out = tmp_path / "out"
    argv = segment_args(tomogram, out, model, "--tile-step", "0.75", "--tta", "--formats", "stats")
    code, stdout, _ = run(capsys, *argv)
    assert code == 0
    assert "device cpu, float32, tile step 0.75, mirroring (TTA) on" in stdout
    config = json.loads((out / "stats.json").read_text())["provenance"]["config"]
    assert config["mirroring"] is True and config["tile_step"] == 0.75
    assert main(["segment", "--help"]) == 0
    assert "--no-tta" in capsys.readouterr().out


def test_existing_results_are_kept_unless_overwrite(capsys, tmp_path, tomogram, model):
    out = tmp_path / "out"
    argv = segment_args(tomogram, out, model, "--tile-step", "1", "--formats", "stats")
    assert run(capsys, *argv)[0] == 0
    before = (out / "stats.json").read_text()
    (out / "stats.json").write_text("earlier results")

    code, stdout, err = run(capsys, *argv)
    assert code == 2 and stdout == ""
    assert_one_error(err, f"{out} already holds results: stats.json")
    assert "hint: pass --overwrite" in err
    assert (out / "stats.json").read_text() == "earlier results"
    # results of other formats do not stand in the way
    assert (
        run(capsys, *segment_args(tomogram, out, model, "--tile-step", "1", "--formats", "mrc"))[0]
        == 0
    )

    code, _, err = run(capsys, *argv, "--overwrite")
    assert code == 0 and "replacing stats.json" in err
    assert (out / "stats.json").read_text() != "earlier results"
    assert json.loads((out / "stats.json").read_text())["labels"] == json.loads(before)["labels"]


def test_segment_formats_mrc_quiet_verbose(capsys, tmp_path, tomogram, model):
    out = tmp_path / "out"
    argv = segment_args(tomogram, out, model, "--formats", "mrc", "--tile-step", "1", "-q", "-v")
    code, stdout, err = run(capsys, *argv)

    assert code == 0
    assert [p.name for p in out.iterdir()] == ["mask.mrc"]
    assert stdout.splitlines() == [str(out / "mask.mrc")]  # --quiet: just the paths
    assert "tiles" in err  # -v: INFO logs on stderr


def test_ctrl_c_cancels_the_job(capsys, tmp_path, tomogram, model, monkeypatch):
    jobs: list[cm.Job] = []
    events = cm.Job.events

    def interrupted(self, timeout=None):
        jobs.append(self)
        for event in events(self, timeout):
            yield event
            if isinstance(event, cm.Progress):
                raise KeyboardInterrupt  # what Ctrl-C raises in the main thread

    monkeypatch.setattr(cm.Job, "events", interrupted)
    out = tmp_path / "out"
    code, _, err = run(capsys, *segment_args(tomogram, out, model))

    assert code == 130
    assert err.splitlines()[-1] == "canceled"
    assert "Traceback" not in err
    assert jobs[0].state == cm.JobState.CANCELED
    assert not out.exists()


def test_failed_job_exits_1(capsys, tmp_path, tomogram, model, monkeypatch):
    def broken(self, job, source, config):
        raise RuntimeError("the engine broke")

    monkeypatch.setattr(LocalExecutor, "_segment", broken)
    code, _, err = run(capsys, *segment_args(tomogram, tmp_path / "out", model))

    assert code == 1
    assert_one_error(err, "the engine broke")
    assert "hint: " in err


def test_failed_save_leaves_no_partial_artifacts(capsys, tmp_path, tomogram, model, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifacts, "write_overview_png", disk_full)
    out = tmp_path / "out"
    code, _, err = run(capsys, *segment_args(tomogram, out, model, "--tile-step", "1"))

    assert code == 2
    assert_one_error(err, "No space left on device")
    assert list(out.iterdir()) == []


BAD_INPUT = {
    "truncated file": (["{real}/broken/truncated_data.mrc"], "truncated"),
    "not an MRC": (["{real}/tardis_tif3D_uint8_same_volume.tif"], "not an MRC file"),
    "2D image": (["{real}/quoll_single_tilt_uint16_voxel0.mrc"], "2D image"),
    "missing file": (["{tmp}/missing.mrc"], "missing.mrc"),
    "unknown model": (["{tomo}", "--model", "no-such-model"], "'no-such-model'"),
    "tile step": (["{tomo}", "--tile-step", "2.0"], "tile_step"),
    "unknown format": (["{tomo}", "--formats", "mrc,jpeg"], "jpeg"),
    "bad folds": (["{tomo}", "--folds", "zero"], "--folds"),
    "bad device": (["{tomo}", "--device", "gpu"], "device"),
    "a folder": (["{real}"], "is a folder, not an MRC file"),
    "an image stack": (["{real}/tomodrgn_float16_stack.mrcs"], "is an image stack, not a tomogram"),
    "a folder that is no model": (
        ["{tomo}", "--model", "{tmp}"],
        "not an nnU-Net v2 trained-model",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUT, ids=list(BAD_INPUT))
def test_bad_input_is_one_error_line_and_exit_2(capsys, tmp_path, tomogram, model, case):
    args, needle = BAD_INPUT[case]
    args = [a.format(real=REAL_MRC, tmp=tmp_path, tomo=tomogram) for a in args]
    out = tmp_path / "out"
    extra = [] if "--model" in args else ["--model", model]
    code, stdout, err = run(capsys, "segment", *args, "-o", out, *extra)

    assert code == 2
    assert_one_error(err, needle)
    assert stdout == ""
    assert not out.exists()


def test_each_refusal_has_a_hint_in_plain_words(capsys, tmp_path, tomogram):
    code, _, err = run(capsys, "segment", REAL_MRC, "-o", tmp_path / "out")
    assert code == 2 and re.search(
        r"^hint: Pass one tomogram file, not a folder: e\.g\. ", err, re.M
    )
    code, _, err = run(capsys, "segment", tomogram, "-o", tmp_path / "out", "--model", tmp_path)
    assert code == 2 and "dataset.json needs" not in err and "fold_N" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_folder_that_cannot_be_created_is_refused_before_the_job(
    capsys, tomogram, model, monkeypatch
):
    monkeypatch.setattr(LocalExecutor, "submit", lambda *a, **k: pytest.fail("job submitted"))
    code, _, err = run(capsys, *segment_args(tomogram, Path("/proc/cryomamba-x"), model))
    assert code == 2
    assert_one_error(err, "cannot create output folder /proc/cryomamba-x")


def test_a_missing_gpu_is_refused_before_the_job_in_plain_words(
    capsys, tmp_path, tomogram, model, monkeypatch
):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setattr(LocalExecutor, "submit", lambda *a, **k: pytest.fail("job submitted"))
    argv = ["segment", tomogram, "-o", tmp_path / "out", "--model", model, "--device", "cuda"]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_error(err, "no GPU that PyTorch can use")
    assert "hint: run on the CPU instead" in err and "device=" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_model_hint_lists_the_registered_models(capsys, tmp_path, tomogram):
    code, _, err = run(capsys, "segment", tomogram, "-o", tmp_path / "out", "--model", "nope")

    assert code == 2
    assert_one_error(err, "unknown model 'nope'")
    assert re.search(r"^hint: .*demo-membrane", err, re.MULTILINE), err


def test_output_folder_below_a_file(capsys, tmp_path, tomogram, model):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    out = blocker / "out"
    code, _, err = run(capsys, *segment_args(tomogram, out, model))

    assert code == 2
    assert_one_error(err, "file.txt is a file, not a folder")
    assert blocker.read_text() == "not a folder"


def test_usage_errors(capsys):
    code, _, err = run(capsys)
    assert code == 2
    assert_one_error(err, "COMMAND")
    code, _, err = run(capsys, "segment", "tomo.mrc")  # no -o
    assert code == 2
    assert_one_error(err, "-o/--out")
    assert "hint: see `cryomamba segment --help`" in err


def test_help_exits_0(capsys):
    code, stdout, _ = run(capsys, "segment", "--help")
    assert code == 0
    assert "--tile-step" in stdout


# -- info, models, synth -----------------------------------------------------------------


def test_info_prints_shape_and_voxel_size(capsys):
    code, stdout, _ = run(capsys, "info", REAL_MRC / "chlamy_hsp60_relion_ispg0.mrc")
    assert code == 0
    assert "48 × 48 × 48" in stdout
    assert "7.84 × 7.84 × 7.84 Å" in stdout


def test_info_json(capsys):
    code, stdout, _ = run(capsys, "info", "--json", REAL_MRC / "chlamy_hsp60_relion_ispg0.mrc")
    assert code == 0
    meta = json.loads(stdout)
    assert meta["shape"] == [48, 48, 48]
    assert meta["voxel_size"] == pytest.approx([7.84] * 3)


def test_info_prints_only_the_labels_the_header_counts(capsys):
    code, stdout, _ = run(capsys, "info", REAL_MRC / "imp_mini_nan_stats.mrc")  # nlabl 0
    assert code == 0 and "invalid string" not in stdout
    assert re.search(r"│ labels +│ — +│", stdout), stdout


def test_info_marks_an_image_stack(capsys):
    code, stdout, _ = run(capsys, "info", "--json", REAL_MRC / "tomodrgn_float16_stack.mrcs")
    assert code == 0
    assert "stack of 37 2D images" in json.loads(stdout)["image_stack"]


def test_info_into_a_reader_that_stops_early_ends_quietly():
    """`cryomamba info x.mrc | head -1`: no `Broken pipe` error, exit code 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cryomamba", "info", str(REAL_MRC / "tardis_mrc3D_mode0.mrc")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # the reader is gone before the table is printed
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert err == b""


def test_info_json_has_no_nan(capsys):
    code, stdout, _ = run(capsys, "info", "--json", REAL_MRC / "imp_mini_nan_stats.mrc")
    assert code == 0
    assert json.loads(stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


def test_models_lists_the_demo_model(capsys):
    code, stdout, _ = run(capsys, "models")
    assert code == 0
    assert "demo-membrane" in stdout
    assert "synthetic" in stdout  # says what the demo model was trained on
    assert "$CRYOMAMBA_MODELS_DIR" in " ".join(stdout.split())  # and how to bring a real one


def test_synth_writes_a_deterministic_mrc(capsys, tmp_path):
    a, b, c = tmp_path / "a.mrc", tmp_path / "sub" / "b.mrc", tmp_path / "c.mrc"
    labels = tmp_path / "labels.mrc"
    assert run(capsys, "synth", a, "--shape", "16,24,32", "--seed", "3", "--labels", labels)[0] == 0
    assert run(capsys, "synth", b, "--shape", "16,24,32", "--seed", "3")[0] == 0
    assert run(capsys, "synth", c, "--shape", "16,24,32", "--seed", "4")[0] == 0

    with mrcfile.open(a) as mrc:
        assert mrc.data.shape == (16, 24, 32)
        assert mrc.voxel_size.x == pytest.approx(10.0)
    with mrcfile.open(labels) as mrc:
        assert mrc.data.shape == (16, 24, 32)
        assert set(np.unique(mrc.data)) <= {0, 1, 2}

    # same seed, same bytes (header label included: no time stamp)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_synth_rejects_a_bad_shape(capsys, tmp_path):
    code, _, err = run(capsys, "synth", tmp_path / "x.mrc", "--shape", "4,4,4")
    assert code == 2
    assert_one_error(err, "shape")
    assert not (tmp_path / "x.mrc").exists()


def test_synth_refuses_a_shape_beyond_memory_before_allocating(capsys, tmp_path, monkeypatch):
    from cryomamba import synth

    monkeypatch.setattr(np, "zeros", lambda *a, **k: pytest.fail("allocated"))
    code, _, err = run(capsys, "synth", tmp_path / "x.mrc", "--shape", "100000,100000,100000")
    assert code == 2
    assert_one_error(err, "100000×100000×100000 synthetic tomogram needs about 56.0 PB")
    assert "bug" not in err and "hint: choose a smaller shape" in err
    monkeypatch.setattr(synth, "_available_memory", lambda: 10**9)
    code, _, err = run(capsys, "synth", tmp_path / "x.mrc", "--shape", "128,512,512")
    assert code == 2 and "and only 1.0 GB is available" in err


def test_out_of_memory_is_not_called_a_bug(capsys, tmp_path, monkeypatch):
    from cryomamba import synth

    def oom(*args, **kwargs):
        raise MemoryError("Unable to allocate 3.55 PiB")

    monkeypatch.setattr(synth, "synthesize", oom)
    code, _, err = run(capsys, "synth", tmp_path / "x.mrc")
    assert code == 2
    assert_one_error(err, "out of memory: Unable to allocate 3.55 PiB")
    assert "bug" not in err


# -- demo and the entry points -------------------------------------------------------------


def assert_demo_output(out: Path, stdout: str) -> float:
    assert {p.name for p in out.iterdir()} == {"tomogram.mrc"} | ARTIFACTS
    match = re.search(r"Dice \(membrane vs\. ground truth\): ([0-9.]+)", stdout)
    assert match, stdout
    dice = float(match.group(1))
    assert 0.0 <= dice <= 1.0
    return dice


def test_demo_with_a_tiny_model(capsys, tmp_path, model):
    out = tmp_path / "demo"
    argv = ["demo", "-o", out, "--shape", "24,48,48", "--model", model, "--device", "cpu"]
    code, stdout, _ = run(capsys, *argv)
    assert code == 0
    assert_demo_output(out, stdout)


@pytest.mark.slow
def test_demo_with_the_bundled_model(capsys, tmp_path):
    out = tmp_path / "demo"
    code, stdout, _ = run(capsys, "demo", "-o", out, "--shape", "32,64,64", "--device", "cpu")
    assert code == 0
    assert_demo_output(out, stdout)


def test_entry_points_print_the_version():
    expected = f"cryomamba {cm.__version__}"
    module = subprocess.run(
        [sys.executable, "-m", "cryomamba", "--version"], capture_output=True, text=True
    )
    assert (module.returncode, module.stdout.strip()) == (0, expected), module.stderr
    script = Path(sys.executable).with_name("cryomamba")
    if script.exists():  # the console script, where the package is installed
        done = subprocess.run([script, "--version"], capture_output=True, text=True)
        assert (done.returncode, done.stdout.strip()) == (0, expected), done.stderr


def test_result_lines_reach_stdout_exactly_as_given(capsys):
    """Tokens, JSON and paths go out verbatim: no markup, emoji codes or wrapping applied."""
    from cryomamba.cli_ui import UI

    text = '{"name": ":smile: [bold]x[/bold]", "path": "' + "d/" * 80 + '"}'
    UI().result(text)
    assert capsys.readouterr().out == text + "\n"
