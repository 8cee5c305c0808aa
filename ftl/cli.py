"""The `ftl` command: a workflow file plus `--set key=value` overrides, never a flag per knob."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ftl import config, logs
from ftl.errors import FtlError
from ftl.secrets import mask_text

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Feature-based transfer learning: extract backbone features, train heads, track them.")

Workflow = Annotated[Path, typer.Argument(help="workflow YAML, e.g. workflows/quickstart.yaml")]
Sets = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="override a key: extract.batch_size=128")]


@app.callback()
def options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Ray's and MLflow's own logs")] = False,
            ) -> None:
    """Feature-based transfer learning: extract backbone features, train heads, track them."""
    logs.configure(be_verbose=verbose)


def start_ray_early() -> None:
    """The workflow is valid and the command needs Ray: start it now, while the driver imports and plans."""
    from ftl.pipeline import ray_session

    ray_session.start_early()


def shortcut(key: str, what: str):
    """A `predict` flag that sets one key of the predict: section."""
    return typer.Option(help=f"predict.{key}: {what} (shortcut for --set predict.{key}=...)")


@app.command()
def show(workflow: Workflow, set: Sets = None) -> None:
    """Print the resolved workflow (defaults filled in, secrets masked) without running it."""
    wf = as_run(config.load_workflow(workflow, set or [], needs=()))
    typer.echo(config.to_yaml(wf), nl=False)
    if wf.sweep.backbones:
        typer.echo("# ftl sweep takes each backbone's weights from sweep.backbones; extract.weights is for the "
                   "other commands")


def as_run(wf: config.Workflow) -> config.Workflow:
    """What a run will use, not what was left empty: the tracking URI from $MLFLOW_TRACKING_URI or the default
    (a password in it is masked as any other), and DEFAULT weights as the enum or hub file they stand for."""
    import os

    from ftl.model import weights  # names the weights, fetches nothing
    from ftl.tracking.runs import DEFAULT_URI

    entries = [b.model_copy(update={"weights": weights.named(b.backbone, b.weights)}) for b in wf.sweep.backbones]
    uri = wf.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    update = {"sweep": wf.sweep.model_copy(update={"backbones": entries}),
              "tracking": wf.tracking.model_copy(update={"uri": uri})}
    if wf.extract is not None:  # a predict-only workflow has none
        update["extract"] = wf.extract.model_copy(
            update={"weights": weights.named(wf.extract.backbone, wf.extract.weights)})
    return wf.model_copy(update=update)


@app.command()
def extract(workflow: Workflow, set: Sets = None) -> None:
    """Extract features of the workflow's images into a Delta table."""
    from ftl.extract import stage

    wf = config.load_workflow(workflow, set or [])
    start_ray_early()
    result = stage.run(wf)
    typer.echo(result.summary())



@app.command()
def versions(uri: Annotated[str, typer.Argument(help="an output (extract.output, predict.output) or one of its tables")],
             limit: Annotated[int, typer.Option(help="newest versions to show per table")] = 20) -> None:
    """List a table's versions, newest first, with the run that made each (pin one with train.features_version)."""
    from ftl.io import storage, table

    loc = storage.locate(uri)
    found = [table.Table.at(loc)] if table.Table.at(loc).exists() else [
        t for name in ("features", "predictions", "quarantine") if (t := table.Table.at(loc.join(name))).exists()]
    if not found:
        raise FtlError(f"no table at {loc.uri} nor under it (features/, predictions/, quarantine/); give "
                       f"extract.output, predict.output or one of their tables")
    for t in found:
        typer.echo(f"{t.loc.uri}")
        for v in table.history(t, limit=limit):
            typer.echo(f"  version {v['version']:>4}  {v['time']}  epoch {v['epoch']:>3}  {v['what']:<24} {v['run']}")


@app.command()
def train(workflow: Workflow, set: Sets = None) -> None:
    """Fit a head on the extracted features with Ray Train; log and register it in MLflow."""
    from ftl.train import stage

    wf = config.load_workflow(workflow, set or [])
    if not stage.in_process(wf.train):  # a head one process holds is fitted without Ray
        start_ray_early()
    typer.echo(stage.run(wf).summary())


@app.command()
def run(workflow: Workflow, set: Sets = None) -> None:
    """Extract (only what is new), then train, then register: the whole workflow."""
    from ftl.flows import run as flow

    wf = config.load_workflow(workflow, set or [])
    start_ray_early()
    again = shlex.join(["ftl", "train", str(workflow), *(a for s in set or [] for a in ("--set", s))])
    typer.echo(flow.run(wf, again=again, tell=typer.echo).summary())


@app.command()
def sweep(workflow: Workflow, set: Sets = None) -> None:
    """Extract many layers (of several backbones) once, fit a head per layer × grid point, register the best."""
    from ftl.flows import sweep as flow

    wf = config.load_workflow(workflow, set or [])
    start_ray_early()
    typer.echo(flow.run(wf).summary())


@app.command()
def predict(workflow: Annotated[Optional[Path], typer.Argument(
                help="workflow YAML with a predict: section; optional with --model, --input and --output")] = None,
            set: Sets = None,
            model: Annotated[Optional[str], shortcut("model", "models:/<name>/<version>, runs:/..., a folder")] = None,
            input: Annotated[Optional[str], shortcut("input", "a folder of images or a manifest .csv/.parquet")] = None,
            output: Annotated[Optional[str], shortcut("output", "where predictions/ and quarantine/ go")] = None,
            top_k: Annotated[Optional[int], shortcut("top_k", "classes kept per image")] = None,
            batch_size: Annotated[Optional[int], shortcut("batch_size", "images per model call")] = None,
            actors: Annotated[Optional[int], shortcut("actors", "model actors in the pool")] = None) -> None:
    """Classify images with a registered model, on Ray Data, into Parquet: the workflow's predict: section."""
    from ftl import tracking
    from ftl.predict import stage

    # The flags are applied after --set: they override the workflow file and its overrides.
    flags = {"model": model, "input": input, "output": output, "top_k": top_k, "batch_size": batch_size,
             "actors": actors}
    values = {f"predict.{k}": v for k, v in flags.items() if v is not None}
    wf = config.load_workflow(workflow, set or [], values=values, needs=("predict",))
    start_ray_early()
    result = stage.run(wf.predict, tracking_uri=tracking.connect(wf.tracking), storage=wf.storage)
    typer.echo(result.summary())


@app.command()
def layers(backbone: Annotated[str, typer.Argument(help="a torchvision name (resnet50) or timm/<name> "
                                                     "(timm/vit_small_patch14_dinov2.lvd142m)")],
           pooling: Annotated[str, typer.Option(help="avg, max, avgmax; for ViT blocks also cls, patch_avg, "
                                                     "cls_patch_avg")] = "avg",
           all: Annotated[bool, typer.Option("--all", help="every graph node, not only the blocks (timm)")] = False,
           ) -> None:
    """List a backbone's tap points with their output shapes and pooled dims."""
    from ftl.model import backbones

    if pooling not in backbones.POOLINGS:
        raise config.WorkflowError(f"--pooling {pooling}: valid: {', '.join(backbones.POOLINGS)}")
    backbones.check_name(backbone)
    default = backbones.default_layer(backbone)
    every = all or backbones.provider(backbone) is not backbones.timm_zoo
    points = backbones.tap_points(backbone, every=every)
    typer.echo(f"{'layer':<40} {'output shape':<22} pooled dim")
    for name, shape in points:
        mark = "  (default: penultimate)" if name == default else ""
        dim = backbones.pooled_dim(shape, pooling) if len(shape) == 3 or pooling not in backbones.TOKEN_POOLINGS else "-"
        typer.echo(f"{name:<40} {str(shape[1:]):<22} {dim}{mark}")
    if not every:
        typer.echo(f"(blocks and pre_logits; any of the {len(backbones.taps(backbone))} graph nodes can be tapped: "
                   f"ftl layers {backbone} --all)")


@app.command()
def finetune(workflow: Workflow, set: Sets = None) -> None:
    """Fine-tune the backbone's chosen blocks from the best linear probe (LP-FT) on Ray Train; register the model."""
    from ftl.flows import finetune as flow

    wf = config.load_workflow(workflow, set or [])
    start_ray_early()
    typer.echo(flow.run(wf).summary())


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in-process; returns the exit code instead of exiting (tests call this)."""
    try:
        app(args=argv, standalone_mode=False)
    except FtlError as e:
        typer.echo(f"error: {mask_text(str(e))}", err=True)  # it may quote a URI or an option that holds one
        return 2
    except typer.Exit as e:
        return e.exit_code
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a usage error (typer's click): its own message
            e.show()
            if "extra argument" in str(e) and "=" in str(e):
                typer.echo("each --set takes one key=value: repeat it, --set a.b=1 --set a.c=2", err=True)
            return e.exit_code
        return unexpected(e)
    return 0


def unexpected(e: BaseException) -> int:
    """A failure ftl has no message for: one masked line (the traceback only with -v), exit status 1."""
    import traceback

    if logs.verbose():
        typer.echo(mask_text("".join(traceback.format_exception(e))), err=True)
    where = "" if logs.verbose() else "; rerun with -v for the traceback"
    typer.echo(f"error: {mask_text(f'{type(e).__name__}: {e}')[:2000]}\nThis is a bug or an environment "
               f"problem ftl does not recognise{where}. What was committed stays; a rerun does only what is missing.",
               err=True)
    return 1


def entrypoint() -> None:
    logs.own_process(sys.argv[1:])  # only a real `ftl` process: never one that calls main() in-process
    code = main()
    session = sys.modules.get("ftl.pipeline.ray_session")
    # The local Ray runtime this command started goes as soon as this process does (or there is no
    # Ray at all, as for `ftl train` of a small head): skip the interpreter's slow teardown too (a
    # second or more with torch and MLflow loaded), and Ray's graceful shutdown with it. What exit
    # would still do is done here.
    left = session is not None and session.leave()
    if left or session is None or not session.started():
        finish_fast(code)
    sys.exit(code)


def finish_fast(code: int) -> None:
    import logging
    import os

    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and mlflow.active_run() is not None:  # as MLflow's own exit hook does
        mlflow.end_run()
    logging.shutdown()
    sys.stdout.flush()
    logs.finish()
    os._exit(code)


if __name__ == "__main__":
    entrypoint()
