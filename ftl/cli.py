"""The `ftl` command: a workflow file plus `--set key=value` overrides, never a flag per knob."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftl import config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Feature-based transfer learning: extract backbone features, train heads, track them.")

Workflow = Annotated[Path, typer.Argument(help="workflow YAML, e.g. workflows/quickstart.yaml")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a key: extract.batch_size=128")]


def _known_errors() -> tuple[type[Exception], ...]:
    from ftl.backbones import LayerError
    from ftl.extract import ExtractError
    from ftl.sources import SourceError
    from ftl.weights import WeightsError

    return (config.WorkflowError, LayerError, WeightsError, SourceError, ExtractError, FileNotFoundError)


@app.command()
def show(workflow: Workflow, set: Sets = None) -> None:
    """Print the resolved workflow (defaults filled in, secrets masked) without running it."""
    wf = config.load_workflow(workflow, set or [])
    typer.echo(config.to_yaml(wf), nl=False)


@app.command()
def extract(workflow: Workflow, set: Sets = None) -> None:
    """Extract features of the workflow's images into Parquet."""
    from ftl import extract as stage

    wf = config.load_workflow(workflow, set or [])
    result = stage.run(wf)
    typer.echo(result.summary())


@app.command()
def layers(backbone: Annotated[str, typer.Argument(help="a torchvision model name, e.g. resnet50")],
           pooling: Annotated[str, typer.Option(help="avg, max or avgmax")] = "avg") -> None:
    """List a backbone's tap points with their output shapes and pooled dims."""
    from ftl import backbones

    default = backbones.default_layer(backbone)
    typer.echo(f"{'layer':<40} {'output shape':<22} pooled dim")
    for name, shape in backbones.tap_points(backbone):
        mark = "  (default: penultimate)" if name == default else ""
        typer.echo(f"{name:<40} {str(shape[1:]):<22} {backbones.pooled_dim(shape, pooling)}{mark}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code instead of exiting (tests call this)."""
    try:
        app(args=argv, standalone_mode=False)
    except _known_errors() as e:
        typer.echo(f"error: {e}", err=True)
        return 2
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:  # click's usage errors
        import click

        if isinstance(e, click.ClickException):
            e.show()
            return e.exit_code
        raise
    return 0


def entrypoint() -> None:
    sys.exit(main())
