"""Command-line flags generated from a configuration dataclass, so the dataclass and ``--help`` are
one thing: one ``--flag`` per field, typed from its annotation (``Literal`` fields get their
choices, tuples their arity), its default the field's, its help the string under the field.

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, TrainConfig)
    config = dataclass_from_namespace(TrainConfig, parser.parse_args())
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import types
import typing
from typing import Any, Literal, Sequence, get_args, get_origin, get_type_hints


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal under it in the class body), whitespace folded."""
    tree = ast.parse(inspect.getsource(cls))
    docs, body = {}, tree.body[0].body
    for node, following in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) \
                and isinstance(getattr(following, "value", None), ast.Constant):
            docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _without_none(hint: Any) -> tuple[Any, bool]:
    """(the annotation without ``| None``, whether None was allowed)."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        parts = [part for part in get_args(hint) if part is not type(None)]
        if len(parts) == 1:
            return parts[0], len(parts) < len(get_args(hint))
    return hint, False


def _default(item: dataclasses.Field) -> Any:
    if item.default is not dataclasses.MISSING:
        return item.default
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return None


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: Sequence[str] = ()) -> None:
    """One ``--flag`` per field of the dataclass ``cls`` (but those in ``skip``)."""
    docs = field_docs(cls)
    hints = get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.name in skip:
            continue
        flag = "--" + item.name.replace("_", "-")
        hint, optional = _without_none(hints[item.name])
        default = _default(item)
        options: dict[str, Any] = {"default": default, "help": docs.get(item.name, "")}
        if hint is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **options)
            continue
        if get_origin(hint) is Literal:
            choices = get_args(hint)
            options.update(type=type(choices[0]), choices=choices)
        elif get_origin(hint) is tuple:
            parts = get_args(hint)
            variable = len(parts) == 2 and parts[1] is Ellipsis
            options.update(type=parts[0], nargs="+" if variable else len(parts))
        else:
            options["type"] = next((t for t in (int, float, str) if t in (hint, *get_args(hint))), str)
        if optional and options.get("choices") is None and default is None:
            options["help"] += " (default: none)"
        parser.add_argument(flag, **options)


def dataclass_from_namespace(cls: type, args: argparse.Namespace, skip: Sequence[str] = (), **extra: Any):
    """The dataclass ``cls`` built from the parsed flags of ``add_dataclass_arguments`` (tuples from
    lists), plus ``extra`` fields."""
    values = {}
    for item in dataclasses.fields(cls):
        if item.name in skip or item.name in extra:
            continue
        value = getattr(args, item.name)
        values[item.name] = tuple(value) if isinstance(value, list) else value
    return cls(**values, **extra)
