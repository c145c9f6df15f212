"""Photo -> clip: the whole MobileI2V pipeline as numbered steps.

    pipe = Pipeline.load("weights/tinyi2v-demo")
    frames = pipe(image, frames=17, seed=0, motion=2.0)     # [T, H, W, 3] uint8

1. plan: fit the request to sizes the model can take (height/width multiples of the VAE's
   spatial factor, frames 8k+1), keeping the photo's aspect ratio
2. fit the photo (centre-crop or pad) and encode it: the guide latent (posterior mean)
3. sample: flow-matching Euler from seeded noise, the guide written into latent frame 0
4. decode the latents to frames

Progress is reported through `progress(stage, step, total, elapsed)`; this module prints nothing.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .denoiser import load_denoiser
from .errors import FormatError, TinyI2VError
from .io.image import fit_image, load_image
from .rng import gaussian_noise
from .sampler import Progress, sample, schedule_from_config
from .vae import load_vae
from .weights import check_config, read_json

DEFAULTS = {"height": 256, "width": 384, "frames": 17, "fps": 12, "motion": 2.0}
# The types of the scheduler_config.json keys that sampler.schedule_from_config reads.
SCHEDULER = {"shift": 3.0, "num_inference_steps": 30, "num_train_timesteps": 1000, "sigmas": [1.0]}


@dataclass
class Plan:
    """What a call will do, decided before any heavy work (the CLI prints it)."""
    height: int
    width: int
    frames: int
    sigmas: np.ndarray
    motion: float
    latent_shape: tuple[int, int, int, int, int]
    peak_bytes: int
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1


class Pipeline:
    """A loaded model folder: denoiser, VAE (encoder; decoder unless a separate one is given)."""

    def __init__(self, denoiser, vae, decoder, scheduler: dict, defaults: dict, path: Path):
        self.denoiser, self.vae, self.decoder = denoiser, vae, decoder
        self.scheduler, self.defaults, self.path = scheduler, defaults, path

    @classmethod
    def load(cls, model_dir: str | os.PathLike) -> "Pipeline":
        path = Path(model_dir)
        index = read_json(path / "model_index.json")
        for name in ("transformer", "vae", "scheduler"):
            if name not in index:
                raise FormatError(f"{path}: model_index.json lists no '{name}' component")
        defaults = index.get("defaults", {})
        # fps may be fractional (train.export writes it as a float)
        check_config(defaults, {**DEFAULTS, "fps": 12.0}, f"{path / 'model_index.json'} defaults")
        scheduler = read_json(path / "scheduler" / "scheduler_config.json")
        check_config(scheduler, SCHEDULER, str(path / "scheduler"))
        vae = load_vae(path / "vae")
        decoder = load_vae(path / "decoder") if "decoder" in index else vae
        denoiser = load_denoiser(path / "transformer")
        for name, codec in (("vae", vae), ("decoder", decoder)):
            if codec.latent_channels != denoiser.config["in_channels"]:
                raise FormatError(f"{path}: the transformer takes {denoiser.config['in_channels']} "
                                  f"latent channels but {name}/ has {codec.latent_channels}")
        return cls(denoiser, vae, decoder, scheduler, {**DEFAULTS, **defaults}, path)

    # ------------------------------------------------------------------ step 1: plan
    def plan(self, image_size: tuple[int, int], frames: int | None = None,
             height: int | None = None, width: int | None = None, steps: int | None = None,
             motion: float | None = None, fit: str = "crop") -> Plan:
        """Choose the output size and schedule; every adjustment is explained in `notes`."""
        notes = []
        factor, tf = self.vae.spatial_compression, self.vae.temporal_compression
        h0, w0 = image_size
        for name, value in (("height", height), ("width", width)):
            if value is not None and value < factor:
                raise TinyI2VError(f"{name} must be at least {factor}, got {value}")
        if height is None and width is None:
            area = self.defaults["height"] * self.defaults["width"]
            H, W = self._round(math.sqrt(area * h0 / w0)), self._round(math.sqrt(area * w0 / h0))
            notes.append(f"size {W}x{H}: the model's default area in the photo's aspect ratio")
        else:
            H = self._round(height if height is not None else width * h0 / w0)
            W = self._round(width if width is not None else height * w0 / h0)
            if (height not in (None, H)) or (width not in (None, W)):
                notes.append(f"size rounded to {W}x{H} (multiples of {factor})")
        if abs(H / W - h0 / w0) > 0.01 * h0 / w0:
            how = "centre-cropped" if fit == "crop" else "padded"
            notes.append(f"photo {w0}x{h0} {how} to {W}x{H}")
        frames = self.defaults["frames"] if frames is None else frames
        if frames < 1:
            raise TinyI2VError(f"frames must be at least 1, got {frames}")
        T = tf * round((frames - 1) / tf) + 1
        if T != frames:
            notes.append(f"frames rounded to {T} (must be {tf}k+1)")
        if steps is not None and steps < 1:
            raise TinyI2VError(f"steps must be at least 1, got {steps}")
        sigmas = schedule_from_config(self.scheduler, steps)
        motion = float(self.defaults["motion"] if motion is None else motion)
        latent = (1, self.denoiser.config["in_channels"], (T - 1) // tf + 1, H // factor, W // factor)
        return Plan(H, W, T, sigmas, motion, latent, self.estimate_peak_bytes(H, W, latent), notes)

    def estimate_peak_bytes(self, H: int, W: int, latent: tuple[int, ...]) -> int:
        """A deliberately rough upper estimate of peak RSS: the largest stage (its weights' file
        size, an upper bound since FP16 weights are read one tensor at a time, plus its float32
        working set) plus the interpreter. Checked against docs/performance.md's measurements."""
        cfg = self.denoiser.config
        N, D, F = int(np.prod(latent[2:])), cfg["hidden_size"], cfg["mlp_hidden_size"]
        heads = D // cfg["head_dim"]
        denoise = self._weight_bytes("transformer") + 4 * N * (12 * D + 5 * F) \
            + 4 * heads * min(1024, N) * N
        pixels = H * W / 16                                   # VAE activations at 1/4 scale
        decoder = "decoder" if (self.path / "decoder").is_dir() else "vae"
        config = read_json(self.path / decoder / "config.json")
        top = config.get("decoder_block_out_channels", config.get("block_out_channels", [128]))[0]
        codec = max(self._weight_bytes("vae") + 4 * pixels * top * 8,
                    self._weight_bytes(decoder) + 4 * pixels * top * 32)
        return int(max(denoise, codec) + 200 * 2**20)

    def _weight_bytes(self, component: str) -> int:
        return sum(f.stat().st_size for f in (self.path / component).glob("*.safetensors"))

    def _round(self, size: float) -> int:
        factor = self.vae.spatial_compression
        return max(factor, round(size / factor) * factor)

    # ------------------------------------------------------------------ the call
    def __call__(self, image: np.ndarray | str | os.PathLike, frames: int | None = None,
                 height: int | None = None, width: int | None = None, steps: int | None = None,
                 seed: int = 0, motion: float | None = None, fit: str = "crop",
                 progress: Progress | None = None, plan: Plan | None = None) -> np.ndarray:
        """Animate `image` (a path or [H, W, 3] uint8 RGB) -> frames [T, H, W, 3] uint8."""
        report = progress or (lambda *a: None)
        if not isinstance(image, np.ndarray):
            image = load_image(image)
        # 1. plan the sizes and the schedule
        plan = plan or self.plan(image.shape[:2], frames, height, width, steps, motion, fit)
        # 2. fit the photo and encode it as a one-frame video in [-1, 1]
        start = time.perf_counter()
        photo = fit_image(image, plan.height, plan.width, fit)
        guide, _ = self.vae.encode(photo_video(photo))                     # [1, C, 1, h, w] posterior mean
        report("encode", 1, 1, time.perf_counter() - start)
        # 3. sample the latent clip from seeded noise
        noise = gaussian_noise(seed, plan.latent_shape)
        latent = sample(self.denoiser, noise, guide, plan.sigmas, plan.motion, progress)
        # 4. decode to frames
        clip = self.decoder.decode(latent, progress=progress)[0]   # [3, T, H', W'] in ~[-1, 1]
        clip = clip[:, : plan.frames, : plan.height, : plan.width]
        return to_uint8(clip.transpose(1, 2, 3, 0))


def available_memory() -> int | None:
    """Bytes of RAM available to a new process (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def photo_video(photo: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 -> a one-frame video [1, 3, 1, H, W] in [-1, 1] (the VAE's input)."""
    return (photo.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None, :, None]


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] float -> uint8 with rounding, as the official script saves frames."""
    return np.floor(np.clip(video, -1.0, 1.0) * 127.5 + 128.0).astype(np.uint8)

