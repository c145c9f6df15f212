"""The `tinyi2v` command. Heavy modules are imported inside the commands so `--help` is instant
(and never imports numba)."""
from __future__ import annotations

import sys

import click

from .errors import TinyI2VError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tinyi2v")
def cli() -> None:
    """tinyi2v: one photo in, a short video out, with MobileI2V in numpy."""


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
    """Entry point: user errors become one line on stderr and exit code 1, never a traceback."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("tinyi2v: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except TinyI2VError as e:
        click.echo(f"tinyi2v: error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("tinyi2v: interrupted", err=True)
        sys.exit(130)
