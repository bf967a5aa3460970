#!/usr/bin/env python
"""Train the bundled "demo-membrane" nnU-Net v2 model on synthetic tomograms, on the CPU.

Writes an nnU-Net v2 trained-model folder (dataset.json, plans.json,
fold_0/checkpoint_final.pth) that nnU-Net's own `nnUNetPredictor` loads, then evaluates the
membrane Dice of that folder with `nnUNetPredictor` on held-out synthetic volumes.

nnU-Net's trainer and preprocessing pipeline are not used (they need CUDA-era extras and hours);
a small torch loop trains the network nnU-Net builds from the plans, on data normalised exactly
as nnU-Net's ZScoreNormalization does at inference.

Usage:
    python scripts/train_demo_model.py --out src/cryomamba/bundled_models/demo-membrane --seed 0
    python scripts/train_demo_model.py --out DIR --channels-last --finetune-iterations 300
    # the same weights, made in two runs:
    python scripts/train_demo_model.py --out D1 --channels-last
    python scripts/train_demo_model.py --out D --channels-last --init D1 --iterations 300 --lr 1e-3
    python scripts/train_demo_model.py --out DIR --eval-only      # evaluate, rewrite README
    python scripts/train_demo_model.py --out DIR --eval-only --eval-snr   # README only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cryomamba.allocator import reuse_freed_memory
from cryomamba.synth import synthesize
from cryomamba.synth_random import NO_CONTENT, Factors, randomized
from cryomamba.testing.model_folder import plans_for

MODEL_NAME = "demo-membrane"
SPACING = [10.0, 10.0, 10.0]  # Å, equal to the synthetic voxel size
PATCH = [64, 64, 64]
FEATURES = [8, 16, 32, 64]
TRAIN_SHAPE = (96, 128, 128)
EVAL_SHAPE = (64, 128, 128)
EVAL_SEEDS = (1000, 1001, 1002, 1003)
VAL_SEEDS = (900, 901)  # monitoring only: disjoint from training (0..N-1) and evaluation seeds
# Randomised volumes (cryomamba.synth_random): training takes seeds from 0 up (the pool, then
# one new volume every --refresh-every iterations); evaluation uses RANDOM_EVAL_SEED and up.
RANDOM_VAL_SEEDS = (90_000, 90_001, 90_003)
RANDOM_EVAL_SEED = 100_000
# Pure-noise volumes (no content, optics drawn as for the others): seeds from NOISE_SEED up.
NOISE_SEED = 60_000
# Smooth noise is where the model hallucinates membranes (docs/demo-model.md), so a share of
# the training volumes have their noise forced to a Gaussian low-pass of LOWPASS_RANGE_A
# (wider than synth_random's 22-60 Å, so that 60 Å is not the edge of what was seen).
LOWPASS_RANGE_A = (30.0, 75.0)
MIRROR_AXES = (0, 1, 2)  # flips keep the missing wedge (around z, in kz-kx) where it is


def make_plans(
    n_train: int, batch_size: int, fg_props: dict, features: list[int] = FEATURES
) -> dict:
    """plans.json content: the PlainConvUNet skeleton CryoMamba's tests use, with our numbers."""
    plans = plans_for(PATCH, features, SPACING)
    plans["dataset_name"] = "Dataset900_DemoMembrane"
    plans["original_median_shape_after_transp"] = list(TRAIN_SHAPE)
    plans["experiment_planner_used"] = "cryomamba scripts/train_demo_model.py (hand-written plans)"
    plans["foreground_intensity_properties_per_channel"] = {"0": fg_props}
    config = plans["configurations"]["3d_fullres"]
    config.update(
        batch_size=batch_size, median_image_size_in_voxels=list(TRAIN_SHAPE), batch_dice=True
    )
    return plans


def make_dataset_json(n_train: int) -> dict:
    """dataset.json content."""
    return {
        "name": MODEL_NAME,
        "description": (
            "CryoMamba demo model: membranes (label 1) in cryo-ET tomograms at 10 Å/voxel, "
            "dark density, trained only on synthetic tomograms (cryomamba.synth_random: "
            "bilayer and band membranes 3-8 nm, white/low-pass/CTF noise, missing wedge "
            "±40-70°, 7-14 Å presented at 10 Å; plus cryomamba.synth). A demonstration: "
            "particles, filaments, carbon edges and gold count as background; it has never "
            "seen a real tomogram."
        ),
        "channel_names": {"0": "cryo-ET"},
        "labels": {"background": 0, "membrane": 1},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "reference": "scripts/train_demo_model.py",
        "licence": "Apache-2.0",
    }


def zscore(volume: np.ndarray) -> np.ndarray:
    """Normalise as nnU-Net's ZScoreNormalization (use_mask_for_norm False) does."""
    image = volume.astype(np.float32)  # copy, like DefaultPreprocessor.run_case_npy
    mean = image.mean()
    std = image.std()
    image -= mean
    image /= max(std, 1e-8)
    return image


def build_network(
    deep_supervision: bool = False, features: list[int] = FEATURES
) -> torch.nn.Module:
    """The network nnU-Net builds from our plans (one stage per entry of `features`)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    arch = plans_for(PATCH, features, SPACING)["configurations"]["3d_fullres"]["architecture"]
    return get_network_from_plans(
        arch["network_class_name"],
        arch["arch_kwargs"],
        arch["_kw_requires_import"],
        input_channels=1,
        output_channels=2,
        allow_init=True,
        deep_supervision=deep_supervision,
    )


def make_volume(seed: int, snr: float, shape: tuple[int, int, int], **kw) -> tuple:
    """(normalised float32 volume, uint8 membrane mask) for one synthetic tomogram."""
    tomo = synthesize(shape, seed=seed, snr=snr, **kw)
    return zscore(tomo.volume), (tomo.labels == 1).astype(np.uint8), tomo.volume


def fg_properties(raws: list[np.ndarray], masks: list[np.ndarray]) -> dict:
    """nnU-Net's foreground intensity statistics (informational for ZScoreNormalization)."""
    fg = np.concatenate([r[m.astype(bool)] for r, m in zip(raws, masks, strict=True)])
    fg = fg.astype(np.float64)
    return {
        "mean": float(fg.mean()),
        "median": float(np.median(fg)),
        "std": float(fg.std()),
        "min": float(fg.min()),
        "max": float(fg.max()),
        "percentile_00_5": float(np.percentile(fg, 0.5)),
        "percentile_99_5": float(np.percentile(fg, 99.5)),
    }


def forced_lowpass(seed: int, fraction: float) -> dict:
    """Factor overrides for volume `seed`: a strong low-pass for `fraction` of the seeds.

    Drawn from its own stream (seed, 1), so the choice does not shift any other draw.
    """
    rng = np.random.default_rng([seed, 1])
    if rng.random() >= fraction:
        return {}
    return {"noise": "lowpass", "lowpass_res_a": float(rng.uniform(*LOWPASS_RANGE_A))}


def describe(f: Factors) -> str:
    """The noise spectrum of a volume, for the training record."""
    return f"lowpass {f.lowpass_res_a:.0f} Å" if f.noise == "lowpass" else f.noise


def random_volume(
    seed: int, lowpass_fraction: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """One domain-randomised training volume: (normalised, mask, raw, meta)."""
    tomo = randomized(TRAIN_SHAPE, seed=seed, **forced_lowpass(seed, lowpass_fraction))
    f = tomo.factors
    meta = {"kind": "random", "seed": seed, "noise": describe(f), "contrast": round(f.contrast, 2)}
    return zscore(tomo.volume), (tomo.labels == 1).astype(np.uint8), tomo.volume, meta


def noise_volume(i: int, lowpass_fraction: float = 0.0) -> tuple:
    """Noise through randomly drawn optics and nothing else: all background."""
    seed = NOISE_SEED + i
    tomo = randomized(
        TRAIN_SHAPE, seed=seed, **NO_CONTENT, **forced_lowpass(seed, lowpass_fraction)
    )
    meta = {"kind": "noise", "seed": seed, "noise": describe(tomo.factors)}
    return zscore(tomo.volume), np.zeros(TRAIN_SHAPE, np.uint8), tomo.volume, meta


def classic_volume(i: int, rng: np.random.Generator) -> tuple:
    """One volume of cryomamba.synth (the old generator) with varied SNR, wedge and content."""
    snr = float(math.exp(rng.uniform(math.log(0.4), math.log(2.5))))
    wedge = float(rng.uniform(20.0, 40.0))
    img, mask, raw = make_volume(
        i,
        snr,
        TRAIN_SHAPE,
        missing_wedge_deg=wedge,
        n_particles=int(rng.integers(20, 160)),
        n_vesicles=int(rng.integers(4, 14)),
        n_sheets=int(rng.integers(0, 3)),
    )
    return img, mask, raw, {"kind": "synth", "seed": i, "snr": round(snr, 3)}


def training_data(
    n: int, n_classic: int, n_noise: int, lowpass_fraction: float, rng: np.random.Generator
) -> tuple[list, list, dict, list]:
    """The starting pool: n randomised volumes (seeds 0..n-1), then n_classic old-style ones
    and n_noise pure-noise ones (the randomised and noise ones are later replaced by fresh
    seeds; the old-style ones stay)."""
    images, masks, raws, meta = [], [], [], []
    for i in range(n + n_classic + n_noise):
        if i < n:
            img, mask, raw, m = random_volume(i, lowpass_fraction)
        elif i < n + n_classic:
            img, mask, raw, m = classic_volume(i - n, rng)
        else:
            img, mask, raw, m = noise_volume(i - n - n_classic, lowpass_fraction)
        images.append(img)
        masks.append(mask)
        raws.append(raw)
        meta.append(m)
    props = fg_properties(raws, masks)
    return images, masks, props, meta


def sample_batch(
    images: list,
    masks: list,
    batch_size: int,
    rng: np.random.Generator,
    fg_fraction: float,
    patch_size: int = PATCH[0],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random patches (a fraction centred on a membrane voxel) with random flips."""
    xs, ys = [], []
    for b in range(batch_size):
        k = int(rng.integers(len(images)))
        img, mask = images[k], masks[k]
        shape = np.array(img.shape)
        patch = np.array([patch_size] * 3)
        # nnU-Net style: the last patches of each batch are forced to hold foreground.
        fg = np.flatnonzero(mask[::4, ::4, ::4])
        if b >= round(batch_size * (1 - fg_fraction)) and fg.size:
            z, y, x = np.unravel_index(fg[int(rng.integers(len(fg)))], mask[::4, ::4, ::4].shape)
            center = np.array([z, y, x]) * 4
            lo = np.clip(center - patch // 2 + rng.integers(-8, 9, size=3), 0, shape - patch)
        else:
            lo = np.array(
                [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch, strict=True)]
            )
        sl = tuple(slice(int(a), int(a + p)) for a, p in zip(lo, patch, strict=True))
        x_, y_ = img[sl], mask[sl]
        for ax in MIRROR_AXES:
            if rng.random() < 0.5:
                x_, y_ = np.flip(x_, ax), np.flip(y_, ax)
        xs.append(np.ascontiguousarray(x_))
        ys.append(np.ascontiguousarray(y_))
    return (
        torch.from_numpy(np.stack(xs)[:, None]),
        torch.from_numpy(np.stack(ys).astype(np.int64)),
    )


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 − batch soft Dice of the membrane class), as nnU-Net's DC_and_CE."""
    ce = F.cross_entropy(logits, target)
    prob = torch.softmax(logits, 1)[:, 1]
    tgt = (target == 1).float()
    tp = (prob * tgt).sum()
    dice = (2 * tp + 1e-5) / (prob.sum() + tgt.sum() + 1e-5)
    return ce + (1 - dice)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    denom = pred.sum() + ref.sum()
    return 1.0 if denom == 0 else float(2 * (pred & ref).sum() / denom)


def val_patches(seeds: tuple[int, ...], random: bool = False) -> tuple[torch.Tensor, np.ndarray]:
    """Fixed 64³ validation patches (centre crops) from volumes never trained on."""
    xs, ys = [], []
    for s in seeds:
        if random:
            tomo = randomized(EVAL_SHAPE, seed=s)
            img, mask = zscore(tomo.volume), (tomo.labels == 1).astype(np.uint8)
        else:
            img, mask, _ = make_volume(s, 1.0, EVAL_SHAPE)
        for x0 in (0, 64)[: 1 if random else 2]:
            sl = (slice(0, 64), slice(32, 96), slice(x0, x0 + 64))
            xs.append(img[sl])
            ys.append(mask[sl])
    return torch.from_numpy(np.stack(xs)[:, None]), np.stack(ys)


def train(args: argparse.Namespace, out: Path) -> dict:
    """Train and write the model folder; return a summary."""
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.use_deterministic_algorithms(True)

    n_classic = round(args.n_train * args.classic_fraction)
    n_noise = round(args.n_train * args.noise_fraction)
    print(
        f"generating {args.n_train} + {n_classic} + {n_noise} training volumes {TRAIN_SHAPE} ...",
        flush=True,
    )
    images, masks, fg_props, meta = training_data(
        args.n_train, n_classic, n_noise, args.lowpass_fraction, rng
    )
    vx, vy = val_patches(VAL_SEEDS)
    rvx, rvy = val_patches(RANDOM_VAL_SEEDS, random=True)
    next_seed, next_noise = args.n_train, n_noise
    t_data = time.perf_counter() - t0
    print(f"  done in {t_data:.1f} s; membrane fraction {np.mean([m.mean() for m in masks]):.3f}")

    net = build_network(deep_supervision=False, features=args.features)
    init_record = None
    if args.init is not None:  # fine-tune: start from another model folder's weights
        ckpt = torch.load(args.init / "fold_0" / "checkpoint_final.pth", weights_only=False)
        net.load_state_dict(ckpt["network_weights"])
        init_record = ckpt.get("cryomamba_training")  # how those weights were made
        print(f"initialised from {args.init}")
    # --channels-last: oneDNN's CPU convolutions take a training step in ~0.77 of the time
    # (benchmarks/train_layout.py); the float sums, and so the weights, come out differently.
    layout = torch.channels_last_3d if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=layout)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"PlainConvUNet {args.features}, patch {PATCH}: {n_params} parameters")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda it: (1 - it / args.iterations) ** 0.9)
    t1, c1 = time.perf_counter(), time.process_time()
    running = None
    for it in range(1, args.iterations + 1):
        if args.refresh_every and it % args.refresh_every == 0:
            # a fresh randomised volume replaces the oldest randomised one in the pool
            slot = (next_seed - args.n_train) % args.n_train
            images[slot], masks[slot], _, m = random_volume(next_seed, args.lowpass_fraction)
            meta.append(m)
            next_seed += 1
        if n_noise and args.noise_refresh_every and it % args.noise_refresh_every == 0:
            # and a fresh pure-noise volume replaces the oldest pure-noise one
            slot = args.n_train + n_classic + (next_noise - n_noise) % n_noise
            images[slot], masks[slot], _, m = noise_volume(next_noise, args.lowpass_fraction)
            meta.append(m)
            next_noise += 1
        net.train()
        x, y = sample_batch(
            images, masks, args.batch_size, rng, fg_fraction=0.33, patch_size=args.train_patch
        )
        loss = dice_ce_loss(net(x.to(memory_format=layout)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        sched.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if args.save_every and it % args.save_every == 0 and it < args.iterations:
            # a snapshot: the folder as it would be if the run stopped here
            save_folder(out, net, args, fg_props, meta, it, t1, c1, init_record)
        if it % args.log_every == 0 or it == args.iterations:
            net.eval()
            with torch.no_grad():
                pred = net(vx).argmax(1).numpy()
                rpred = net(rvx).argmax(1).numpy()
            el = time.perf_counter() - t1
            print(
                f"iter {it:5d}/{args.iterations}  loss {running:.4f}  "
                f"val dice (patches, synth snr 1) {dice(pred, vy):.4f} "
                f"(randomised) {dice(rpred, rvy):.4f}  "
                f"lr {sched.get_last_lr()[0]:.2e}  {el:.0f} s ({el / it:.2f} s/iter)",
                flush=True,
            )
    save_folder(out, net, args, fg_props, meta, it, t1, c1, init_record)
    t_train = time.perf_counter() - t1
    return {
        "params": n_params,
        "data_s": round(t_data, 1),
        "train_s": round(t_train, 1),
        "s_per_iter": round(t_train / args.iterations, 3),
        "train_cpu_s": round(time.process_time() - c1, 1),
    }


def save_folder(
    out: Path,
    net: torch.nn.Module,
    args: argparse.Namespace,
    fg_props: dict,
    meta: list,
    iteration: int,
    t1: float,
    c1: float,
    init_record: dict | None = None,
) -> None:
    """Write the nnU-Net model folder with the weights after `iteration` iterations
    (`init_record`: the training record of the weights it started from, kept inside)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "fold_0").mkdir(exist_ok=True)
    dataset_json = make_dataset_json(args.n_train)
    plans = make_plans(args.n_train, args.batch_size, fg_props, args.features)
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2, ensure_ascii=False) + "\n")
    (out / "plans.json").write_text(json.dumps(plans, indent=2, ensure_ascii=False) + "\n")
    # As nnU-Net saves it: the state dict names each shared tensor several times (encoder,
    # decoder.encoder, all_modules), torch.save stores each storage once. Don't clone.
    weights = net.state_dict()  # strides as trained; load_state_dict copies the values
    checkpoint = {
        "network_weights": weights,
        "trainer_name": "nnUNetTrainer",
        "init_args": {
            "plans": plans,
            "configuration": "3d_fullres",
            "fold": 0,
            "dataset_json": dataset_json,
            "device": "cpu",
        },
        "inference_allowed_mirroring_axes": list(MIRROR_AXES),
        "current_epoch": iteration,
        "cryomamba_training": {
            "script": "scripts/train_demo_model.py",
            "argv": args.argv,
            "seed": args.seed,
            "iterations": args.iterations,
            "iterations_done": iteration,
            "batch_size": args.batch_size,
            "features": list(args.features),
            "lr": args.lr,
            "n_train": args.n_train,
            "init": None if args.init is None else str(args.init),
            "init_training": init_record,
            "train_patch": args.train_patch,
            "classic_fraction": args.classic_fraction,
            "noise_fraction": args.noise_fraction,
            "refresh_every": args.refresh_every,
            "noise_refresh_every": args.noise_refresh_every,
            "lowpass_fraction": args.lowpass_fraction,
            "channels_last": args.channels_last,
            "threads": args.threads,
            "train_wall_s": round(time.perf_counter() - t1, 1),
            "train_cpu_s": round(time.process_time() - c1, 1),
            "train_volumes": meta,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    tmp = out / "fold_0" / "checkpoint_final.pth.tmp"
    torch.save(checkpoint, tmp)
    tmp.replace(out / "fold_0" / "checkpoint_final.pth")


def evaluate(out: Path, snrs: list[float]) -> dict[float, dict]:
    """Membrane Dice of the model folder with nnU-Net's own predictor, per SNR and volume.

    Also the share of wrong voxels (missed, extra) lying within one voxel of the label edge.
    """
    from scipy import ndimage

    from cryomamba.testing.reference import nnunet_predictor

    predictor = nnunet_predictor(out)
    results: dict[float, dict] = {}
    for snr in snrs:
        scores, counts = [], np.zeros(4)
        for seed in EVAL_SEEDS:
            tomo = synthesize(EVAL_SHAPE, seed=seed, snr=snr)
            seg = predictor.predict_single_npy_array(
                tomo.volume[None], {"spacing": SPACING}, None, None, False
            )
            pred, ref = seg == 1, tomo.labels == 1
            scores.append(dice(pred, ref))
            edge = ndimage.binary_dilation(ref) & ~ndimage.binary_erosion(ref)
            fn, fp = ref & ~pred, pred & ~ref
            counts += [fn.sum(), (fn & edge).sum(), fp.sum(), (fp & edge).sum()]
        results[snr] = {
            "dice": scores,
            "fn_edge": float(counts[1] / max(counts[0], 1)),
            "fp_edge": float(counts[3] / max(counts[2], 1)),
        }
        print(
            f"held-out dice, snr {snr:g}: mean {np.mean(scores):.4f}  "
            f"per volume {[round(s, 4) for s in scores]}  "
            f"(wrong voxels within 1 voxel of the label edge: "
            f"missed {results[snr]['fn_edge']:.1%}, extra {results[snr]['fp_edge']:.1%})",
            flush=True,
        )
    return results


def lineage(record: dict) -> list[dict]:
    """The training records behind a checkpoint, oldest first (each --init run keeps the
    record of the weights it started from)."""
    runs = [record]
    while runs[0].get("init_training"):
        runs.insert(0, runs[0]["init_training"])
    return runs


def runs_text(runs: list[dict]) -> str:
    """How the weights were made, run by run, for the README."""
    first = runs[0]
    origin = (
        "Trained from scratch"
        if first.get("init") is None
        else f"Started from the weights of `{first['init']}`, whose record is not kept"
    )
    if len(runs) == 1:
        return f"{origin}. "
    steps = [
        f"{origin[0].lower()}{origin[1:]}, {first['iterations']} iterations at lr "
        f"{first['lr']:g} ({first['train_wall_s']:.0f} s)"
    ]
    steps += [
        f"then {r['iterations']} iterations from those weights with a fresh AdamW and a new "
        f"poly decay from lr {r['lr']:g} ({r['train_wall_s']:.0f} s)"
        for r in runs[1:]
    ]
    text = f"Trained in {len(runs)} runs of this script: " + "; ".join(steps) + "."
    return textwrap.fill(text, width=92) + "\n"


def write_readme(out: Path, results: dict) -> None:
    """README.md of the model folder, from the training record in its checkpoint."""
    ckpt = torch.load(out / "fold_0" / "checkpoint_final.pth", weights_only=False)
    runs = lineage(ckpt["cryomamba_training"])
    rec = runs[0]  # the first run: the data, the schedule (later runs re-use its pool)
    features = rec.get("features", FEATURES)
    n_params = sum(p.numel() for p in build_network(features=features).parameters())
    commands = list(dict.fromkeys(" ".join(r["argv"]) for r in runs))
    cmd = "\n".join("python scripts/train_demo_model.py " + c for c in commands)
    n_classic = round(rec["n_train"] * rec.get("classic_fraction", 0))
    n_noise = round(rec["n_train"] * rec.get("noise_fraction", 0))
    n_random = sum(1 for m in rec["train_volumes"] if m.get("kind") == "random")
    n_noise_all = sum(1 for m in rec["train_volumes"] if m.get("kind") == "noise")
    n_lowpass = sum(1 for m in rec["train_volumes"] if str(m.get("noise")).startswith("lowpass"))
    forced = rec.get("lowpass_fraction", 0.0)
    lowpass_text = (
        f"For a share of {forced:g} of the randomised and pure-noise seeds (drawn per seed)\n"
        f"the noise is forced to a Gaussian low-pass of {LOWPASS_RANGE_A[0]:g}–"
        f"{LOWPASS_RANGE_A[1]:g} Å, because smooth\nnoise is where the model draws membranes "
        f"that are not there; {n_lowpass} of the {len(rec['train_volumes'])} volumes\nhad "
        "low-pass noise, forced or drawn. "
        if forced
        else ""
    )
    noise_refresh = rec.get("noise_refresh_every", 0)
    layouts = {bool(r.get("channels_last")) for r in runs}
    layout_text = (
        "The network and its batches were held in the channels-last 3D memory layout\n"
        "(`--channels-last`), faster on a CPU; the default layout gives other weights."
        if layouts == {True}
        else "Default (contiguous) memory layout; `--channels-last` trains faster on a CPU\n"
        "but gives other weights."
        if layouts == {False}
        else "Memory layout per run: "
        + ", ".join("channels-last" if r.get("channels_last") else "default" for r in runs)
        + "\n(`--channels-last` trains faster on a CPU but gives other weights)."
    )
    init_text = runs_text(runs)
    train_wall = sum(r["train_wall_s"] for r in runs)
    train_cpu = sum(r["train_cpu_s"] for r in runs)
    last = runs[-1]
    done = last.get("iterations_done", last["iterations"])
    stopped = (
        f"**The run was stopped after {done} of its {last['iterations']} iterations** (a "
        "deadline, on a machine shared with other jobs); these weights are the snapshot "
        f"`--save-every` wrote at iteration {done}, so the same command gives them again at "
        f"that iteration. "
        if done < last["iterations"]
        else ""
    )
    rows = "\n".join(
        f"| {snr:g} | {np.mean(r['dice']):.4f} | {', '.join(f'{x:.4f}' for x in r['dice'])} |"
        for snr, r in results.items()
    )
    held_out = (
        f"""
## nnU-Net's own predictor on the old generator

`nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=cpu)` on 4 volumes
{EVAL_SHAPE} of `cryomamba.synth` (seeds {", ".join(map(str, EVAL_SEEDS))}), membrane Dice:

| SNR | mean Dice | per volume |
| --- | --- | --- |
{rows}
"""
        if results
        else ""
    )
    text = f"""# demo-membrane

A small nnU-Net v2 (`3d_fullres`) model that segments **membranes** (label 1) in cryo-ET
tomograms at 10 Å/voxel, trained only on synthetic tomograms: domain-randomised ones from
`cryomamba.synth_random` (membranes as bilayers or single dark bands 3–8 nm thick, contrast
0.5–3 noise sigmas, vesicles of 8–120 nm radius, flat and strongly bent sheets, stacked and
touching membranes, membranes cut by the volume edge; particles, filaments, tubes, carbon
edges, intensity ramps and gold beads as background; white, low-pass or CTF-shaped noise with
a missing wedge of random tilt range ±40–70°; drawn at 7–14 Å and presented at 10 Å) and
some from the older `cryomamba.synth`. It is the CryoMamba demo model: small enough to run
on a laptop CPU. It has never seen a real tomogram; see docs/demo-model.md for where it
holds up and where it fails, and bring a real nnU-Net model for real work.

Files: `dataset.json`, `plans.json`, `fold_0/checkpoint_final.pth` — an ordinary nnU-Net v2
trained-model folder; `nnUNetPredictor.initialize_from_trained_model_folder(folder,
use_folds=(0,))` loads it. `trainer_name` is plain `nnUNetTrainer`, which only tells nnU-Net to
build the network from the plans. `file_ending` is `.nii.gz` and `image_reader_writer`
`SimpleITKIO` because nnU-Net has no MRC reader: CryoMamba reads MRC itself and hands nnU-Net
arrays (ZYX, spacing in Å).

## Network

`PlainConvUNet`, {len(features)} stages, features {features}, 3×3×3 convolutions, 2 per stage,
InstanceNorm + LeakyReLU, patch {PATCH}, {n_params:,} parameters. Spacing {SPACING} Å
(nnU-Net resamples other spacings to this), ZScoreNormalization over the whole volume.
Mirroring (test-time augmentation) allowed on axes {list(MIRROR_AXES)}.

## How it was made

```
{cmd}
```

{init_text}Seed {rec["seed"]} (torch.manual_seed and the numpy Generator that draws the
old-generator SNRs and the patches; randomised volume *i* is `synth_random.randomized(
{TRAIN_SHAPE}, seed=i)`). Torch {rec["torch"]}, CPU, {rec["threads"]} threads,
`torch.use_deterministic_algorithms(True)`: the same seed and thread count give the same
weights; another thread count, CPU or torch version may change the last bits of the float
sums and so the weights.
{layout_text}

A small torch loop, not nnU-Net's trainer: a pool of {rec["n_train"]} randomised volumes,
{n_classic} old-generator volumes (SNR 0.4–2.5, wedge 20–40°) and {n_noise} pure-noise volumes
(`synth_random.NO_CONTENT`: the optics drawn as for the others, nothing in them, all
background) of {TRAIN_SHAPE} voxels, each z-scored as nnU-Net's ZScoreNormalization does at
inference; every {rec["refresh_every"]} iterations a new randomised volume replaces the oldest
one ({n_random} randomised volumes in all, seeds 0..{n_random - 1}), and every
{noise_refresh or "∞"} iterations a new pure-noise volume replaces the oldest pure-noise one
({n_noise_all} in all, seeds {NOISE_SEED}..{NOISE_SEED + n_noise_all - 1}).
{lowpass_text}Random {rec.get("train_patch", PATCH[0])}³ patches (the
network is fully convolutional; inference uses {PATCH[0]}³), batch {rec["batch_size"]}, one
patch in three centred on membrane, random flips on every axis (they keep the wedge where
it is); loss cross-entropy + batch soft Dice; AdamW lr {rec["lr"]:g}, poly decay over
{rec["iterations"]} iterations. {stopped}Training took {train_wall:.0f} s wall
({train_cpu:.0f} s CPU over all threads) on a 2-core machine; docs/demo-model.md
says what else ran on it. No optimizer state is saved.
{held_out}
## A bigger one, on a GPU

The data are generated on the fly, so a larger model needs no dataset on disk:
`python scripts/train_demo_model.py --out DIR --iterations 20000 --batch-size 8
--n-train 256 --refresh-every 1 --features 32 64 128 256 320`, with `PATCH` (e.g. 128³)
raised at the top of the script and the loop moved to CUDA
(`net.cuda()`, the batch `.cuda()`). Or write volumes with `synth_random.randomized` as
NIfTI into an nnU-Net raw dataset and run nnU-Net's own planning and training.
"""
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="model folder to write")
    p.add_argument("--seed", type=int, default=0, help="seed for torch and patch sampling")
    p.add_argument("--iterations", type=int, default=2600)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument(
        "--n-train", type=int, default=48, help="randomised volumes in the pool (seeds 0..N-1)"
    )
    p.add_argument(
        "--classic-fraction",
        type=float,
        default=0.33,
        help="old-generator (cryomamba.synth) volumes added, as a fraction of --n-train",
    )
    p.add_argument(
        "--noise-fraction",
        type=float,
        default=0.3,
        help="pure-noise volumes (random optics, no content) added, as a fraction of --n-train",
    )
    p.add_argument(
        "--refresh-every",
        type=int,
        default=4,
        help="replace one randomised pool volume with a new seed every N iterations (0: never)",
    )
    p.add_argument(
        "--noise-refresh-every",
        type=int,
        default=16,
        help="replace one pure-noise pool volume with a new seed every N iterations (0: never)",
    )
    p.add_argument(
        "--lowpass-fraction",
        type=float,
        default=0.4,
        help=f"randomised and pure-noise volumes whose noise is forced to a low-pass of "
        f"{LOWPASS_RANGE_A[0]:g}-{LOWPASS_RANGE_A[1]:g} Å",
    )
    p.add_argument(
        "--features",
        type=int,
        nargs="+",
        default=FEATURES,
        help=f"features per stage, one stage per number, each halving the {PATCH[0]}^3 patch "
        f"(2 to 6 stages; default {' '.join(map(str, FEATURES))}, the shipped model's)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="train in the channels-last 3D layout: ~0.77x the time per step on a CPU, other "
        "weights than the default layout (the shipped model was trained without it)",
    )
    p.add_argument(
        "--init", type=Path, default=None, help="model folder whose weights to start from"
    )
    p.add_argument(
        "--finetune-iterations",
        type=int,
        default=0,
        help="then train N more iterations from the weights just made: the same pool and "
        "seeds, a fresh AdamW and poly decay from --finetune-lr (the same as a second run "
        "with --init OUT --iterations N --lr LR)",
    )
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument(
        "--train-patch",
        type=int,
        default=PATCH[0],
        help="training patch edge (the plans keep 64; a smaller one trains faster)",
    )
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument(
        "--save-every", type=int, default=0, help="also write the folder every N iterations"
    )
    p.add_argument(
        "--eval-snr", type=float, nargs="*", default=[1.0, 0.5, 0.25, 2.0], help="held-out SNRs"
    )
    p.add_argument("--eval-only", action="store_true", help="evaluate an existing model folder")
    args = p.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # the README names the command
    if args.iterations < 1 or args.finetune_iterations < 0:
        p.error("--iterations must be at least 1 and --finetune-iterations at least 0")
    if not (args.lr > 0 and args.finetune_lr > 0):
        p.error(f"--lr and --finetune-lr must be above 0, got {args.lr:g} and {args.finetune_lr:g}")
    if not 2 <= len(args.features) <= 6 or min(args.features) < 1:
        p.error(f"--features takes 2 to 6 positive numbers, got {args.features}")
    if args.init is not None:  # a model folder whose weights fit the network
        if not (args.init / "plans.json").is_file():
            p.error(f"--init {args.init} is not a model folder: it holds no plans.json")
        plans = json.loads((args.init / "plans.json").read_text())
        arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
        if (theirs := arch["features_per_stage"]) != list(args.features):
            p.error(
                f"--init {args.init} has features {theirs}, this run {list(args.features)}: "
                f"pass --features {' '.join(map(str, theirs))}"
            )
    n_classic = round(args.n_train * args.classic_fraction)
    n_random = args.n_train + (args.iterations // args.refresh_every if args.refresh_every else 0)
    n_noise = round(args.n_train * args.noise_fraction) + (
        args.iterations // args.noise_refresh_every if args.noise_refresh_every else 0
    )
    if (
        n_classic > min(VAL_SEEDS)
        or n_random > NOISE_SEED
        or NOISE_SEED + n_noise > min(RANDOM_VAL_SEEDS)
    ):
        p.error("too many training volumes: they would reach the held-out seeds")
    reuse_freed_memory()  # as the engine does: big activations reused, not mmap'd each step
    torch.set_num_threads(args.threads)
    # Read when nnunetv2 is imported (lazily, below).
    os.environ["nnUNet_def_n_proc"] = str(args.threads)  # noqa: SIM112
    t0 = time.perf_counter()
    summary = {} if args.eval_only else train(args, args.out)
    if args.finetune_iterations > 0 and not args.eval_only:
        # A second, short annealing cycle. Run as a second call of train() with the first
        # call's folder as --init, so that the one command and the two give the same weights.
        second = {"init": args.out, "iterations": args.finetune_iterations}
        phase2 = argparse.Namespace(**{**vars(args), **second, "lr": args.finetune_lr})
        summary = {"first": summary, "finetune": train(phase2, args.out)}
    t_eval = time.perf_counter()
    results = evaluate(args.out, args.eval_snr) if args.eval_snr else {}
    summary["eval_s"] = round(time.perf_counter() - t_eval, 1)
    summary["total_s"] = round(time.perf_counter() - t0, 1)
    summary["cpu_s"] = round(time.process_time(), 1)  # all threads, including imports
    summary["dice"] = {str(k): round(float(np.mean(r["dice"])), 4) for k, r in results.items()}
    print(json.dumps(summary, indent=2))
    write_readme(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
