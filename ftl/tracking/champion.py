"""The `champion` alias: which registered version a user (or a server) should take.

A version ftl registers becomes `models:/<name>@champion` when no version holds the alias yet,
when the one that holds it has no val accuracy on record, or when the new one's val accuracy is
at least the champion's: a rerun that does better moves it, one that does worse leaves it where
it is. Every version carries its val accuracy as the tag `ftl.val_accuracy`, so the rule can be
checked in the registry. The score compares like with like only on the same val images; after the
data changes, move the alias by hand where needed (`MlflowClient().set_registered_model_alias`).
"""

from __future__ import annotations

import re

from ftl.errors import TrackingError

ALIAS = "champion"
SCORE = "ftl.val_accuracy"
REF = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))(?P<rest>/.*)?$")


def holder(name: str):
    """The version that holds the alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, ALIAS)
    except MlflowException:  # no such alias (yet): the first version takes it
        return None


def promote(name: str, version: str, *, val_accuracy: float | None, follower: tuple[str, str] | None = None) -> str:
    """Record the version's score; give it the alias when it earns it (module docstring). Returns a line for the user.

    `follower` (name, version) gets the alias with it: the head of the image model, which belong together.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    pair = [(name, str(version))] + ([(follower[0], str(follower[1]))] if follower else [])
    if val_accuracy is not None:
        for n, v in pair:
            client.set_model_version_tag(n, v, SCORE, f"{val_accuracy:.6f}")
    current = holder(name)
    best = (current.tags or {}).get(SCORE) if current else None
    if current is not None and val_accuracy is not None and best is not None and val_accuracy < float(best):
        return (f"champion: models:/{name}@{ALIAS} stays version {current.version} (val accuracy {float(best):.4f} > "
                f"{val_accuracy:.4f} of version {version})")
    for n, v in pair:
        client.set_registered_model_alias(n, ALIAS, v)
    return f"champion: models:/{name}@{ALIAS} is now version {version}"


def active_metric(key: str) -> float | None:
    """The latest value of a metric of the active run (what log_evaluation logged), or None."""
    import mlflow

    run = mlflow.active_run()
    return mlflow.get_run(run.info.run_id).data.metrics.get(key) if run else None


def pin(uri: str) -> str:
    """models:/name@alias, /latest or /<stage> as the version it points at now; anything else as it is.

    What ftl records (tags, keys of finished work, a prediction's model) names a fixed version, so a
    later move of the alias cannot change what an earlier run meant, nor what a running one loads.
    """
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    m = REF.match(uri)
    if not m or (m["version"] or "").isdigit():
        return uri
    named = f"models:/{m['name']}@{m['alias']}" if m["alias"] else f"models:/{m['name']}/{m['version']}"
    try:
        # MLflow's own resolution, as its loader does it: an alias, `latest`, or a stage's latest version.
        version = get_model_name_and_version(MlflowClient(), named)[1]
    except Exception as e:
        raise TrackingError(f"cannot resolve {uri}: {e}; give models:/<name>/<version>, /latest, or "
                            f"models:/<name>@{ALIAS} of a model ftl registered") from e
    return f"models:/{m['name']}/{version}{m['rest'] or ''}"
