"""Every error ftl raises for a user to act on: one base that the CLI catches once.

Each message names the workflow key or the object at fault and says what to do. Anything
else that escapes is a bug, and the CLI lets its traceback through.
"""


from collections.abc import Iterator


def chain(e: BaseException | None) -> Iterator[BaseException]:
    """`e`, then what it was raised from or during, and so on, each once.

    Ray hands a task's own exception back as the `cause` of its RayTaskError: followed first.
    """
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__


class FtlError(Exception):
    """A run that cannot go on as asked; the message says why and what to do."""


class WorkflowError(FtlError):
    """A workflow that cannot run; the message names the path and the valid choices."""


class LayerError(FtlError):
    """An unknown backbone or layer; the message lists the valid names."""


class WeightsError(FtlError):
    """Weights that cannot be found or loaded; the message says what to use instead."""


class SourceError(FtlError):
    """A source that cannot be listed; the message says what was expected."""


class StorageError(FtlError):
    """A URI that no filesystem serves, or an output that is damaged."""


class ExtractError(FtlError):
    """Extraction could not complete as asked."""


class FeatureError(FtlError):
    """Features that cannot be trained on as asked."""


class TrainError(FtlError):
    """Training could not complete as asked."""


class TrackingError(FtlError):
    """MLflow could not be reached, or a model could not be found or loaded."""
