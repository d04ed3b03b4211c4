"""Reading configs: YAML files plus dotted ``key=value`` overrides, validated, with readable errors.

Layer 1 (config): imports only errors, pyyaml, pydantic, the stdlib and the other ``config`` modules.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from posttrain.config.registry import CONFIGS, JobConfig
from posttrain.config.workflow import SuitesConfig, WorkflowConfig
from posttrain.errors import ConfigError


def load_workflow(path: str | Path, overrides: list[str] | None = None, *,
                  schema: type[BaseModel] = WorkflowConfig) -> Any:
    """A workflow YAML file (plus ``key=value`` overrides of its top-level fields), validated; ``schema``
    SuitesConfig reads a file of eval suites alone."""
    what = "workflow" if schema is WorkflowConfig else "suites file"
    try:
        tree = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what} {path} must be a mapping, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, schema, str(path))) from None


def load_suites(path: str | Path, overrides: list[str] | None = None) -> SuitesConfig:
    """A file of eval suites (``system_prompt`` and ``evals``, as in a workflow), validated."""
    return load_workflow(path, overrides, schema=SuitesConfig)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    pairs = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        key, raw = item.split("=", 1)
        # YAML parsing turns "1e-4" into a float, "null" into None, "[q_proj,v_proj]" into a list.
        value = yaml.safe_load(raw) if raw != "" else ""
        pairs.append((key.strip(), value))
    return pairs


def _fields_at(schema: type[BaseModel], loc: tuple[Any, ...]) -> list[str] | None:
    node: Any = schema
    for part in loc[:-1]:
        field = node.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return None
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        node = ann
    return sorted(node.model_fields)


def _explain(exc: ValidationError, schema: type[BaseModel], source: str) -> str:
    lines = [f"invalid config {source}:"]
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            known = _fields_at(schema, loc) or []
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f" did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"  {where}: unknown key.{hint} Keys here: {', '.join(known)}")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required, but not given")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, method: str | None = None,
                base: dict[str, Any] | None = None) -> JobConfig:
    """Read a YAML config, apply ``key=value`` overrides, and validate it.

    ``method`` picks the schema when the file does not name one; ``base`` is a dict used instead of a file.
    """
    source = str(path) if path is not None else "(overrides)"
    tree: dict[str, Any] = dict(base or {})
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping of sections, got {type(loaded).__name__}")
        tree.update(loaded)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    name = tree.get("method", method or "sft")
    schema = CONFIGS.get(name)
    if schema is None:
        raise ConfigError(f"config {source}: unknown method {name!r}; known: {', '.join(CONFIGS)}")
    try:
        return schema.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, schema, source)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
