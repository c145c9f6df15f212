"""The `tinyi2v` command. Heavy modules are imported inside the commands so `--help` is instant
(and never imports numba)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import numpy as np

from . import __version__
from .errors import TinyI2VError

DEMO_MODEL = "tinyi2v-demo"


class Commands(click.Group):
    """User errors become one line on stderr ("Error: ...") and exit code 1, Ctrl-C exit code
    130, never a traceback: here, so click's test runner sees exactly what a shell sees."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TinyI2VError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("\ntinyi2v: interrupted", err=True)
            raise click.exceptions.Exit(130) from None


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tinyi2v")  # not from metadata: may run uninstalled
def cli() -> None:
    """tinyi2v: one photo in, a short video out, with MobileI2V in numpy."""


def default_model() -> Path:
    """The bundled demo model: $TINYI2V_MODEL, ./weights/tinyi2v-demo, or beside the package."""
    candidates = [os.environ.get("TINYI2V_MODEL"), Path.cwd() / "weights" / DEMO_MODEL,
                  Path(__file__).resolve().parents[1] / "weights" / DEMO_MODEL]
    for candidate in candidates:
        if candidate and (Path(candidate) / "model_index.json").is_file():
            return Path(candidate)
    raise TinyI2VError(f"no model given and the bundled '{DEMO_MODEL}' was not found "
                       "(run from the tinyi2v folder, or pass --model, or set TINYI2V_MODEL)")


class ProgressBar:
    """One stderr line per stage: 'denoise  3/30  1.21 s/it', rewritten in place on a terminal.

    Also makes Ctrl-C stick: numba compiles through llvmlite's ctypes callbacks, which swallow a
    KeyboardInterrupt raised inside them, so a Ctrl-C during the first run's compilation would
    be lost (and Python prints it as "Exception ignored ... Traceback"). `interrupt` (the SIGINT
    handler while it is installed) also sets a flag that the next progress report raises
    again, and `unraisable` keeps such swallowed interrupts off the screen. A swallowed
    interrupt can also leave numba's half-built function behind, which then fails with its own
    error (RuntimeError "no compiled object yet"), and llvmlite objects whose constructor it cut
    short, whose destructors raise when collected, even at exit: after a Ctrl-C, any error is
    the interrupt, and no destructor's error is shown."""

    def __init__(self, quiet: bool):
        self.quiet, self.tty = quiet, sys.stderr.isatty()
        self.stage_times: dict[str, float] = {}
        self.interrupted = False

    def interrupt(self, signum: int, frame) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def unraisable(self, info) -> None:
        if not (self.interrupted or issubclass(info.exc_type, KeyboardInterrupt)):
            sys.__unraisablehook__(info)

    @contextlib.contextmanager
    def catching_interrupts(self) -> Iterator[None]:
        """`interrupt` and `unraisable` installed for the duration (no signal handler where
        there is no main thread: Pyodide, a thread of an app)."""
        try:
            previous = signal.signal(signal.SIGINT, self.interrupt)
        except (ValueError, AttributeError, OSError):
            previous = None
        hook, sys.unraisablehook = sys.unraisablehook, self.unraisable
        try:
            yield
        except Exception:
            if self.interrupted:
                raise KeyboardInterrupt from None
            raise
        finally:
            if not self.interrupted:                         # else: the process is ending
                sys.unraisablehook = hook
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def __call__(self, stage: str, step: int, total: int, elapsed: float) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.stage_times[stage] = elapsed
        if self.quiet or (not self.tty and step < total):
            return
        rate = f"{elapsed / step:.2f} s/it" if step else ""
        back = "\r" if self.tty else ""                      # rewrite the line in place
        click.echo(f"{back}{stage:<8} {step:>3}/{total:<3} {rate}", err=True, nl=step >= total)


def run_options(command):
    """The options `animate` and `bench` share: which model, what to make, which kernels."""
    options = [
        click.option("--model", type=click.Path(file_okay=False),
                     help="Model folder (default: bundled)."),
        click.option("--frames", type=int,
                     help="Number of frames (8k+1 with LTX's VAE, 4k+1 with the demo model's; "
                          "others are rounded)."),
        click.option("--height", type=int,
                     help="Output height in pixels (rounded to the VAE's factor)."),
        click.option("--width", type=int, help="Output width in pixels."),
        click.option("--steps", type=int,
                     help="Denoising steps (default: the model's own schedule)."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--motion", type=float,
                     help="Amount of motion (flow score; default: the model's)."),
        click.option("--backend", type=click.Choice(["auto", "numpy", "numba"]), default=None,
                     help="Kernel backend (default: $TINYI2V_BACKEND or auto)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output: .mp4, .webp, .gif, or a folder name for PNG frames.")
@run_options
@click.option("--size", type=int, help="Short side in pixels, aspect ratio kept.")
@click.option("--fps", type=float, help="Frames per second of the output.")
@click.option("--fit", type=click.Choice(["crop", "pad"]), default="crop", show_default=True,
              help="Keep the photo's aspect ratio by centre-cropping or by padding.")
@click.option("--force", is_flag=True, help="Run even if the memory estimate exceeds free RAM.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
def animate(image, output, model, frames, height, width, size, steps, seed, motion, fps, fit,
            backend, force, quiet) -> None:
    """Turn IMAGE into a short video written to OUTPUT."""
    import time

    from . import ops
    from .io.image import load_image
    from .io.video import check_output, write_video
    from .pipeline import Pipeline, available_memory

    start = time.perf_counter()
    if size is not None and (height or width):
        raise TinyI2VError("give --size or --height/--width, not both")
    check_output(output)
    photo = load_image(image)
    pipe = Pipeline.load(model or default_model())
    backend = ops.set_backend(backend)
    if size is not None:                                     # the short side
        portrait = photo.shape[0] > photo.shape[1]
        width, height = (size, None) if portrait else (None, size)
    plan = pipe.plan(photo.shape[:2], frames, height, width, steps, motion, fit)
    say = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    for note in plan.notes:
        say(f"note: {note}")
    free = available_memory()
    say(f"tinyi2v: {plan.width}x{plan.height}, {plan.frames} frames, {plan.steps} steps, "
        f"motion {plan.motion:g}, seed {seed}, backend {backend}, "
        f"estimated peak memory {plan.peak_bytes / 2**30:.2f} GiB"
        + (f" of {free / 2**30:.1f} GiB free" if free else ""))
    if free and plan.peak_bytes > free and not force:
        raise TinyI2VError(f"this needs about {plan.peak_bytes / 2**30:.1f} GiB but only "
                           f"{free / 2**30:.1f} GiB is free; choose a smaller size or fewer "
                           "frames, or pass --force")
    bar = ProgressBar(quiet)
    with bar.catching_interrupts():
        clip = pipe(photo, seed=seed, fit=fit, progress=bar, plan=plan)
    write_start = time.perf_counter()
    fps = fps or pipe.defaults["fps"]
    write_video(output, clip, fps, {"model": str(pipe.path), "seed": str(seed),
                                    "motion": f"{plan.motion:g}", "steps": str(plan.steps),
                                    "frames": str(plan.frames), "software": "tinyi2v"})
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in bar.stage_times.items())
    say(f"wrote {output} in {time.perf_counter() - start:.1f} s "
        f"({stages}, write {time.perf_counter() - write_start:.1f} s)")


@cli.command()
@click.argument("image", type=click.Path(dir_okay=False), required=False)
@click.option("-o", "--output", type=click.Path(), help="Keep the clip here (default: a temp file).")
@run_options
def bench(image, output, model, frames, height, width, steps, motion, seed, backend) -> None:
    """Run one animate of IMAGE (default: a generated pattern) and print a table per stage:
    seconds, GFLOP/s, peak memory."""
    import platform
    import time

    from . import bench as measure
    from . import ops
    from .io.image import load_image
    from .io.video import check_output
    from .pipeline import Pipeline

    if output:
        check_output(output)
    start = time.perf_counter()
    pipe = Pipeline.load(model or default_model())
    backend = ops.set_backend(backend)
    load_seconds = time.perf_counter() - start
    photo = load_image(image) if image else measure.test_photo(
        height or pipe.defaults["height"], width or pipe.defaults["width"])
    rows, plan = measure.run(pipe, photo, output, frames, height, width, steps, motion, seed,
                             load_seconds)
    click.echo(f"tinyi2v bench: {pipe.path}, {plan.width}x{plan.height}, {plan.frames} frames, "
               f"{plan.steps} steps, latent {list(plan.latent_shape)}; backend {backend}; "
               f"{platform.machine()}, {measure.threads()}")
    for line in measure.table(rows):
        click.echo(line)


@cli.command()
@click.argument("model", type=click.Path(exists=True, file_okay=False))
@click.option("--tensors", is_flag=True, help="List every tensor with its shape and dtype.")
def info(model: str, tensors: bool) -> None:
    """Describe a model folder: components, sizes, dtypes, format version, schedule."""
    from .sampler import schedule_from_config
    from .weights import Component, read_json

    root = Path(model)
    index = read_json(root / "model_index.json")
    click.echo(f"model {root}  (format version {index.get('_tinyi2v_format_version', '?')})")
    for name in [k for k in index if not k.startswith("_") and isinstance(index[k], list)]:
        if name == "scheduler":
            continue
        comp = Component(root / name)
        shapes = comp.shapes()
        params = sum(int(np.prod(s)) for s in shapes.values())
        config = {k: v for k, v in comp.config.items() if not k.startswith("_")}
        click.echo(f"{name:<12} {comp.config.get('_class_name', '?')}: {params / 1e6:.2f} M "
                   f"parameters in {len(shapes)} tensors, stored as "
                   f"{'/'.join(sorted(comp.storage_dtypes()))}, format version "
                   f"{comp.config.get('_tinyi2v_format_version', '-')}")
        click.echo("             " + ", ".join(f"{k}={v}" for k, v in config.items()))
        if tensors:
            for key, shape in shapes.items():
                click.echo(f"             {key:<60} {comp.file.dtype_of(key):<5} {list(shape)}")
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    sigmas = schedule_from_config(scheduler)
    click.echo(f"{'scheduler':<12} flow-matching Euler, {len(sigmas) - 1} steps: sigmas "
               + " ".join(f"{s:.4g}" for s in sigmas))
    if isinstance(index.get("defaults"), dict):
        click.echo(f"{'defaults':<12} " + ", ".join(f"{k}={v}" for k, v in index["defaults"].items()))


@cli.command()
@click.option("--from", "source", type=click.Choice(["mobilei2v", "turbo-vaed", "folder"]),
              required=True, help="Upstream format of CHECKPOINT; 'folder': re-save a component "
              "folder (config.json + .safetensors) in --dtype.")
@click.option("--dtype", type=click.Choice(["float16", "float32", "bfloat16"]), default="float16",
              show_default=True, help="Storage type of the written weights.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="turbo-vaed: JSON object overriding config fields.")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
def convert(source: str, dtype: str, config_path: str | None, checkpoint: str,
            out_dir: str) -> None:
    """Convert an upstream CHECKPOINT into a tinyi2v component folder OUT_DIR (read without torch,
    never executing code from the file)."""
    from .convert import convert_folder, convert_mobilei2v, convert_turbo_vaed

    def log(message: str) -> None:
        click.echo(message, err=True)

    if config_path is not None and source != "turbo-vaed":
        raise click.UsageError("--config applies to --from turbo-vaed only")
    if source == "turbo-vaed":
        convert_turbo_vaed(checkpoint, out_dir, dtype=dtype, config_path=config_path, log=log)
    elif source == "folder":
        convert_folder(checkpoint, out_dir, dtype=dtype, log=log)
    else:
        convert_mobilei2v(checkpoint, out_dir, dtype=dtype, log=log)


def main() -> None:
    """Console entry point (`tinyi2v`, `python -m tinyi2v`)."""
    cli()
