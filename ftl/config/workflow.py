"""The whole workflow file: its sections, YAML loading, `--set a.b=c` overrides, and errors that name the key."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator

from ftl.config.base import Strict
from ftl.config.finetune import FinetuneConfig
from ftl.config.pipeline import ExtractConfig, PredictConfig
from ftl.config.sections import SourceConfig, StorageConfig, TrackingConfig
from ftl.config.training import SweepConfig, TrainConfig
from ftl.errors import WorkflowError
from ftl.secrets import mask_secrets

# What extract, train, run and sweep read; a workflow that only predicts needs neither.
STAGE_SECTIONS = ("source", "extract")
SECTION_HINTS = {"predict": "give predict.model, predict.input and predict.output, "
                            "or run: ftl predict --model M --input I --output O"}


class Workflow(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    # Optional so that a workflow that only predicts validates; the commands that read them
    # require them (validate's `needs`).
    source: SourceConfig | None = None
    storage: StorageConfig = StorageConfig()
    extract: ExtractConfig | None = None
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    sweep: SweepConfig = SweepConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    predict: PredictConfig | None = None

    @field_validator("name")
    @classmethod
    def _no_blank(cls, v: str) -> str:
        return v.strip()


MAX_EXPANDED_VALUES = 100_000  # keys and values of the workflow with every alias written out


def load_workflow(path: str | Path | None, overrides: list[str] = (), *, values: dict[str, Any] | None = None,
                  needs: tuple[str, ...] = STAGE_SECTIONS) -> Workflow:
    """Read a workflow file (None: an empty one), apply `key=value` overrides, then `values` by key path; validate."""
    data = read_workflow(Path(path)) if path is not None else {"name": "cli"}
    for item in overrides:
        apply_override(data, item)
    for key, value in (values or {}).items():
        set_key(data, key, value)
    return validate(data, source=str(path) if path is not None else "the command line", needs=needs)


def read_workflow(path: Path) -> dict:
    if not path.exists():
        raise WorkflowError(f"workflow file {path} does not exist; see workflows/ for examples")
    text = path.read_text()
    try:
        check_expanded_size(yaml.compose(text, Loader=yaml.SafeLoader), path)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise WorkflowError(f"{path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise WorkflowError(f"{path} must hold a mapping at its top level")
    return data


def check_expanded_size(root, path: Path) -> None:
    """Anchors and aliases are fine; a few lines of nested aliases that expand to millions of values are not.

    The size is counted on YAML's node graph, where an alias is a shared node, so the check itself
    never expands anything.
    """
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) not in sizes:
            sizes[id(node)] = 0  # a node that contains itself counts once
            children = node.value if isinstance(node.value, list) else []
            flat = [n for c in children for n in (c if isinstance(c, tuple) else (c,))]
            sizes[id(node)] = 1 + sum(size(c) for c in flat)
        return sizes[id(node)]

    if root is not None and size(root) > MAX_EXPANDED_VALUES:
        raise WorkflowError(f"{path}: its aliases expand to {size(root):,} values (at most {MAX_EXPANDED_VALUES:,}); "
                            f"a workflow is a few dozen keys: write the values out instead of nesting aliases")


def apply_override(data: dict, item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, lists, ...)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise WorkflowError(f"--set {item!r} must look like key.path=value")
    set_key(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)


def set_key(data: dict, key: str, value: Any) -> None:
    """Set `a.b.c` to `value` in a nested dict, making the sections on the way."""
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise WorkflowError(f"cannot set {key}: {'.'.join(parents[: i + 1])} is not a section")
        node = child
    node[leaf] = value


def validate(data: dict, *, source: str = "workflow", needs: tuple[str, ...] = STAGE_SECTIONS) -> Workflow:
    """A validated Workflow; `needs` names the sections the command will read."""
    lines = [f"{s}: required key is missing" + (f"; {SECTION_HINTS[s]}" if s in SECTION_HINTS else "")
             for s in needs if data.get(s) is None]
    try:
        wf = Workflow.model_validate(data)
    except ValidationError as e:
        lines += [format_error(err) for err in e.errors()]
    if lines:
        raise WorkflowError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None
    return wf


def format_error(err: dict) -> str:
    """One line naming the exact path, e.g. `extract.layers[1]`, and the valid choices."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and "[" in p)]
    path = format_path(loc)
    if err["type"] == "extra_forbidden":
        valid = ", ".join(fields_at(Workflow, loc[:-1]))
        return f"{path}: unknown key; valid keys here: {valid}"
    if err["type"] == "missing":
        return f"{path}: required key is missing"
    return f"{path}: {err['msg']} (got {err.get('input')!r})"


def format_path(loc: list) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def fields_at(model: type[BaseModel], loc: list) -> list[str]:
    """Field names of the section at `loc`, for 'valid keys' hints."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        sub = _model_in(field.annotation)
        if sub is None:
            return []
        model = sub
    return list(model.model_fields)


def _model_in(annotation) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def to_yaml(wf: Workflow, *, mask: bool = True) -> str:
    """The resolved workflow, with every default filled in and secrets masked."""
    data = wf.model_dump(mode="json")
    return yaml.safe_dump(mask_secrets(data) if mask else data, sort_keys=False)
