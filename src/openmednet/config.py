"""Frozen configuration dataclasses and ``load_config``: defaults < YAML file < ``--set`` < flags.

A config object stops at the composition root (the CLI command or ``run_*`` function), which builds
the parts and passes them plain arguments; nothing deeper reads a config.

Example:
    >>> cfg = load_config(MyConfig, "run.yaml", ["optim.lr=0.1", "epochs=3"])
    >>> cfg = load_config(MyConfig, "run.yaml", cli_overrides(["epochs=3"], {"out": Path("runs/a #1")}))
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from openmednet._errors import did_you_mean

T = TypeVar("T")


def _parse_scalar(text: str) -> Any:
    """Parse an override value with YAML rules (``1e-3`` -> float, ``true`` -> bool, ``[1,2]`` -> list)."""
    value = yaml.safe_load(text)
    # YAML reads "1e-3" as a string; users mean a float. A quoted value ('"2024"') stays a string.
    if isinstance(value, str) and not text.strip().startswith(("'", '"')):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"override '{dotted}': '{key}' is a value, not a section")
    node[keys[-1]] = value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error as one line, ``"<problem> (line L, column C)"``: its own text names no file."""
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return f"{getattr(e, 'problem', None) or e}{where}"


def _as_int(value: Any) -> int:
    """``value`` for an ``int`` field: an int, or a float without a fraction (``--set epochs=1e1``)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        # Unchecked, "abc" reached __post_init__'s comparisons as a TypeError traceback.
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _is_tuple_hint(hint: Any) -> bool:
    """Whether ``hint`` is ``tuple[...]`` or an optional one (``tuple[str, ...] | None``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple_hint(h) for h in typing.get_args(hint))
    return hint is tuple or typing.get_origin(hint) is tuple


def _coerce(value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if _is_tuple_hint(hint) and value is not None and not isinstance(value, (list, tuple)):
        # A string was iterated: "semi: freematch" became the methods f, r, e, e... ("semi repeats
        # ['e']") and "--set unlabelled=DIR" the folders D, I, R ("/" read the whole disk).
        raise ValueError(f"expected a list, got {value!r}: write [{value}]")
    if hint is int or (origin in (typing.Union, types.UnionType) and set(args) == {int, type(None)} and value is not None):
        return _as_int(value)
    if origin is tuple and isinstance(value, list):
        return tuple(_as_int(v) for v in value) if args and args[0] is int else tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and (hint is float or (origin in (typing.Union, types.UnionType) and float in typing.get_args(hint))):
        # YAML 1.1 reads "1e-4" (no dot) as a string: a float field means a number.
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if hint is Path and isinstance(value, str):
        return Path(value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a nested mapping, rejecting unknown keys with a suggestion."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise KeyError(
                f"unknown config key '{prefix}{key}'{did_you_mean(key, fields)} "
                f"(valid keys of {cls.__name__}: {', '.join(fields)})"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = from_dict(hint, value, prefix=f"{prefix}{key}.")
        try:
            kwargs[key] = _coerce(value, hint)
        except ValueError as e:
            raise ValueError(f"config key '{prefix}{key}': {e}") from None
    required = [name for name, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [f"{prefix}{name}" for name in required if name not in kwargs]
    if missing:  # the dataclass's own TypeError named no config key and reached the user as a traceback
        raise ValueError(f"missing required config key(s) {', '.join(missing)} of {cls.__name__}")
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-types dict of a config dataclass (Paths become strings, tuples lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A ``to_dict`` tree with its sections flattened: ``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_fields(before: Mapping[str, Any], now: Mapping[str, Any], ignore: Sequence[str] = ()) -> list[str]:
    """The sorted (dotted) keys whose values differ between two ``to_dict`` trees, a key missing on
    one side included: the one comparison behind every refusal of a run or study folder that holds
    the work of another configuration (fine-tuning runs, study parts, resumed pre-training)."""
    a, b = dotted(before), dotted(now)
    return sorted(k for k in a.keys() | b.keys() if k not in ignore and a.get(k) != b.get(k))


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Resolve a config: dataclass defaults < YAML file at ``path`` < ``key.sub=value`` overrides.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        KeyError: a key is not a field (the message suggests the closest one).
        ValueError: the file or an override value is not valid YAML, an override is not of the form
            ``key=value``, a required key is missing, or an integer field gets another value.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"config file {path} is not valid YAML: {_yaml_problem(e)}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        tree = loaded
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override '{item}' must look like key=value, e.g. optim.lr=0.1")
        key, text = item.split("=", 1)
        try:
            value = _parse_scalar(text)
        except yaml.YAMLError as e:
            raise ValueError(f"override '{item}': the value is not valid YAML ({_yaml_problem(e)}); "
                             f"quote it to pass a string") from None
        _set_dotted(tree, key.strip(), value)
    return from_dict(cls, tree)


def cli_overrides(set_: Sequence[str] = (), flags: Mapping[str, Any] | None = None) -> list[str]:
    """Overrides for ``load_config`` under the command line's one precedence rule:
    dataclass defaults < YAML file < ``--set key=value`` < explicit flags (``--out``, ``--epochs``).

    A flag is the most specific thing a user typed, so it wins over a ``--set`` of the same key
    (``openmednet finetune --set epochs=5 --epochs 2`` runs 2 epochs, as ``pretrain`` does). Every
    command builds its overrides here, so they cannot disagree again.

    Args:
        set_: the ``--set`` items, in the order given (a later one wins).
        flags: config key (dotted for sections: ``"objective.kind"``) -> flag value; ``None`` and
            an empty repeated option mean "not given" and are left out.

    Returns:
        ``key=value`` items: ``set_`` first, then the flags. Flag values are JSON-encoded, which
        YAML reads back verbatim: strings and paths stay strings (``"2024"``, ``"runs/a #1"``),
        lists stay lists of strings, booleans and numbers stay themselves.
    """
    out = list(set_)
    for key, value in (flags or {}).items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if isinstance(value, (list, tuple)):
            value = [str(v) if isinstance(v, Path) else v for v in value]
        elif isinstance(value, Path):
            value = str(value)
        out.append(f"{key}={json.dumps(value)}")
    return out


def save_config(cfg: Any, path: str | Path) -> None:
    """Write ``cfg`` as YAML atomically (temporary file, then rename)."""
    from openmednet.utils import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
