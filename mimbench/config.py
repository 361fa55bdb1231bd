"""Config files (mmengine ``Config``) and ``--set key=value`` overrides.

Every pre-training and evaluation setting lives in an mmengine config file (``.py`` with
``_base_`` inheritance). Command-line overrides are merged with
``Config.merge_from_dict`` after their values are parsed (:func:`parse_override`: Python
literals, and ``true``/``false``/``null`` in any case as mmengine's ``DictAction`` reads them),
and an override naming a key that the config does not have is refused before
any work starts (a typo would otherwise silently train with the default).
"""
from __future__ import annotations

import ast
import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from mimbench.errors import MimbenchError
from mimbench.paths import config_by_name
from mimbench.schema import knows_key, missing_defaults, validate


#: Words read as constants whatever their case, as mmengine's ``DictAction`` does (``--set progress=false``
#: must give False: the string 'false' would be truthy). Unlike DictAction, lower-case ``none`` stays a string:
#: it is a value of some knobs (``model.target_norm=none``: no target normalisation), where None would mean
#: "the default". Python's ``None`` and ``null`` give None.
_WORDS = {"true": True, "false": False, "null": None}


def parse_value(raw: str) -> Any:
    """One override value: a Python literal (``3``, ``1e-3``, ``[1, 2]``, ``'x'``, ``True``, ``None``), else
    ``true``/``false``/``null`` in any case, else the text itself (stripped)."""
    text = raw.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # e.g. {[1]: 2}: unhashable key
        pass
    if text.lower() in _WORDS:
        return _WORDS[text.lower()]
    return text


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``"a.b=3"`` into ``("a.b", 3)``; the value is read by :func:`parse_value`.

    ``x=false`` gives False, ``x=null`` None, ``x=1e-3`` 0.001, ``x=[1,2]`` a list, ``x=adamw`` the string.
    """
    if "=" not in item:
        raise MimbenchError(f"Override {item!r} is not of the form key=value.",
                            "Write overrides as --set optim.lr=1e-3 (dotted key, '=', a Python literal).")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise MimbenchError(f"Override {item!r} has an empty key.", "Write --set key=value.")
    return key, parse_value(raw)


def format_value(value: Any) -> str:
    """``value`` written so that :func:`parse_override` reads it back equal (tuples come back as lists).

    Strings are double-quoted JSON (no shell-hostile quoting; every JSON escape means the same in
    Python, and non-ASCII characters stay literal so astral characters are not split into
    surrogates); numbers, booleans and None are Python literals; lists, tuples and dicts recurse.
    """
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and not math.isfinite(value):
        raise MimbenchError(f"The value {value!r} cannot be written as an override.",
                            "Use a finite number.")
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{format_value(k)}:{format_value(v)}" for k, v in value.items()) + "}"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    raise MimbenchError(f"A {type(value).__name__} ({value!r}) cannot be written as an override.",
                        "Overrides hold numbers, strings, booleans, None, lists and dicts.")


def format_override(key: str, value: Any) -> str:
    """``key=value`` that :func:`parse_override` splits back into ``(key, value)``."""
    return f"{key}={format_value(value)}"


def _has_key(cfg: Any, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if isinstance(node, (list, tuple)) and part.isdigit():
            if int(part) >= len(node):
                return False
            node = node[int(part)]
        elif hasattr(node, "keys") and part in node.keys():
            node = node[part]
        else:
            return False
    return True


def load_config(path: str | Path, overrides: Iterable[str] = (), allow_new_keys: bool = False,
                kind: str | None = None):
    """Load an mmengine config and apply ``key=value`` overrides.

    Raises MimbenchError for a missing/unparsable file or an override naming an unknown key. With
    ``kind`` (pretrain, linear, finetune, knn, segment) the merged config is checked against that
    kind's schema (:mod:`mimbench.schema`): unknown keys, wrong types and out-of-range values in the
    file or in the overrides are refused, naming key, value and what is allowed; an override may
    then also set a key the schema knows but the file leaves at its default. Every key the config
    still leaves out then gets its schema default (:func:`mimbench.schema.missing_defaults`), so
    readers use ``cfg.section.key`` directly; :func:`as_written` is the config without them.
    """
    cfg = _read(Path(path))
    parsed = dict(parse_override(o) for o in overrides)
    unknown = [k for k in parsed if not _has_key(cfg, k) and not (kind is not None and knows_key(kind, k))]
    if unknown and not allow_new_keys:
        raise MimbenchError(f"Override key(s) {', '.join(unknown)} do not exist in {path}.",
                            "Check the spelling against the config file (keys are dotted paths, e.g. optim.lr).")
    if parsed:
        try:
            cfg.merge_from_dict(parsed)
        except Exception as exc:  # e.g. a.b=1 where a is not a section
            raise MimbenchError(f"Overrides {', '.join(overrides)} cannot be merged into {path} ({exc}).",
                                "Override leaf keys with values of their type (--set optim.lr=1e-3).") from exc
    if kind is not None:
        validate(cfg.to_dict(), kind, source=str(path), overridden=parsed)
        _fill_defaults(cfg, kind)
    return cfg


def _read(p: Path):
    from mmengine.config import Config  # mmengine's config machinery (yapf, addict): only when a file is read

    if not p.is_file():
        raise MimbenchError(f"Config file {p} does not exist.",
                            "Pass an existing config, e.g. one under eval_configs/ or pretrain/configs/.")
    try:
        with _shipped_bases(Config):
            return Config.fromfile(str(p))
    except MimbenchError:
        raise
    except Exception as exc:  # mmengine raises many types for a broken config
        raise MimbenchError(f"Config file {p} could not be read: {exc}",
                            "Fix the Python syntax of the config file.") from exc


@contextmanager
def _shipped_bases(config_class):
    """Let ``_base_`` name a shipped config as ``--config`` does (``_base_ = ["linear/mae_vit-b_in1k"]``).

    mmengine joins each ``_base_`` entry with the folder of the config naming it (``Config._get_cfg_path``, looked
    up on the class at every use); for one read that lookup is wrapped so that an entry that is no file there is
    taken as a shipped config's name (:func:`mimbench.paths.config_by_name`)."""
    original = config_class.__dict__["_get_cfg_path"]

    def lookup(cfg_path: str, filename: str):
        path, scope = original.__func__(cfg_path, filename)
        if scope is not None or os.path.isfile(path):
            return path, scope
        try:
            return str(config_by_name(cfg_path)), None
        except MimbenchError as exc:
            raise MimbenchError(f"{filename} inherits {cfg_path!r} (_base_), which is neither a file beside it nor "
                                "the name of a config shipped with mimbench.", exc.fix) from None

    config_class._get_cfg_path = staticmethod(lookup)
    try:
        yield
    finally:
        config_class._get_cfg_path = original


#: Where a loaded config remembers what :func:`_fill_defaults` added (an attribute of the object, not a key).
_FILLED = "_mimbench_filled_defaults"


def _fill_defaults(cfg, kind: str) -> None:
    """Add the schema default of every key ``cfg`` leaves out, and remember the keys (and the sections made
    for them) so that :func:`as_written` can take them out again."""
    filled = missing_defaults(cfg.to_dict(), kind)
    sections = {".".join(key.split(".")[:depth]) for key in filled for depth in range(1, key.count(".") + 1)}
    added = list(filled) + [s for s in sections if not _has_key(cfg, s)]
    cfg.merge_from_dict(filled)
    object.__setattr__(cfg, _FILLED, tuple(sorted(added, key=lambda k: -k.count("."))))  # deepest first


def as_written(cfg) -> dict:
    """The config as its files and ``--set`` overrides say it, without the schema defaults that
    :func:`load_config` filled in (a plain dict)."""
    data = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    for dotted in vars(cfg).get(_FILLED, ()) if hasattr(cfg, "__dict__") else ():
        *parents, leaf = dotted.split(".")
        node = data
        for part in parents:
            node = node[part]
        del node[leaf]
    return data


def written_text(cfg) -> str:
    """:func:`as_written` as the text of a config file (a run's ``config.py``): loaded back, it hashes as
    ``cfg`` does (:func:`config_sha256`)."""
    from mmengine.config import Config  # as in _read

    return Config(as_written(cfg), filename=cfg.filename).pretty_text


def config_sha256(cfg) -> str:
    """SHA-256 of the config's resolved content (stable key order), for provenance.

    The hash covers what the config files (``_base_`` included) and the overrides set, not the schema
    defaults :func:`load_config` filled in (:func:`as_written`): a config hashes the same whether it was
    loaded with its kind or without (the pipelines compare both), and an existing run's hash stays valid.
    A config that writes a default out and one that leaves it to the schema hash differently.
    """
    blob = json.dumps(as_written(cfg), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
