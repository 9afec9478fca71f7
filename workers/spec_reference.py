"""The job spec's field reference (docs/job-spec.md), generated from the pydantic models so it
cannot drift from them: ``python -m workers.spec_reference > docs/job-spec.md``."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .spec import JobSpec

HEADER = """# Job spec reference

A job is one `JobSpec` document (YAML or JSON), given to `cicw-stream train SPEC` and, unchanged,
to the REST service. Unknown fields are rejected, and every error names the field (for example
`cicw.method`). Generated from the models by `python -m workers.spec_reference`; do not edit.
Example: `examples/fashion_mnist_job.yaml`.
"""


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if annotation is type(None):
        return "None"
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _constraints(field: Any) -> str:
    """Bounds and patterns from the field's metadata, e.g. '> 0, < 1'."""
    out = []
    for item in field.metadata:
        for attr, symbol in _BOUNDS.items():
            if getattr(item, attr, None) is not None:
                out.append(f"{symbol} {getattr(item, attr)}")
        if getattr(item, "pattern", None) is not None:
            out.append(f"matches `{item.pattern}`")
    return ", ".join(out)


def _default(field: Any) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        return f"`{value.__class__.__name__}` defaults" if isinstance(value, BaseModel) else f"`{value!r}`"
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`"


def reference() -> str:
    """Markdown: one table per model reachable from JobSpec, in the order first met."""
    order: list[type[BaseModel]] = []
    todo: list[type[BaseModel]] = [JobSpec]
    while todo:
        model = todo.pop(0)
        if model in order:
            continue
        order.append(model)
        for field in model.model_fields.values():
            todo += _models_in(field.annotation)
    parts = [HEADER]
    for model in order:
        doc = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
        parts.append(f"\n## {model.__name__}\n\n{doc}\n\n| field | type | default | meaning |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
            if not meaning and (models := _models_in(field.annotation)):
                meaning = "See " + ", ".join(f"[{m.__name__}](#{m.__name__.lower()})" for m in models) + "."
            if constraints := _constraints(field):
                meaning = f"{meaning} ({constraints})".strip()
            type_name = _type_name(field.annotation).replace("|", "\\|")
            parts.append(f"| `{name}` | `{type_name}` | {_default(field)} | {meaning} |")
    return "\n".join(parts) + "\n"


def main() -> None:
    print(reference(), end="")


if __name__ == "__main__":
    main()
