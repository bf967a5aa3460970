"""Evaluate demo-membrane models on data they were not tuned on, old and new side by side.

    python scripts/evaluate_demo_model.py --model demo-membrane --json /tmp/new.json
    python scripts/evaluate_demo_model.py --model /tmp/demo-membrane-old --json /tmp/old.json
    python scripts/evaluate_demo_model.py --table /tmp/old.json /tmp/new.json   # Markdown

Four parts, all through CryoMamba's engine (`cm.segment`, tile step 0.5, no TTA):

1. held-out synthetic volumes (64×128×128): the old generator (`cryomamba.synth`, seeds 1000+)
   at three SNRs, and `cryomamba.synth_random` (seeds 100000+, never trained on) with one
   factor fixed at an extreme and the others drawn: membrane Dice;
2. pure noise of each spectrum (no content at all): the fraction of voxels called membrane
   (seed 200000; `--noise-seeds K` also runs the next K − 1 seeds, and `--table` then adds
   the worst seed of each spectrum);
3. real membrane geometry: label 1 of ../shared/data/real-mrc/pyseg_tomo22_membrane_labels
   (a segmented vesicle, 50×166×166; its header says 1 Å, a placeholder: the band is 4–5
   voxels thick, as a membrane is at ~10 Å/voxel, so it is rendered at 10 Å) rendered as
   bilayer or band with several spectra and contrasts: membrane Dice (`--thresholds`: also
   at several probability thresholds, and each rendering's noise-free reference;
   `--pyseg-seeds K`: each rendering with K noise seeds, and `--table` adds the worst);
   part "beyond": the same geometry in renderings outside the target's six (smooth noise on
   bilayers, an uncorrected CTF, fainter bands), to map where the model fails;
4. ../shared/data/real-mrc/tardis_mrc3D_mode0.mrc (a real tomogram crop, 23.2 Å, no
   labels): the fraction called membrane, and an overview PNG (`--overview DIR`).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

import cryomamba as cm
from cryomamba.synth import synthesize
from cryomamba.synth_random import NO_CONTENT, Factors, profile, randomized, transfer
from cryomamba.synth_spectra import filter_volume

MEMBRANE = 1
SHAPE = (64, 128, 128)
_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (or beside the folder of worktrees that holds it)
REAL = (
    next(
        (p for p in (_ROOT.parent / "shared", _ROOT.parents[1] / "shared") if p.is_dir()),
        _ROOT.parent / "shared",
    )
    / "data"
    / "real-mrc"
)
PYSEG = "pyseg_tomo22_membrane_labels_int8.mrc"
TARDIS = "tardis_mrc3D_mode0.mrc"

# Held-out randomised conditions: one factor at an extreme, the rest drawn per seed.
CONDITIONS: dict[str, dict[str, Any]] = {
    "bilayer": {"profile": "bilayer"},
    "band": {"profile": "band"},
    "thickness 3 nm": {"thickness_nm": 3.0},
    "thickness 8 nm": {"thickness_nm": 8.0},
    "contrast 0.5σ": {"contrast": 0.5},
    "contrast 3σ": {"contrast": 3.0},
    "voxel 7 Å": {"voxel_size": 7.0},
    "voxel 14 Å": {"voxel_size": 14.0},
    "white noise": {"noise": "white"},
    "low-pass 60 Å": {"noise": "lowpass", "lowpass_res_a": 60.0},
    "CTF 1.5 µm": {"noise": "ctf", "defocus_um": 1.5},
    "CTF 6 µm, not flipped": {"noise": "ctf", "defocus_um": 6.0, "phase_flipped": False},
    "tilt ±40°": {"tilt_range_deg": 40.0},
    "no wedge": {"tilt_range_deg": None},
    "small vesicles (8–15 nm)": {"vesicle_radius_nm": (8.0, 15.0), "n_vesicles": 8},
    "stack, touching": {"n_stacks": 1, "stack_gap_nm": 0.0},
    "strongly bent sheets": {"n_sheets": 2, "sheet_bend_nm": 15.0},
    "many distractors": {
        "n_particles": 60, "n_filaments": 6, "n_tubes": 1, "n_gold": 5, "carbon_edge": True,
        "gradient": 2.0,
    },
}  # fmt: skip
NOISE: dict[str, dict[str, Any]] = {
    "white, no wedge": {"noise": "white", "tilt_range_deg": None},
    "white, wedge ±60°": {"noise": "white", "tilt_range_deg": 60.0},
    "low-pass 25 Å, ±50°": {"noise": "lowpass", "lowpass_res_a": 25.0, "tilt_range_deg": 50.0},
    "low-pass 60 Å, ±70°": {"noise": "lowpass", "lowpass_res_a": 60.0, "tilt_range_deg": 70.0},
    "CTF 2 µm, flipped, ±60°": {"noise": "ctf", "defocus_um": 2.0, "tilt_range_deg": 60.0},
    "CTF 5 µm, not flipped, ±45°": {
        "noise": "ctf", "defocus_um": 5.0, "phase_flipped": False, "tilt_range_deg": 45.0,
    },
}  # fmt: skip
RENDERINGS: dict[str, dict[str, Any]] = {
    "bilayer, white, 1.5σ": {"profile": "bilayer", "noise": "white", "contrast": 1.5},
    "band, white, 1.5σ": {"profile": "band", "noise": "white", "contrast": 1.5},
    "bilayer, CTF 3 µm, 1.5σ": {"profile": "bilayer", "noise": "ctf", "contrast": 1.5},
    "band, low-pass 40 Å, 1σ": {
        "profile": "band", "noise": "lowpass", "lowpass_res_a": 40.0, "contrast": 1.0,
    },
    "bilayer, white, 0.7σ": {"profile": "bilayer", "noise": "white", "contrast": 0.7},
    "band, CTF 5 µm, 3σ": {"profile": "band", "noise": "ctf", "defocus_um": 5.0, "contrast": 3.0},
}  # fmt: skip
# Not part of the target: the renderings next to the six, chosen after the six, to
# show how far the model's competence reaches. Noise seeds 320000 + k.
BEYOND: dict[str, dict[str, Any]] = {
    "band, low-pass 50 Å, 1.2σ": {
        "profile": "band", "noise": "lowpass", "lowpass_res_a": 50.0, "contrast": 1.2,
    },
    "bilayer, low-pass 40 Å, 1σ": {
        "profile": "bilayer", "noise": "lowpass", "lowpass_res_a": 40.0, "contrast": 1.0,
    },
    "band, CTF 3 µm, 1σ": {"profile": "band", "noise": "ctf", "defocus_um": 3.0, "contrast": 1.0},
    "band, white, 1σ": {"profile": "band", "noise": "white", "contrast": 1.0},
    "bilayer, CTF 5 µm, not flipped, 2σ": {
        "profile": "bilayer", "noise": "ctf", "defocus_um": 5.0, "phase_flipped": False,
        "contrast": 2.0,
    },
    "band, low-pass 30 Å, 2σ, wedge ±45°": {
        "profile": "band", "noise": "lowpass", "lowpass_res_a": 30.0, "contrast": 2.0,
        "tilt_range_deg": 45.0,
    },
}  # fmt: skip


def pyseg_seed(k: int, j: int = 0) -> int:
    """The noise seed of the k-th PySeg rendering's j-th draw (j = 0: the table's)."""
    return 300_000 + k + 10_000 * j


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    inter = np.count_nonzero(pred & truth)
    total = np.count_nonzero(pred) + np.count_nonzero(truth)
    return 2 * inter / total if total else 1.0


def run(model: str, volume: np.ndarray, voxel_size: float = 10.0) -> np.ndarray:
    """Membrane mask of `model` on an array at `voxel_size` Å."""
    vol = cm.Volume.from_array(volume, voxel_size=voxel_size)
    result = cm.segment(vol, model=model, preview_interval_s=0)
    return np.asarray(result.labels) == MEMBRANE


PYSEG_HALF_NM = 2.75  # half the nominal thickness of the rendered band (render_pyseg)


def pyseg_factors(**factors: Any) -> Factors:
    """The factors of a PySeg rendering: a ±60° wedge and a 5.5 nm band unless named."""
    return Factors(**{"tilt_range_deg": 60.0, "thickness_nm": 2 * PYSEG_HALF_NM, **factors})


def render_pyseg(labels: np.ndarray, seed: int, **factors: Any) -> np.ndarray:
    """A tomogram of the pyseg membrane (label 1) rendered with the given factors at 10 Å."""
    mem = labels == MEMBRANE
    # d: distance (nm) from the midsurface of a 5.5 nm band whose edge is the label's edge;
    # the label band is 3.5-5 voxels thick (median 4.7), so inside it d stops short of 0
    half = PYSEG_HALF_NM
    inside = ndimage.distance_transform_edt(mem)
    outside = ndimage.distance_transform_edt(~mem)
    d = np.where(mem, np.maximum(half - inside + 0.5, 0.0), half + outside - 0.5)
    f = pyseg_factors(**factors)
    shape = labels.shape
    h = transfer(f, shape, 10.0)
    signal = filter_volume(profile(d, f.profile, f.thickness_nm, 1.0).astype(np.float32), h)
    signal *= np.float32(f.contrast / math.sqrt(float(np.mean(signal[mem].astype(float) ** 2))))
    noise = filter_volume(np.random.default_rng(seed).standard_normal(shape, np.float32), h)
    return signal + noise / np.float32(noise.std())


def membrane_probability(model: str, volume: np.ndarray) -> np.ndarray:
    """The membrane probability (softmax) of `model` on an array at 10 Å, through the
    engine's probability maps; its arg-max mask is exactly ``p > 0.5``."""
    from cryomamba.probabilities import open_probabilities

    with tempfile.TemporaryDirectory() as folder:
        sink = cm.sinks.FileSink(folder, formats=("probabilities",))
        vol = cm.Volume.from_array(volume, voxel_size=10.0)
        cm.segment(vol, model=model, preview_interval_s=0, formats=("probabilities",), sinks=[sink])
        probabilities = open_probabilities(Path(folder) / "probabilities.zarr")[0]
        return np.asarray(probabilities[0], dtype=np.float32)  # channel 0: label 1


def by_threshold(p: np.ndarray, truth: np.ndarray) -> dict[str, list[float]]:
    """Dice and called / true volume of ``p > t`` for each of THRESHOLDS."""
    masks = {f"{t:g}": p > t for t in THRESHOLDS}
    return {
        t: [dice(mask, truth), float(np.count_nonzero(mask) / truth.sum())]
        for t, mask in masks.items()
    }


def noise_free_reference(labels: np.ndarray, **factors: Any) -> float:
    """Dice of the membrane label passed through a rendering's optics with no noise and cut
    at the true volume: what the band limit and the wedge alone take away. A reference, not
    a ceiling: under a band-pass (CTF) a model that knows membranes are bands can beat it."""
    mem = labels == MEMBRANE
    optics = transfer(pyseg_factors(**factors), mem.shape, 10.0)
    blurred = filter_volume(mem.astype(np.float32), optics)
    n = int(mem.sum())
    cut = np.partition(blurred.ravel(), blurred.size - n)[blurred.size - n]
    return dice(blurred >= cut, mem)


THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
PARTS = ("synth", "random", "noise", "pyseg", "beyond", "tardis")


def evaluate(
    model: str,
    n: int,
    overview: Path | None,
    parts: set[str],
    conditions: list[str],
    noise_seeds: int = 1,
    thresholds: bool = False,
    pyseg_seeds: int = 1,
) -> dict[str, Any]:
    """Run the `parts` asked for; `conditions` (names of randomised conditions and PySeg
    renderings) narrows them to those named."""
    out: dict[str, Any] = {
        "model": model, "synth": {}, "random": {}, "noise": {}, "pyseg": {}, "beyond": {},
    }  # fmt: skip
    wanted = lambda name: not conditions or name in conditions  # noqa: E731
    for snr in (0.5, 1.0, 2.0) if "synth" in parts else ():
        scores = []
        for i in range(n):
            tomo = synthesize(SHAPE, seed=1000 + i, snr=snr)
            scores.append(dice(run(model, tomo.volume), tomo.labels == MEMBRANE))
        out["synth"][f"SNR {snr:g}"] = scores
        print(f"synth SNR {snr:g}: {np.round(scores, 3)}", flush=True)
    for name, fixed in CONDITIONS.items() if "random" in parts else ():
        if not wanted(name):
            continue
        scores = []
        for i in range(n):
            tomo = randomized(SHAPE, seed=100_000 + i, **fixed)
            scores.append(dice(run(model, tomo.volume), tomo.labels == MEMBRANE))
        out["random"][name] = scores
        print(f"random {name}: {np.round(scores, 3)}", flush=True)
    for name, spec in NOISE.items() if "noise" in parts else ():
        fractions = [
            float(run(model, randomized(SHAPE, seed=s, **NO_CONTENT, **spec).volume).mean())
            for s in range(200_000, 200_000 + noise_seeds)
        ]
        out["noise"][name] = fractions[0]  # seed 200000: the table's
        if noise_seeds > 1:
            out.setdefault("noise_seeds", {})[name] = fractions
        print(f"noise {name}: " + " ".join(f"{f:.4%}" for f in fractions), flush=True)
    if parts & {"pyseg", "beyond"}:
        import mrcfile

        with warnings.catch_warnings():  # PySeg wrote a zero machine stamp; mrcfile warns
            warnings.filterwarnings("ignore", "Unrecognised machine stamp", RuntimeWarning)
            with mrcfile.open(REAL / PYSEG, permissive=True) as m:
                labels = np.asarray(m.data, dtype=np.int8)
    for k, (name, factors) in enumerate(RENDERINGS.items() if "pyseg" in parts else ()):
        if not wanted(name):
            continue
        volume = render_pyseg(labels, pyseg_seed(k), **factors)
        # p > 0.5 is the arg-max mask exactly, so one model call serves both
        p = membrane_probability(model, volume) if thresholds else None
        mask = run(model, volume) if p is None else p > 0.5
        scores = [dice(mask, labels == MEMBRANE)]
        for j in range(1, pyseg_seeds):  # the same rendering, other noise
            volume_j = render_pyseg(labels, pyseg_seed(k, j), **factors)
            scores.append(dice(run(model, volume_j), labels == MEMBRANE))
        out["pyseg"][name] = scores[0]
        if pyseg_seeds > 1:
            out.setdefault("pyseg_seeds", {})[name] = scores
        print(f"pyseg {name}: " + " ".join(f"{d:.3f}" for d in scores), flush=True)
        if p is not None:  # is the shortfall the drawn thickness, the optics, or the rest?
            curve = by_threshold(p, labels == MEMBRANE)
            reference = noise_free_reference(labels, **factors)
            out.setdefault("pyseg_thresholds", {})[name] = curve
            out.setdefault("pyseg_noise_free_reference", {})[name] = reference
            cells = "  ".join(f"p>{t} {d:.3f} ({v:.2f}x)" for t, (d, v) in curve.items())
            print(f"    by threshold: {cells}; noise-free reference {reference:.3f}", flush=True)
    for k, (name, factors) in enumerate(BEYOND.items() if "beyond" in parts else ()):
        if wanted(name):
            volume = render_pyseg(labels, 320_000 + k, **factors)
            out["beyond"][name] = dice(run(model, volume), labels == MEMBRANE)
            print(f"beyond {name}: {out['beyond'][name]:.3f}", flush=True)
    if "tardis" not in parts:
        return out
    vol = cm.Volume.open(REAL / TARDIS)
    result = cm.segment(vol, model=model, preview_interval_s=0)
    tardis = np.asarray(result.labels) == MEMBRANE
    out["tardis_fraction"] = float(tardis.mean())
    print(f"tardis: {tardis.mean():.2%} called membrane", flush=True)
    if overview is not None:
        from cryomamba.overview import write_overview_png

        image = np.asarray(vol.data, dtype=np.float32)
        name = Path(model).name if Path(model).exists() else model
        png = overview / f"demo-model-tardis-{name}.png"
        write_overview_png(
            png, image, tardis.astype(np.uint8), voxel_size=(23.2,) * 3,
            label_names={0: "background", 1: "membrane"},
        )  # fmt: skip
        print(f"wrote {png}")
    return out


def table(sides: list[tuple[str, dict[str, Any]]]) -> str:
    """Markdown tables, one column per model (named), per part; rows from the last model."""
    names = [name for name, _ in sides]
    last = sides[-1][1]
    head = lambda first: [  # noqa: E731
        f"| {first} | " + " | ".join(names) + " |",
        "| --- |" + " ---: |" * len(names),
    ]
    row = lambda name, cells: f"| {name} | " + " | ".join(cells) + " |"  # noqa: E731
    lines = head("held-out synthetic, Dice")
    for part, label in (("synth", "cryomamba.synth"), ("random", "randomised")):
        for name in (
            k for k in {**CONDITIONS, "SNR 0.5": 0, "SNR 1": 0, "SNR 2": 0} if k in last[part]
        ):
            cells = [f"{np.mean(d[part][name]):.3f}" for _, d in sides]
            lines.append(row(f"{label}: {name}", cells))
    lines += ["", *head("pure noise: called membrane")]
    for name in last["noise"]:
        lines.append(row(name, [f"{d['noise'][name]:.3%}" for _, d in sides]))
    with_seeds = [(n, d) for n, d in sides if "noise_seeds" in d]
    if with_seeds:  # models run with --noise-seeds K: the worst seed of each spectrum
        k = min(len(next(iter(d["noise_seeds"].values()))) for _, d in with_seeds)
        lines += ["", *head(f"pure noise, worst of seeds 200000–{200_000 + k - 1}")]
        for name in last["noise"]:
            lines.append(
                row(
                    name,
                    [
                        f"{max(d['noise_seeds'][name][:k]):.3%}" if "noise_seeds" in d else "—"
                        for _, d in sides
                    ],
                )
            )
    lines += ["", *head("pyseg membrane rendered as, Dice")]
    for name in last["pyseg"]:
        lines.append(row(name, [f"{d['pyseg'][name]:.3f}" for _, d in sides]))
    with_seeds = [(n, d) for n, d in sides if "pyseg_seeds" in d]
    if with_seeds:  # models run with --pyseg-seeds K: the worst noise draw of each rendering
        k = min(len(next(iter(d["pyseg_seeds"].values()))) for _, d in with_seeds)
        lines += ["", *head(f"pyseg membrane, worst of {k} noise seeds, Dice")]
        for name in last["pyseg"]:
            cells = [
                f"{min(d['pyseg_seeds'][name][:k]):.3f}" if "pyseg_seeds" in d else "—"
                for _, d in sides
            ]
            lines.append(row(name, cells))
    if last.get("beyond"):  # "—" for a model run without that part
        lines += ["", *head("pyseg membrane, renderings beyond the target's six, Dice")]
        for name in last["beyond"]:
            cells = [
                f"{d['beyond'][name]:.3f}" if name in d.get("beyond", {}) else "—" for _, d in sides
            ]
            lines.append(row(name, cells))
    lines += [
        "",
        "Real crop (tardis, 23.2 Å), called membrane: "
        + ", ".join(f"{d['tardis_fraction']:.2%} ({n})" for n, d in sides)
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo-membrane", help="a model name or folder")
    parser.add_argument("--n", type=int, default=2, help="volumes per synthetic condition")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--overview", type=Path, help="folder for the real-crop overview PNG")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset")
    parser.add_argument(
        "--conditions",
        nargs="*",
        default=[],
        help="run only these randomised conditions and PySeg renderings (names as in the tables)",
    )
    parser.add_argument(
        "--noise-seeds",
        type=int,
        default=1,
        help="pure-noise volumes per spectrum (seeds 200000 up; the table shows the first)",
    )
    parser.add_argument(
        "--pyseg-seeds",
        type=int,
        default=1,
        help="noise draws per PySeg rendering (the table's, then seeds 10000 apart); --table "
        "then adds the worst of them",
    )
    parser.add_argument(
        "--thresholds",
        action="store_true",
        help="PySeg renderings: also Dice and called/true volume at probability thresholds "
        f"{', '.join(map(str, THRESHOLDS))}, and the noise-free reference of each rendering",
    )
    parser.add_argument(
        "--table",
        nargs="+",
        metavar="NAME=JSON",
        help="print the tables, a column per model, from JSON files written by --json "
        "(several per model: comma-separated, merged), e.g. old=a.json new=b.json",
    )
    args = parser.parse_args()
    if args.noise_seeds < 1 or args.pyseg_seeds < 1:
        parser.error(
            f"--noise-seeds and --pyseg-seeds must be at least 1, "
            f"got {args.noise_seeds} and {args.pyseg_seeds}"
        )
    if args.table:
        sides = []
        for spec in args.table:
            name, _, files = spec.rpartition("=")
            merged: dict[str, Any] = {}
            for p in files.split(","):
                for key, value in json.loads(Path(p).read_text()).items():
                    merged[key] = (
                        {**merged.get(key, {}), **value} if isinstance(value, dict) else value
                    )
            sides.append((name or f"model {len(sides) + 1}", merged))
        print(table(sides))
        return
    start = time.time()
    out = evaluate(
        args.model,
        args.n,
        args.overview,
        set(args.parts.split(",")),
        args.conditions,
        args.noise_seeds,
        args.thresholds,
        args.pyseg_seeds,
    )
    out["seconds"] = round(time.time() - start)
    print(f"{out['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
