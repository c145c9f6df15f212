"""Measure a trained model on the held-out photos and write docs/quality.md (+ a contact sheet).

    python -m train.quality --cache /work/data-cache --student weights/tinyi2v-demo \
        --teacher weights/tinyi2v-teacher --out docs

Everything runs through the numpy runtime (`tinyi2v.Pipeline`), i.e. what a user gets. Metrics
(issue #5), at the student's default size and frame count (the demo model: 256x384, 17):
- VAE reconstruction PSNR: held-out clips rendered as in training (`train.data.make_clip`),
  encoded (posterior mean) and decoded; and each held-out photo as a one-frame video.
- first-frame PSNR: generated frame 0 against the input photo as the pipeline fitted it.
- warp-consistency PSNR: each generated frame t >= 1 against the guide warped by the
  similarity transform (scale, rotation, translation) that best fits that frame (`fit_similarity`,
  Gauss-Newton on grey levels, coarse to fine, tracked from frame to frame), over the pixels the
  warp covers. The guide is the model's own frame 0 (the photo as its VAE renders it), so the
  number measures temporal consistency rather than the VAE's sharpness, which the first-frame
  PSNR already shows; the same warps applied to the input photo give the "vs photo" column,
  bounded by the VAE. High when a frame is the guide seen by a moved camera; blur, smear and
  invented content lower it. It sees camera motion only: an object moving by itself counts
  as an error.
- motion control: Spearman rank correlation between the requested flow score (`--motion`) and
  the measured one: the mean optical-flow magnitude implied by the fitted transforms of
  consecutive frames, in pixels per frame at 1280x720 (as the training clips' scores).
- denoising time per clip (the sampler stage alone, from the pipeline's progress callback).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import tinyi2v
from tinyi2v.io.image import fit_image
from tinyi2v.ops import backend
from tinyi2v.pipeline import photo_video, to_uint8
from train.data import bilinear, load_photo, make_clip, read_manifest, reference_scale

MOTIONS = (0.5, 1.0, 2.0, 3.0, 4.0, 8.0)  # requested flow scores (training: median ~2, 95% < ~10)
SHEET_COLUMNS = 5                      # frames per clip on the contact sheet, evenly spaced


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB of two uint8-range arrays [..., 3] (over the pixels where mask [...] is set)."""
    d = (a.astype(np.float64) - b.astype(np.float64)) ** 2
    mse = float(d[mask].mean() if mask is not None else d.mean())
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


def similarity_map(theta: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Where output pixel q of a frame [H, W] samples the source: p = c + M (q - c) + t with
    M = [[a, b], [-b, a]] in (y, x), theta = (a, b, ty, tx) -> (py, px) [H, W] each."""
    a, b, ty, tx = theta
    H, W = size
    gy = np.arange(H, dtype=np.float64)[:, None] - (H - 1) / 2     # [H, 1] q - c
    gx = np.arange(W, dtype=np.float64)[None, :] - (W - 1) / 2     # [1, W]
    return (H - 1) / 2 + a * gy + b * gx + ty, (W - 1) / 2 - b * gy + a * gx + tx


def _downsample(image: np.ndarray) -> np.ndarray:
    """[H, W] -> [H/2, W/2] by 2x2 means (the centre of a level-L pixel is 2^L times its
    offset from the image centre, so a similarity's translation scales by 2 per level)."""
    H, W = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
    return image[:H, :W].reshape(H // 2, 2, W // 2, 2).mean((1, 3))


def fit_similarity(source: np.ndarray, target: np.ndarray, init: np.ndarray | None = None,
                   levels: int = 3, iterations: int = 8) -> np.ndarray:
    """The similarity theta (see `similarity_map`) with source(p(q)) ~ target(q) for grey images
    [H, W] of one size, by Gauss-Newton on the squared grey-level difference over the pixels
    whose p lies inside the source, from level `levels - 1` of a 2x pyramid to full size."""
    theta = np.array([1.0, 0.0, 0.0, 0.0]) if init is None else np.asarray(init, np.float64)
    pyramid = [(source.astype(np.float64), target.astype(np.float64))]
    for _ in range(levels - 1):
        pyramid.append(tuple(_downsample(x) for x in pyramid[-1]))
    theta = theta * [1, 1, 0.5 ** (levels - 1), 0.5 ** (levels - 1)]
    for level in reversed(range(levels)):
        src, dst = pyramid[level]
        H, W = src.shape
        gy, gx = np.gradient(src)                                   # [H, W] each
        planes = np.stack([src, gy, gx], -1)                        # [H, W, 3]
        qy = np.arange(H, dtype=np.float64)[:, None] - (H - 1) / 2 + np.zeros((1, W))
        qx = np.arange(W, dtype=np.float64)[None, :] - (W - 1) / 2 + np.zeros((H, 1))
        for _ in range(iterations):
            py, px = similarity_map(theta, (H, W))
            inside = ((py >= 0) & (py <= H - 1) & (px >= 0) & (px <= W - 1)).ravel()
            if inside.sum() < 16:
                break                                               # no overlap left: give up
            s, sy, sx = bilinear(planes, py.ravel()[inside], px.ravel()[inside]).T   # [n] each
            y, x = qy.ravel()[inside], qx.ravel()[inside]
            J = np.stack([sy * y + sx * x, sy * x - sx * y, sy, sx], 1)          # [n, 4]
            r = s - dst.ravel()[inside]                                          # [n]
            step = np.linalg.lstsq(J, -r, rcond=None)[0]
            theta = theta + step
            if np.abs(step[:2]).max() < 1e-5 and np.abs(step[2:]).max() < 1e-3:
                break
        if level:
            theta = theta * [1, 1, 2, 2]
    return theta


def grey(frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> float [H, W] luma."""
    return frame.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def warp(image: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """image [H, W, 3] seen through `theta` -> (warped [H, W, 3] float, inside [H, W] bool)."""
    H, W = image.shape[:2]
    py, px = similarity_map(theta, (H, W))
    inside = (py >= 0) & (py <= H - 1) & (px >= 0) & (px <= W - 1)
    out = bilinear(image.astype(np.float32), py.ravel(), px.ravel()).reshape(H, W, 3)
    return out, inside


def flow_between(theta0: np.ndarray, theta1: np.ndarray, size: tuple[int, int]) -> float:
    """Mean optical-flow magnitude (pixels) from a frame with transform theta0 to the next with
    theta1: pixel q shows source point p0(q), which the next frame shows at q' = p1^-1(p0(q))."""
    H, W = size
    py, px = similarity_map(theta0, size)
    a, b, ty, tx = theta1
    dy, dx = py - (H - 1) / 2 - ty, px - (W - 1) / 2 - tx           # M1 g' = p0 - c - t1
    det = a * a + b * b
    gy, gx = (a * dy - b * dx) / det, (b * dy + a * dx) / det       # g' = M1^-1 (...)
    qy = np.arange(H)[:, None] - (H - 1) / 2
    qx = np.arange(W)[None, :] - (W - 1) / 2
    return float(np.hypot(gy - qy, gx - qx).mean())


def clip_metrics(photo: np.ndarray, frames: np.ndarray) -> dict[str, float]:
    """First-frame PSNR, warp-consistency PSNR against frame 0 and against the photo (means
    over frames 1..T-1) and the measured flow score (reference pixels per frame) of generated
    frames [T, H, W, 3] from the input photo [H, W, 3]."""
    size = photo.shape[:2]
    source = grey(frames[0])
    thetas, scores, photo_scores = [np.array([1.0, 0, 0, 0])], [], []
    for frame in frames[1:]:
        thetas.append(fit_similarity(source, grey(frame), init=thetas[-1]))   # tracked
        for reference, out in ((frames[0], scores), (photo, photo_scores)):
            warped, inside = warp(reference, thetas[-1])
            out.append(psnr(frame, warped, inside))
    flows = [flow_between(t0, t1, size) for t0, t1 in itertools.pairwise(thetas)]
    return {"first_psnr": psnr(frames[0], photo), "warp_psnr": float(np.mean(scores)),
            "warp_psnr_photo": float(np.mean(photo_scores)),
            "measured_motion": float(np.mean(flows)) * reference_scale(size)}


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v: Sequence[float]) -> np.ndarray:
        v = np.asarray(v, np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):                                  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r
    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


# --------------------------------------------------------------------------------------------
# The measurement
# --------------------------------------------------------------------------------------------

def vae_psnr(pipe: tinyi2v.Pipeline, photos: list[np.ndarray], size: tuple[int, int],
             frames: int, clips_per_photo: int, seed: int) -> dict[str, float]:
    """Reconstruction PSNR of the model's VAE (held-out clips and still photos) and the share
    of the clips' motion it keeps (measured motion of the reconstructions over that of the
    clips: a generated clip cannot move more than its decoder can render)."""
    H, W = size
    clip_scores, still_scores, motion_in, motion_out = [], [], [], []
    for i, photo in enumerate(photos):
        for k in range(clips_per_photo):
            clip, _ = make_clip(photo, np.random.default_rng([seed, i, k]), frames, (H, W))
            video = clip.transpose(3, 0, 1, 2)[None]                       # [1, 3, T, H, W]
            mean, _ = pipe.vae.encode(video)
            recon = to_uint8(pipe.decoder.decode(mean)[0].transpose(1, 2, 3, 0))  # [T, H, W, 3]
            clip = to_uint8(clip)
            clip_scores.append(psnr(recon, clip))
            motion_in.append(clip_metrics(clip[0], clip)["measured_motion"])
            motion_out.append(clip_metrics(recon[0], recon)["measured_motion"])
        still = fit_image(photo, H, W)
        mean, _ = pipe.vae.encode(photo_video(still))
        recon = to_uint8(pipe.decoder.decode(mean)[0, :, 0].transpose(1, 2, 0))
        still_scores.append(psnr(recon, still))
    return {"clip_psnr": float(np.mean(clip_scores)), "still_psnr": float(np.mean(still_scores)),
            "clips": len(clip_scores), "motion_in": float(np.mean(motion_in)),
            "motion_kept": float(np.sum(motion_out) / np.sum(motion_in))}


def animate_all(pipe: tinyi2v.Pipeline, photos: list[np.ndarray], size: tuple[int, int],
                frames: int, seed: int) -> tuple[list[dict], dict[tuple[int, float], np.ndarray]]:
    """Every held-out photo at every requested motion -> (per-clip records, the clips)."""
    H, W = size
    records, clips = [], {}
    for i, photo in enumerate(photos):
        guide = fit_image(photo, H, W)
        for motion in MOTIONS:
            timing: dict[str, float] = {}

            def progress(stage: str, step: int, total: int, elapsed: float,
                         timing: dict[str, float] = timing) -> None:
                timing[stage] = elapsed                     # the last report is the stage's time
            clip = pipe(photo, frames=frames, height=H, width=W, seed=seed + i, motion=motion,
                        progress=progress)
            clips[i, motion] = clip
            records.append({"photo": i, "motion": motion, "denoise_seconds": timing["denoise"],
                            **clip_metrics(guide, clip)})
    return records, clips


def summarise(records: list[dict]) -> dict[str, float]:
    return {"first_psnr": float(np.mean([r["first_psnr"] for r in records])),
            "warp_psnr": float(np.mean([r["warp_psnr"] for r in records])),
            "warp_psnr_photo": float(np.mean([r["warp_psnr_photo"] for r in records])),
            "spearman": spearman([r["motion"] for r in records],
                                 [r["measured_motion"] for r in records]),
            "denoise_seconds": float(np.median([r["denoise_seconds"] for r in records]))}


def sheet_frames(frames: int) -> list[int]:
    return [round(t) for t in np.linspace(0, frames - 1, SHEET_COLUMNS)]


def contact_sheet(rows: list[tuple[str, np.ndarray]], path: Path, scale: float = 0.5) -> None:
    """A PNG grid: one labelled row of SHEET_COLUMNS frames per clip [T, H, W, 3]."""
    T, H, W = rows[0][1].shape[:3]
    H, W = int(H * scale), int(W * scale)
    label = 18
    sheet = Image.new("RGB", (W * SHEET_COLUMNS, (H + label) * len(rows)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (title, frames) in enumerate(rows):
        y = r * (H + label)
        draw.text((4, y + 3), title, fill="black")
        for c, t in enumerate(sheet_frames(T)):
            sheet.paste(Image.fromarray(frames[t]).resize((W, H), Image.Resampling.LANCZOS),
                        (c * W, y + label))
    tmp = path.with_suffix(".tmp.png")
    sheet.save(tmp, optimize=True)
    os.replace(tmp, path)


def per_motion(title: str, key: str, results: dict) -> list[str]:
    """A markdown table of `key` averaged over the photos, per requested motion and model."""
    lines = [title, "", "| requested | " + " | ".join(f"{m:g}" for m in MOTIONS) + " |",
             "|---|" + "---:|" * len(MOTIONS)]
    for name in ("teacher", "student"):
        records = results[name]["records"]
        means = [np.mean([r[key] for r in records if r["motion"] == m]) for m in MOTIONS]
        lines.append(f"| {name} | " + " | ".join(f"{v:.2f}" for v in means) + " |")
    return lines


def report(args: argparse.Namespace, names: list[str], size: tuple[int, int], frames: int,
           vae: dict, results: dict, seconds: float) -> str:
    """docs/quality.md."""
    student, teacher = results["student"], results["teacher"]
    s, t = summarise(student["records"]), summarise(teacher["records"])
    lines = [
        "# Quality of the demo model",
        "",
        "Produced by `train/quality.py` (do not edit by hand):",
        "",
        "```sh",
        f"python -m train.quality --cache DATA --student {args.student} --teacher {args.teacher} "
        f"--out {args.out}",
        "```",
        "",
        f"{datetime.date.today()}, {platform.machine()} with {os.cpu_count()} cores, backend "
        f"`{backend()}`, {seconds / 60:.1f} min. Held-out photos (never trained on, see "
        f"`train/DATA.md`): {', '.join(names)}. Each is animated at {size[1]}x{size[0]}, "
        f"{frames} frames, with the requested flow scores {', '.join(map(str, MOTIONS))} "
        f"(seed = photo index): {len(student['records'])} clips per model. The metrics are "
        "defined in the module docstring of `train/quality.py`; PSNR is over 8-bit RGB.",
        "",
        "## VAE",
        "",
        "| | PSNR (dB) |",
        "|---|---:|",
        f"| held-out clips ({vae['clips']}, rendered as in training), encode + decode | "
        f"{vae['clip_psnr']:.2f} |",
        f"| held-out photos as one-frame videos | {vae['still_psnr']:.2f} |",
        "",
        f"Motion kept by encode + decode: {100 * vae['motion_kept']:.0f}% (measured motion of "
        "the reconstructed clips over that of the clips, summed over the clips, whose mean is "
        f"{vae['motion_in']:.2f} reference px/frame). A generated clip cannot move more than its "
        "decoder renders, so this bounds the motion in the tables below.",
        "",
        "## Teacher and student",
        "",
        "| model | steps | first-frame PSNR (dB) | warp-consistency PSNR (dB) | "
        "vs photo (dB) | motion Spearman | denoising s/clip (median) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, summary, result in (("teacher", t, teacher), ("student", s, student)):
        lines.append(f"| {name} (`{result['path']}`) | {result['steps']} | "
                     f"{summary['first_psnr']:.2f} | {summary['warp_psnr']:.2f} | "
                     f"{summary['warp_psnr_photo']:.2f} | {summary['spearman']:.3f} | "
                     f"{summary['denoise_seconds']:.3f} |")
    ratio = t["denoise_seconds"] / s["denoise_seconds"]
    lines += [
        "",
        "Against the bars of issue #5 (student within 0.5 dB of the teacher on warp-consistency "
        "PSNR, within 0.1 on motion correlation, at least 10x less denoising time):",
        "",
        f"- warp-consistency PSNR: student - teacher = {s['warp_psnr'] - t['warp_psnr']:+.2f} dB "
        f"({'met' if s['warp_psnr'] - t['warp_psnr'] >= -0.5 else 'NOT met'})",
        f"- motion Spearman: student - teacher = {s['spearman'] - t['spearman']:+.3f} "
        f"({'met' if s['spearman'] - t['spearman'] >= -0.1 else 'NOT met'})",
        f"- denoising time: teacher / student = {ratio:.1f}x "
        f"({'met' if ratio >= 10 else 'NOT met'})",
        "",
        *per_motion("Measured motion (mean over the photos, reference pixels per frame) per "
                    "requested flow score:", "measured_motion", results),
        "",
        *per_motion("Warp-consistency PSNR per requested flow score (more motion, more to invent "
                    "at the borders and more to get wrong):", "warp_psnr", results),
    ]
    lines += [
        "",
        f"## Contact sheet\n\n![contact sheet]({args.sheet.name})\n",
        f"Frames {', '.join(map(str, sheet_frames(frames)))} (left to right) of held-out clips, "
        f"half size, at the student's default flow score ({args.sheet_motion:g}: what `tinyi2v "
        "animate` gives); each photo by the teacher and the student with the same seed.",
        "",
        "## Reading these numbers",
        "",
        "- A clip that does not move at all would score a warp-consistency PSNR without bound "
        "(every frame equals frame 0), so it must be read together with the measured motion: "
        "a model can buy consistency by moving less.",
        "- The measured motion is that of the best-fit similarity transforms, in reference "
        "pixels per frame (1280x720), directly comparable with the requested flow score: a "
        "model that obeyed its motion input exactly would show the requested values.",
        "- The similarity fit sees camera motion only; objects moving by themselves (a quarter "
        "of the training clips have one) count against the PSNR and are not in the measured "
        "flow score.",
        "- Denoising times are single clips of the tinyi2v runtime on this machine, which other "
        "work may share: the ratio, measured in the same run, is the number to read.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.quality",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, required=True, help="photo cache (train.data fetch)")
    parser.add_argument("--student", type=Path, required=True, help="the 2-step model folder")
    parser.add_argument("--teacher", type=Path, required=True, help="the teacher model folder")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where quality.md goes")
    parser.add_argument("--vae-clips", type=int, default=2, help="clips per held-out photo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet-photos", type=int, default=6)
    parser.add_argument("--photos", type=int, default=None, help="only the first N held-out")
    args = parser.parse_args(argv)
    args.sheet = args.out / "quality-contact-sheet.png"

    start = time.perf_counter()
    chosen = [p for p in read_manifest(args.cache / "manifest.json") if p.split == "heldout"]
    chosen = chosen[:args.photos]
    photos = [load_photo(args.cache, p) for p in chosen]
    pipes = {name: tinyi2v.Pipeline.load(getattr(args, name)) for name in ("teacher", "student")}
    defaults = pipes["student"].defaults                    # both models at the student's default
    size, frames = (defaults["height"], defaults["width"]), defaults["frames"]
    args.sheet_motion = defaults["motion"]                 # the contact sheet shows what users get
    if args.sheet_motion not in MOTIONS:
        raise SystemExit(f"the student's default motion {args.sheet_motion:g} is not one of the "
                         f"measured {MOTIONS}: add it to MOTIONS")
    results = {}
    for name, pipe in pipes.items():
        records, clips = animate_all(pipe, photos, size, frames, args.seed)
        results[name] = {"path": getattr(args, name), "steps": pipe.plan(size, frames).steps,
                         "records": records, "clips": clips}
        print(f"{name}: {summarise(records)}", flush=True)
    vae = vae_psnr(pipes["student"], photos, size, frames, args.vae_clips, args.seed)
    print(f"vae: {vae}", flush=True)
    rows = []
    for i in range(min(args.sheet_photos, len(photos))):
        for name in ("teacher", "student"):
            motion = args.sheet_motion
            rows.append((f"{chosen[i].name}  {name} ({results[name]['steps']} steps)  motion "
                         f"{motion:g}", results[name]["clips"][i, motion]))
    args.out.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows, args.sheet)
    text = report(args, [p.name for p in chosen], size, frames, vae, results, time.perf_counter() - start)
    tmp = args.out / "quality.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.out / "quality.md")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
