"""Load a recipe from YAML, apply ``--set`` overrides, and explain every problem in one sentence.

The file is parsed with ``yaml.safe_load`` (never a loader that can build Python objects) and, for
line numbers, composed into a node tree with ``yaml.compose(..., Loader=yaml.SafeLoader)``. Every
problem becomes a :class:`~vitopt.errors.VitoptError` of the form::

    FILE:LINE: KEY.PATH: what was wrong (allowed: ...).

where ``LINE`` is the line of the offending key (or of its nearest parent present in the file), and
``FILE (from --set)`` replaces ``FILE:LINE`` when the value came from an override. When pydantic
reports several problems, the first is described and ``(and N more)`` counts the others.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from vitopt.errors import VitoptError
from vitopt.recipe.schema import _VTP_KEYS, Choices, Recipe

__all__ = ["load_recipe", "apply_overrides", "recipe_json_schema", "dump_resolved", "format_path"]

Key = str | int
PathT = tuple[Key, ...]

_SEGMENT = re.compile(r"(?:^|\.)([^.\[\]=]+)|\[(-?\d+)\]")


# ----------------------------------------------------------------------------- public API


def load_recipe(path: str | Path, overrides: Iterable[str] | None = (), *, choices: Choices | None = None) -> Recipe:
    """Read, override and validate the recipe at ``path``.

    Args:
        path: YAML recipe file.
        overrides: ``key.path=value`` strings (the CLI's ``--set``), applied in order before
            validation; ``value`` is parsed as YAML, so ``0.4`` is a float and ``[1, 2]`` a list.
        choices: the registries' names (criteria, runtimes, group kinds) to check against
            (``vitopt.stages.recipe_choices()``); None leaves names to the registries at run time.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        VitoptError: the file is missing or unreadable, is not valid YAML, is not a mapping, an
            override is malformed or names a missing list index, or the recipe breaks the schema.
    """
    path = Path(path)
    text = _read(path)
    tree, data = _parse(path, text)
    if not isinstance(data, dict):
        raise VitoptError(f"{path}:1: the recipe must be a mapping with keys such as model, data and stages, "
                          f"not {_kind(data)}.")
    data, set_paths = apply_overrides(data, overrides)
    try:
        return Recipe.model_validate(data, context={"choices": choices} if choices else None)
    except ValidationError as e:
        raise VitoptError(_explain(e, data, path, tree, set_paths)) from None
    except RecursionError:
        raise VitoptError(f"{path}:1: the recipe is nested too deeply to validate.") from None


def apply_overrides(data: dict, overrides: Iterable[str] | None) -> tuple[dict, list[PathT]]:
    """Apply ``key.path=value`` overrides to ``data`` in place, in order.

    Paths use dots for mapping keys and ``[i]`` or ``.i`` for list indices (``stages[2].lr``,
    ``stages.2.lr``; negative indices count from the end). Missing mapping keys are created.

    Returns:
        ``data`` and the normalized path of each override (non-negative indices).

    Raises:
        VitoptError: naming the override when it is not ``key=value``, its value is not YAML, an
            index is out of range, or the path runs through a value that is neither a mapping nor a list.
    """
    set_paths = []
    for item in overrides or ():
        keys, value = _parse_override(item)
        set_paths.append(_set(data, keys, value, item))
    return data, set_paths


def recipe_json_schema(choices: Choices | None = None) -> dict:
    """JSON Schema of a recipe (YAML keys, i.e. aliases such as ``lambda``), for editors and docs.

    With ``choices`` the registry-backed fields list their allowed values as ``enum``: ``prune.criterion``,
    ``prune.groups`` items, ``validate.runtimes`` items and the VTP ``groups`` items.
    """
    schema = Recipe.model_json_schema(by_alias=True)
    if choices is not None:
        defs = schema.get("$defs", {})
        _enum(defs, "PruneStage", "criterion", list(choices.criteria))
        _enum(defs, "PruneStage", "groups", list(choices.group_kinds), items=True)
        _enum(defs, "SparseTrainStage", "groups", [k for k in choices.group_kinds if k not in ("embed", "blocks")],
              items=True)
        _enum(defs, "ValidateStage", "runtimes", list(choices.runtimes), items=True)
    return schema


def _enum(defs: dict, model: str, prop: str, values: list[str], items: bool = False) -> None:
    """Add ``enum`` to property ``prop`` of ``$defs[model]`` (to its items for a list)."""
    node = defs.get(model, {}).get("properties", {}).get(prop)
    if node is None:
        return
    (node.setdefault("items", {}) if items else node)["enum"] = values


def dump_resolved(recipe: Recipe) -> str:
    """YAML of ``recipe`` with every default filled in, as written to the run directory.

    Keys use their YAML spelling (``lambda``) and each stage starts with its ``type``; loading the
    result gives an equal :class:`Recipe`.
    """
    data = recipe.model_dump(mode="json", by_alias=True)
    data["data"] = _type_first(data["data"])
    data["stages"] = [_type_first(s) for s in data["stages"]]
    # timm kwargs as given: JSON mode would turn non-string keys of nested dicts into strings
    data["model"]["kwargs"] = _plain(recipe.model.kwargs)
    for stage in data["stages"]:            # vtp's flat keys are an error under any other method
        if stage.get("type") == "sparse_train" and stage.get("method") != "vtp":
            for key in _VTP_KEYS.values():
                stage.pop(key, None)
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def _plain(obj: Any) -> Any:
    """``obj`` with tuples as lists (YAML-safe), dict keys and values otherwise unchanged."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def format_path(path: Iterable[Key]) -> str:
    """Render a key path as ``stages[2].target.flops``."""
    out = ""
    for key in path:
        out += f"[{key}]" if isinstance(key, int) else (f".{key}" if out else str(key))
    return out


# ----------------------------------------------------------------------------- reading


def _read(path: Path) -> str:
    """Return the text of ``path``; raise VitoptError when it is missing, a directory or not UTF-8."""
    if not path.exists():
        raise VitoptError(f"recipe file {path} does not exist.")
    if not path.is_file():
        raise VitoptError(f"recipe file {path} is not a regular file.")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise VitoptError(f"recipe file {path} is not UTF-8 text (byte {e.start}).") from None
    except OSError as e:
        raise VitoptError(f"recipe file {path} cannot be read: {e.strerror or e}.") from None


def _parse(path: Path, text: str) -> tuple[yaml.Node | None, Any]:
    """Compose (for line numbers) and safe-load ``text``; raise VitoptError on any YAML problem."""
    try:
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise VitoptError(f"{path}{line}: the file is not valid YAML: {problem}.") from None
    except RecursionError:
        raise VitoptError(f"{path}: the YAML is nested too deeply.") from None
    _check_duplicates(path, tree)
    return tree, data


def _check_duplicates(path: Path, node: yaml.Node | None) -> None:
    """Raise VitoptError for a key repeated in one mapping (safe_load would silently keep the last)."""
    stack: list[tuple[yaml.Node, PathT]] = [(node, ())] if node is not None else []
    while stack:
        node, at = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value != "<<":
                    if k.value in seen:
                        raise VitoptError(f"{path}:{k.start_mark.line + 1}: {format_path((*at, k.value))}: key "
                                          f"{k.value!r} appears twice in the same mapping (allowed: each key once).")
                    seen.add(k.value)
                    stack.append((v, (*at, k.value)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((v, (*at, i)) for i, v in enumerate(node.value))


def _kind(value: Any) -> str:
    """A short name of a YAML value's kind for messages ('a list', 'empty', 'a string')."""
    if value is None:
        return "empty"
    return {list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number",
            dict: "a mapping"}.get(type(value), f"a {type(value).__name__}")


# ----------------------------------------------------------------------------- overrides


def _parse_override(item: Any) -> tuple[list[Key], Any]:
    """Split ``a.b[2].c=value`` into ``['a', 'b', 2, 'c']`` and the YAML-parsed value."""
    if not isinstance(item, str) or "=" not in item:
        raise VitoptError(f"override {item!r} is not of the form key.path=value (e.g. stages[2].target.flops=0.4).")
    key, raw = item.split("=", 1)
    key = key.strip()
    keys: list[Key] = []
    pos = 0
    for m in _SEGMENT.finditer(key):
        if m.start() != pos:
            break
        name, index = m.groups()
        if index is None:
            name = name.strip()
            index = name if name.isascii() and name.isdigit() else None
        keys.append(int(index) if index is not None else name)
        pos = m.end()
    if not keys or pos != len(key) or any(k == "" for k in keys):
        raise VitoptError(f"override {item!r} has a malformed key path {key!r} "
                          f"(allowed: names separated by '.', list indices as [i] or .i).")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise VitoptError(f"override {item!r} has a value that is not valid YAML: "
                          f"{getattr(e, 'problem', None) or e}.") from None
    return keys, value


def _set(data: dict, keys: list[Key], value: Any, item: str) -> PathT:
    """Set ``value`` at ``keys`` inside ``data``, creating mappings; return the normalized path."""
    node: Any = data
    done: list[Key] = []
    for i, key in enumerate(keys):
        if isinstance(node, list):
            if not isinstance(key, int):
                raise VitoptError(f"override {item!r}: {format_path(done)} is a list, so {key!r} must be an index "
                                  f"(allowed: 0 to {len(node) - 1}).")
            if not -len(node) <= key < len(node):
                raise VitoptError(f"override {item!r}: index {key} is out of range for {format_path(done)} "
                                  f"(allowed: 0 to {len(node) - 1}).")
            key %= len(node)
        else:
            key = str(key)
        done.append(key)
        if i == len(keys) - 1:
            node[key] = value
            break
        child = node.get(key) if isinstance(node, dict) else node[key]
        if child is None and isinstance(node, dict):
            child = node[key] = {}
        if not isinstance(child, (dict, list)):
            raise VitoptError(f"override {item!r}: {format_path(done)} is {_kind(child)}, not a mapping or list, "
                              f"so it has no key {keys[i + 1]!r}.")
        node = child
    return tuple(done)


# ----------------------------------------------------------------------------- pydantic errors


_KIND_TEXT = {
    "int_parsing": "expected an integer", "int_type": "expected an integer",
    "int_from_float": "expected a whole number", "float_parsing": "expected a number",
    "float_type": "expected a number", "finite_number": "expected a finite number",
    "bool_parsing": "expected true or false", "bool_type": "expected true or false",
    "string_type": "expected a string", "dict_type": "expected a mapping", "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping", "list_type": "expected a list",
    "tuple_type": "expected a list", "path_type": "expected a path string", "none_required": "expected null",
}
_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
_BOUND_TYPES = {"greater_than": "small", "greater_than_equal": "small", "less_than": "large",
                "less_than_equal": "large"}


def _explain(exc: ValidationError, data: dict, file: Path, tree: yaml.Node | None,
             set_paths: list[PathT]) -> str:
    """One sentence for a ValidationError: location, key path, problem, allowed values, count of others."""
    errors = _clean(exc.errors(include_url=False), data)
    path, err = errors[0]
    where = f"{file} (from --set)" if _from_set(path, set_paths) else f"{file}:{_line(tree, path)}"
    what = _describe(err, path, data)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    key = format_path(path)
    return f"{where}: {key + ': ' if key else ''}{what}{more}."


def _clean(errors: list[dict], data: dict) -> list[tuple[PathT, dict]]:
    """Map each error's ``loc`` to a key path; drop union noise ('wrong kind' errors of other members)."""
    out = []
    for err in errors:
        path, union_at = _key_path(err["loc"], data)
        if err["type"] == "stage_order":
            path = ("stages", err["ctx"]["index"])
        elif err["type"] == "invalid_key" or "[key]" in err["loc"]:
            path = path[:-1]  # a bad mapping key: point at the mapping, the message names the key
        out.append((path, union_at, err))
    specific = {u for _, u, e in out if u is not None and not e["type"].endswith("_type")}
    out = [(path, union_at, err) for path, union_at, err in out
           if not (union_at in specific and err["type"].endswith("_type"))]
    # a value-or-keyword union (``0.5`` or ``'auto'``): one error for both members
    keyword = {u: e for _, u, e in out if u is not None and e["type"] == "literal_error"}
    cleaned = []
    for path, union_at, err in out:
        other = union_at in keyword and err is not keyword[union_at]
        if err["type"] == "literal_error" and any(u == union_at and e is not err for _, u, e in out):
            continue                               # the other member's error says more
        if other and err["type"] in _KIND_TEXT:    # wrong kind for both members: name both
            err = {**err, "or_literal": keyword[union_at].get("ctx", {}).get("expected")}
        cleaned.append((path, err))
    return cleaned


def _key_path(loc: tuple, data: Any) -> tuple[PathT, PathT | None]:
    """Turn a pydantic ``loc`` into a key path of the input, dropping union member labels.

    Pydantic inserts one component after a union: the tag for a discriminated union
    (``stages.2.prune.target``) or a member label for a plain one (``round_to.constrained-int``),
    plus ``[key]`` for a mapping key. Returns the path and, for a plain union, where it is.
    """
    path: list[Key] = []
    union_at, skip = None, False
    for comp in loc:
        if skip:
            skip = False
            continue
        if comp == "[key]":
            continue
        path.append(comp)
        members = _union_members(_type_at(path, data))
        if members > 1 and not _is_tagged(_type_at(path, data)):
            union_at = tuple(path)
        skip = members > 1
    return tuple(path), union_at


def _child(node: Any, key: Key) -> Any:
    """``node[key]`` for a mapping or list, else None."""
    if isinstance(node, dict):
        return node.get(key)
    if isinstance(node, list) and isinstance(key, int) and -len(node) <= key < len(node):
        return node[key]
    return None


def _from_set(path: PathT, set_paths: list[PathT]) -> bool:
    """True when ``path`` is at or below a value that an override set."""
    return any(path[:len(p)] == p for p in set_paths)


def _line(tree: yaml.Node | None, path: PathT) -> int:
    """1-based line of the key at ``path`` in the composed YAML, or of its nearest present parent."""
    if tree is None:
        return 1
    node, line = tree, tree.start_mark.line + 1
    for key in path:
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)]
            if not match:
                break
            line, node = match[-1][0].start_mark.line + 1, match[-1][1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line


# ----------------------------------------------------------------------------- describing one error


def _describe(err: dict, path: PathT, data: dict) -> str:
    """What was wrong with one error, and what is allowed."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "stage_order":
        return ctx["reason"]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = ", ".join(re.findall(r"'([^']*)'", ctx.get("expected_tags", ""))) or _tags(path, data)
        what = "stage type" if path[:1] == ("stages",) else "type"
        if kind == "union_tag_not_found":
            return f"missing key 'type' (allowed: {tags})"
        tag = value.get("type") if isinstance(value, dict) else ctx.get("tag")
        close = difflib.get_close_matches(str(tag), [t.strip() for t in tags.split(",")], n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown {what} {_show(tag)} ({hint}allowed: {tags})"
    if kind == "extra_forbidden":
        return _unknown_key(path, data)
    if kind == "missing":
        return "this required key is missing"
    if kind == "literal_error":
        allowed = ", ".join(f"'{v}'" for v in re.findall(r"'([^']*)'", ctx.get("expected", "")))
        key = "key " if "[key]" in err["loc"] else ""
        return f"{key}{_show(value)} is not allowed (allowed: {allowed or ctx.get('expected', '?')})"
    if kind in _BOUND_TYPES:
        return f"{_show(value)} is too {_BOUND_TYPES[kind]} (allowed: {_bounds(path, data, ctx)})"
    if kind in ("value_error", "assertion_error"):
        return str(ctx.get("error", err["msg"])).rstrip(".")
    if kind == "too_short":
        return f"expected at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "too_long":
        return f"expected at most {ctx.get('max_length')} item(s), got {ctx.get('actual_length')}"
    if kind == "string_pattern_mismatch":
        return (f"{_show(value)} is not allowed (allowed: letters, digits, '.', '_' and '-', "
                f"starting with a letter or digit)")
    if kind == "invalid_key":
        return f"key {_show(value)} is not allowed (allowed: string keys)"
    if kind in _KIND_TEXT and "[key]" in err["loc"]:
        return f"key {_show(value)} is not allowed ({_KIND_TEXT[kind].replace('expected', 'allowed:')})"
    if kind in _KIND_TEXT:
        alternative = f" or {err['or_literal']}" if err.get("or_literal") else ""
        return f"{_KIND_TEXT[kind]}{alternative}, got {_show(value)}"
    msg = err["msg"][:1].lower() + err["msg"][1:]
    return f"{msg.rstrip('.')} (got {_show(value)})"


def _unknown_key(path: PathT, data: dict) -> str:
    """Message for a key the model does not have, with a did-you-mean or the allowed keys."""
    model = _model(_type_at(path[:-1], data), _child_at(path[:-1], data))
    key = str(path[-1])
    if model is None:
        return f"unknown key {key!r}"
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    if close:
        return f"unknown key {key!r} (did you mean {close[0]!r}?)"
    return f"unknown key {key!r} (allowed: {', '.join(names)})"


def _bounds(path: PathT, data: dict, ctx: dict) -> str:
    """Both bounds of a number field when the schema has them (``> 0 and <= 1``), else the broken one."""
    found: dict[str, Any] = {}
    model = _model(_type_at(path[:-1], data), _child_at(path[:-1], data)) if path else None
    field = _field(model, path[-1]) if model is not None else None
    for meta in field.metadata if field is not None else ():
        for name in _BOUNDS:
            if getattr(meta, name, None) is not None:
                found[name] = getattr(meta, name)
    if not found:
        found = {k: v for k, v in ctx.items() if k in _BOUNDS}
    return " and ".join(f"{_BOUNDS[k]} {v}" for k, v in sorted(found.items(), key=lambda kv: kv[0][0] != "g"))


def _tags(path: PathT, data: dict) -> str:
    """Allowed ``type`` values of the tagged union at ``path``."""
    tp = _strip(_type_at(path, data))
    members = [m for m in get_args(tp) if _is_model(m)] if _is_union(tp) else []
    return ", ".join(m.model_fields["type"].default for m in members if "type" in m.model_fields)


def _show(value: Any, limit: int = 40) -> str:
    """Short repr of a user value for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- schema walking


def _type_at(path: Iterable[Key], data: Any) -> Any:
    """The annotation the schema gives the value at ``path`` (None when the path leaves the schema)."""
    tp, node = Recipe, data
    for key in path:
        tp = _strip(tp)
        if _is_union(tp):
            tp = _pick(tp, node)
        if _is_model(tp):
            field = _field(tp, key)
            tp = field.annotation if field is not None else None
        elif get_origin(tp) in (list, tuple) and get_args(tp):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict and get_args(tp):
            tp = get_args(tp)[1]
        else:
            return None
        node = _child(node, key)
    return tp


def _child_at(path: Iterable[Key], data: Any) -> Any:
    """The input value at ``path`` (None when absent)."""
    for key in path:
        data = _child(data, key)
    return data


def _model(tp: Any, node: Any) -> type[BaseModel] | None:
    """The model class ``tp`` denotes for the input ``node`` (picking a union member), or None."""
    tp = _strip(tp)
    if _is_union(tp):
        tp = _strip(_pick(tp, node))
    return tp if _is_model(tp) else None


def _pick(tp: Any, node: Any) -> Any:
    """The member of union ``tp`` that fits ``node``: by ``type`` tag, else by container kind."""
    members = [_strip(a) for a in get_args(tp) if a is not type(None)]
    tag = node.get("type") if isinstance(node, dict) else None
    for m in members:
        if _is_model(m) and "type" in m.model_fields and m.model_fields["type"].default == tag:
            return m
    for m in members:
        if isinstance(node, dict) and (get_origin(m) is dict or _is_model(m)):
            return m
        if isinstance(node, list) and get_origin(m) in (list, tuple):
            return m
    return members[0] if len(members) == 1 else None


def _field(model: type[BaseModel], key: Key):
    """The FieldInfo of ``model`` named ``key`` by name or alias, or None."""
    for name, field in model.model_fields.items():
        if key in (name, field.alias):
            return field
    return None


def _strip(tp: Any) -> Any:
    """Remove ``Annotated`` wrappers."""
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _union_members(tp: Any) -> int:
    """Number of non-None members of a union annotation (0 when ``tp`` is not a union)."""
    tp = _strip(tp)
    return len([a for a in get_args(tp) if a is not type(None)]) if _is_union(tp) else 0


def _is_tagged(tp: Any) -> bool:
    """True for a union of models (the discriminated unions of stages and data)."""
    tp = _strip(tp)
    return _is_union(tp) and all(_is_model(_strip(a)) for a in get_args(tp) if a is not type(None))


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _type_first(d: dict) -> dict:
    """``d`` with ``type`` and ``name`` as its first keys."""
    head = {k: d[k] for k in ("type", "name") if k in d}
    return {**head, **{k: v for k, v in d.items() if k not in head}}
