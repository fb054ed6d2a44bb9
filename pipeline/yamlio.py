"""YAML as seg3d reads it: config files, `key=value` overrides and a bundle's config.yaml, as the raw mapping that
pipeline/config.py then validates.

Safe types only (yaml.SafeLoader), and no anchors or aliases: an alias is a pointer, so a few hundred bytes of
nested aliases make a document whose every echo (a message quoting the input, a dump) runs to gigabytes (the
"billion laughs"); a seg3d config never needs one, so the first anchor or alias is refused with its line, before the
composer resolves any. A file is read only up to MAX_TEXT_BYTES (a config is a few kB). Every failure is a one-line
Seg3dError naming the source. Nothing here imports torch, so `seg3d train` refuses a broken or hostile config file
before the network libraries load (pipeline/cli.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import Seg3dError, one_line, shown

MAX_TEXT_BYTES = 1 << 20  # a config, preprocessing.json or metadata.json is a few kB; 1 MiB is far past any real one


class AliasRefused(Seg3dError):
    """A YAML anchor (&name) or alias (*name): refused wherever seg3d reads YAML."""


class _NoAliasLoader(yaml.SafeLoader):
    """SafeLoader that stops at the first anchor or alias, before the composer resolves (and so expands) any."""

    source = "YAML"

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            mark = event.start_mark
            raise AliasRefused(
                f"{self.source}: line {mark.line + 1}: YAML anchors and aliases (&name, *name) are not accepted "
                "in seg3d configs; write the values out"
            )
        return super().compose_node(parent, index)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document `text` (from `source`, for messages) as plain Python values; a Seg3dError for an anchor or
    alias, invalid YAML (with its line), a number too long to read, or nesting too deep to build."""
    loader = None
    try:
        loader = _NoAliasLoader(text)  # (the reader refuses control characters already here)
        loader.source = source
        return loader.get_single_data()
    except yaml.reader.ReaderError as err:
        raise Seg3dError(
            f"{source}: not YAML text (control character at offset {err.position}); is it the right file?"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise Seg3dError(f"{source}: not valid YAML{where}; fix the syntax") from None
    except ValueError as err:  # an integer of more than 4300 digits
        raise Seg3dError(f"{source}: a value cannot be read ({one_line(err, 80)})") from None
    except RecursionError:
        raise Seg3dError(f"{source}: nested too deeply to be a seg3d config") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: Path, source: str | None = None, limit: int = MAX_TEXT_BYTES) -> str:
    """A small UTF-8 text file (a config, a bundle's JSON), refused in one line when it is larger than `limit`,
    unreadable or not text."""
    path = Path(path)
    source = source or str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise Seg3dError(f"{source}: cannot be read ({err.strerror or one_line(err, 80)})") from None
    if len(data) > limit:
        raise Seg3dError(f"{source}: larger than {limit // 1024} KiB, which no seg3d config or record is")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise Seg3dError(f"{source}: not UTF-8 text (byte {err.start}); is it the right file?") from None


def config_mapping(text: str, source: str) -> dict[str, Any]:
    """The YAML text of a config (a file, a bundle's config.yaml) as a mapping, before validation."""
    raw = parse_yaml(text, source)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise Seg3dError(f"{source}: a config is a mapping of sections (model:, data:, train:, ...)")
    return raw


def raw_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict[str, Any], str]:
    """The mapping a config file (or none: the defaults) and `key=value` overrides make, and the source to name in
    messages; validated by pipeline.config.config_from_dict."""
    if path is None:
        return apply_overrides({}, list(overrides)), "config"
    path = Path(path)
    if not path.is_file():
        raise Seg3dError(f"config file {path} not found; see configs/ for examples")
    return apply_overrides(config_mapping(read_text(path), str(path)), list(overrides)), str(path)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (["train", "lr"], 0.0003); the value is read as YAML, so lists and nulls work. A value
    that is not YAML stays text; an anchor or alias is refused, as in config files."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise Seg3dError(f"override {shown(text)} is not key=value (e.g. train.epochs=5)")
    try:
        parsed = parse_yaml(value, f"override {shown(text)}") if value.strip() else None
    except AliasRefused:
        raise
    except Seg3dError:
        parsed = value
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise Seg3dError(f"override {shown(text)}: {shown(part)} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw
