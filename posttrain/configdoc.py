"""`posttrain config show --doc [SECTION]`: every key of a recipe with its type, default and help, read from the
config dataclasses themselves (their `field_doc`s), so the reference cannot drift from the code.

    optim.lr: float = 1e-05
        peak learning rate

Sections are the recipe's top-level keys; `objectives` lists every registered objective's own settings
(`objectives.<name>.*`, where <name> is the objective's registered name, or any name with `type:` set to it);
`stages` lists a stage's own keys (its train, optim, ... take the top-level sections' keys). A SECTION may be any
dotted prefix: `rollout.sampling`, `objectives.grpo`.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from posttrain.configlib import ConfigError


def recipe_doc(section: str = "") -> str:
    """The reference of every recipe key, or of the keys under `section` (ConfigError for an unknown one)."""
    entries = recipe_entries()
    if section:
        entries = [e for e in entries if e[0] == section or e[0].startswith(section + ".")]
        if not entries:
            tops = sorted({e[0].split(".")[0] for e in recipe_entries()})
            raise ConfigError(f"--doc: no recipe key {section!r}; sections: {', '.join(tops)} (or a dotted prefix, "
                              "e.g. rollout.sampling, objectives.grpo)")
    return "\n".join(f"{key}: {kind}{'' if default is None else ' = ' + default}\n    {doc}"
                     for key, kind, default, doc in entries) + "\n"


def recipe_entries() -> list[tuple[str, str, str | None, str]]:
    """(dotted key, type, default or None when it is a section or required, help) for every recipe key."""
    from posttrain.config import _SECTION_TYPES, STAGE_SECTIONS, StageConfig, _RecipeFile
    from posttrain.objectives import OBJECTIVES
    from posttrain.rewarding import RewardSpec

    listed = {"rewards": RewardSpec, "stages": StageConfig}
    out = []
    hints = typing.get_type_hints(_RecipeFile)
    for f in dataclasses.fields(_RecipeFile):
        doc = f.metadata.get("doc", "")
        if f.name == "objectives":
            out.append(("objectives", "mapping: name -> settings", None, doc + "; `type` picks the registered "
                        "objective (default: the name itself)"))
            for name in OBJECTIVES.names():
                cls = OBJECTIVES.get(name).config_cls
                out.append((f"objectives.{name}", cls.__name__, None, _summary(cls)))
                out += dataclass_entries(cls, f"objectives.{name}")
        elif f.name in listed:
            cls = listed[f.name]
            out.append((f.name, f"list of {cls.__name__}", None, f"{doc} ({_summary(cls)})"))
            skip = set(STAGE_SECTIONS) | {"rewards"} if cls is StageConfig else set()
            out += dataclass_entries(cls, f"{f.name}.N", skip)
        else:
            cls = _SECTION_TYPES.get(f.name) or _dataclass_in(hints[f.name])
            if cls is None:
                out.append((f.name, type_name(hints[f.name]), _default(f), doc))
            else:
                out.append((f.name, cls.__name__, None, f"{doc} ({_summary(cls)})"))
                out += dataclass_entries(cls, f.name)
    return out


def dataclass_entries(cls: type, prefix: str, skip: set[str] = frozenset()) -> list[tuple[str, str, str | None, str]]:
    """The fields of config dataclass `cls` under `prefix`, recursing into nested config dataclasses; the fields in
    `skip` are listed as taking their top-level section's keys."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name == "type":
            continue
        key, doc = f"{prefix}.{f.name}", f.metadata.get("doc", "")
        nested = _dataclass_in(hints[f.name])
        if f.name in skip:
            how = (f"a list as the top-level `{f.name}:`, replacing it" if typing.get_origin(hints[f.name]) is list
                   else f"the keys of the top-level `{f.name}:`, deep-merged over it")
            out.append((key, type_name(hints[f.name]), None, f"{doc}; {how} for this stage"))
        elif nested is not None:
            out.append((key, type_name(hints[f.name]), _default(f) if _default(f) == "null" else None,
                        f"{doc} ({_summary(nested)})"))
            out += dataclass_entries(nested, key)
        else:
            out.append((key, type_name(hints[f.name]), _default(f), doc))
    return out


def type_name(tp: Any) -> str:
    """A type as a reader writes it: `float`, `int | null`, `cosine | linear`, `list of RewardSpec`.

    >>> type_name(Literal["a", "b"] | None), type_name(dict[str, float]), type_name(tuple[float, float])
    ('a | b | null', 'mapping of str -> float', '[float, float]')
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is tuple:
        return f"[{', '.join(type_name(a) for a in args)}]"
    if origin is dict:
        return f"mapping of {type_name(args[0])} -> {type_name(args[1])}"
    return getattr(tp, "__name__", str(tp))


def _dataclass_in(tp: Any) -> type | None:
    """The config dataclass a field holds (also inside `X | None`), else None."""
    candidates = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        Union, types.UnionType) else [tp]
    found = [c for c in candidates if dataclasses.is_dataclass(c)]
    return found[0] if len(found) == 1 and len(candidates) == 1 else None


def _default(f: dataclasses.Field) -> str | None:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "(required)"
    from posttrain.configlib import to_dict

    return _yaml(to_dict(value))


def _yaml(value: Any) -> str:
    import yaml

    return "null" if value is None else yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix(
        "\n...").removesuffix(" ...")


def _summary(cls: type) -> str:
    return (cls.__doc__ or cls.__name__).strip().splitlines()[0].rstrip(".")
