"""Write docs/api.md, the API reference, from the public API's signatures and docstrings.

    python scripts/api_reference.py              # regenerate docs/api.md
    python scripts/api_reference.py --check      # exit 1 if docs/api.md is out of date

The public API: the modules in `MODULES` (those that exist); of each, the names in
its `__all__`, or without one the functions and classes it defines whose names do not
start with an underscore. Each entry is the signature and docstring; a class also
lists the docstrings under its dataclass fields, its public methods and properties.
The output depends only on the code (sorted names, no memory addresses), so the tests
can check that the committed file is up to date.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType

from tl_transcoders.core.config import field_docs

MODULES = (
    "tl_transcoders",
    "tl_transcoders.core.config",
    "tl_transcoders.core.transcoder",
    "tl_transcoders.core.clt",
    "tl_transcoders.core.encoder",
    "tl_transcoders.core.module",
    "tl_transcoders.core.placement",
    "tl_transcoders.core.activations",
    "tl_transcoders.core.kernels",
    "tl_transcoders.core.native",
    "tl_transcoders.io.loading",
    "tl_transcoders.io.data",
    "tl_transcoders.hooks.sites",
    "tl_transcoders.hooks.splice",
    "tl_transcoders.hooks.tokens",
    "tl_transcoders.hooks.models",
    "tl_transcoders.evaluation",
    "tl_transcoders.training",
    "tl_transcoders.attribution",
    "tl_transcoders.analysis.dashboards",
    "tl_transcoders.analysis.probing",
    "tl_transcoders.analysis.autointerp",
    "tl_transcoders.analysis.comparison",
    "tl_transcoders.app.corpus",
)
"""The modules documented, in page order."""

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "api.md"

HEADER = """# API reference

Generated from the docstrings by `python scripts/api_reference.py`; do not edit by hand
(`tests/test_api_reference.py` fails when this file is out of date). Guides:
[index](index.md).
"""


def public_names(module: ModuleType) -> list[str]:
    """The module's `__all__`, else the functions and classes it defines that do not
    start with an underscore; sorted."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isfunction(value) or inspect.isclass(value))
            and value.__module__ == module.__name__
        ]
    return sorted(names, key=str.lower)


def public_objects() -> dict[str, list[tuple[str, object]]]:
    """`{module name: [(name, object), ...]}` for every documented module that exists."""
    objects = {}
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        objects[name] = [(n, getattr(module, n)) for n in public_names(module)]
    return objects


def undocumented(objects: dict[str, list[tuple[str, object]]]) -> list[str]:
    """`module.name` of every public function or class without a docstring of its own."""
    return [
        f"{module}.{name}"
        for module, members in objects.items()
        for name, obj in members
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not own_docstring(obj)
    ]


def own_docstring(obj: object) -> str:
    """The object's own docstring, dedented; "" when it has none (a class does not
    inherit one, a dataclass's generated `Name(field, ...)` does not count)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not doc:
        return ""
    if inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("):
        return ""
    return inspect.cleandoc(doc)


def as_markdown(doc: str) -> str:
    """A docstring as markdown: an indented block (an `Args:` list, an example) that
    follows a text line gets a blank line before it, so it shows as written."""
    lines = doc.split("\n")
    result = []
    for index, line in enumerate(lines):
        previous = lines[index - 1] if index else ""
        if line.startswith(" ") and previous.strip() and not previous.startswith(" "):
            result.append("")
        result.append(line)
    return "\n".join(result)


def format_annotation(annotation: object) -> str:
    if isinstance(annotation, str):  # postponed annotations: the source text
        return annotation
    if isinstance(annotation, type):
        return annotation.__qualname__ if annotation.__module__ == "builtins" else annotation.__name__
    text = re.sub(r"\b(typing|collections\.abc|torch\.nn\.modules\.module)\.", "", repr(annotation))
    return re.sub(r"""ForwardRef\((['"])(.*?)\1\)""", r"\2", text)  # a NamedTuple's string annotations


ROOT = Path(__file__).resolve().parent.parent


def format_default(value: object) -> str:
    """The value's repr without memory addresses; a path inside the checkout relative
    to it, so the reference reads the same wherever the project is cloned."""
    if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(ROOT):
        return f"{type(value).__name__}('{value.relative_to(ROOT).as_posix()}')"
    return re.sub(r" at 0x[0-9a-f]+", "", repr(value))


def format_signature(obj: object, name: str, bound: bool = False) -> str:
    """`name(param: annotation = default, ...) -> return`, as in the source; `bound`
    leaves out the first parameter (a method's `self` or `cls`)."""
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):  # an exception class without its own __init__
        bases = [base.__name__ for base in getattr(obj, "__bases__", ()) if base is not object]
        return f"{name}({', '.join(bases)})" if bases else name
    parameters = []
    for parameter in list(signature.parameters.values())[int(bound) :]:
        text = parameter.name
        if parameter.kind is parameter.VAR_POSITIONAL:
            text = "*" + text
        elif parameter.kind is parameter.VAR_KEYWORD:
            text = "**" + text
        if parameter.annotation is not parameter.empty:
            text += f": {format_annotation(parameter.annotation)}"
        if parameter.default is not parameter.empty:
            separator = " = " if parameter.annotation is not parameter.empty else "="
            text += separator + format_default(parameter.default)
        parameters.append((parameter.kind, text))
    texts = []
    for index, (kind, text) in enumerate(parameters):
        previous = parameters[index - 1][0] if index else None
        if kind is inspect.Parameter.KEYWORD_ONLY and previous not in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.VAR_POSITIONAL,
        ):
            texts.append("*")
        texts.append(text)
        following = parameters[index + 1][0] if index + 1 < len(parameters) else None
        if kind is inspect.Parameter.POSITIONAL_ONLY and following is not inspect.Parameter.POSITIONAL_ONLY:
            texts.append("/")
    result = f"{name}({', '.join(texts)})"
    if signature.return_annotation is not signature.empty and not inspect.isclass(obj):
        result += f" -> {format_annotation(signature.return_annotation)}"
    return result


def class_members(cls: type) -> list[tuple[str, object, str]]:
    """`(name, function or property, kind)` for the public methods, class methods,
    static methods and properties defined on `cls` itself (not inherited; an override
    of a base class's method only with a docstring of its own), sorted."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if any(hasattr(base, name) for base in cls.__mro__[1:]) and not getattr(value, "__doc__", None):
            continue
        kind = {classmethod: "classmethod", staticmethod: "staticmethod"}.get(type(value), "method")
        if kind != "method":
            value = value.__func__
        if isinstance(value, property):
            kind = "property"
        if inspect.isfunction(value) or kind == "property":
            members.append((name, value, kind))
    return sorted(members, key=lambda member: member[0].lower())


def anchor(module: str, name: str = "") -> str:
    """The GitHub heading anchor of `module` or `module.name` headings."""
    text = f"{module}.{name}" if name else module
    return re.sub(r"[^a-z0-9_-]", "", text.lower().replace(" ", "-"))


def document(obj: object, name: str, level: str, kind: str = "") -> list[str]:
    """The markdown entry of one function or class, or of a class member of `kind`
    ("method", "classmethod", "staticmethod", "property")."""
    heading = f"{level} `{name}`" + (f" ({kind})" if kind in ("classmethod", "staticmethod", "property") else "")
    if kind == "property":
        lines = [heading, ""]
        doc = inspect.cleandoc(obj.__doc__) if obj.__doc__ else ""
    else:
        short = name.rsplit(".", 1)[-1]
        prefix = "class " if inspect.isclass(obj) else ""
        signature = format_signature(obj, short, bound=kind in ("method", "classmethod"))
        lines = [heading, "", "```python", prefix + signature, "```", ""]
        doc = own_docstring(obj)
    if doc:
        lines += [as_markdown(doc), ""]
    fields = field_docs(obj) if dataclasses.is_dataclass(obj) else {}
    if fields:
        lines += [f"- `{field}`: {text}" for field, text in fields.items()] + [""]
    return lines


def render(objects: dict[str, list[tuple[str, object]]]) -> str:
    lines = [HEADER]
    for module in objects:
        lines.append(f"- [`{module}`](#{anchor(module)})")
    lines.append("")
    for module, members in objects.items():
        lines += [f"## {module}", ""]
        summary = inspect.cleandoc(importlib.import_module(module).__doc__ or "").split("\n\n")[0]
        if summary:
            lines += [summary, ""]
        for name, obj in members:
            if inspect.isclass(obj) or inspect.isfunction(obj):
                lines += document(obj, name, "###")
            else:
                lines += [f"### `{name}`", "", f"`{format_default(obj)}`", ""]
            if inspect.isclass(obj):
                for member_name, member, kind in class_members(obj):
                    lines += document(member, f"{name}.{member_name}", "####", kind)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"where to write (default: {OUTPUT})")
    parser.add_argument("--check", action="store_true", help="compare with --output instead of writing it")
    args = parser.parse_args(argv)
    objects = public_objects()
    for name in undocumented(objects):
        print(f"warning: {name} has no docstring", file=sys.stderr)
    text = render(objects)
    if args.check:
        if not args.output.exists() or args.output.read_text() != text:
            print(f"{args.output} is out of date: run python scripts/api_reference.py", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
