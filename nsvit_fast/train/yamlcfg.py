"""YAML run files: the run's inputs (model, data, out...) plus FinetuneConfig fields, ``key=value`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import check_type
from ..errors import NsvitError, check_count
from .engine import FinetuneConfig, make_config

RUN_KEYS = {"model": None, "checkpoint": None, "use_ema": False, "pretrained": False, "random_init": False,
            "num_classes": None, "img_size": None, "mean": None, "std": None,
            "data": "digits:train",
            "val_data": None, "max_images": None, "out": None, "on_bad_image": "error"}
RUN_TYPES = {"model": str | None, "checkpoint": str | None, "use_ema": bool, "pretrained": bool, "random_init": bool,
             "num_classes": int | None, "img_size": int | None, "mean": list[float] | None, "std": list[float] | None,
             "data": str | None, "val_data": str | None, "max_images": int | None, "out": str | None,
             "on_bad_image": str}
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # shipped as package data (nsvit_fast/configs)


def _loader():
    """PyYAML's SafeLoader, reading numbers as YAML 1.2 does: ``1e-4`` is a number, not the string
    PyYAML 1.1 makes of it (it wants ``1.0e-4``), since that is how people write learning rates;
    ``1_0`` and ``010`` are not the integers 10 and 8, nor ``1_0.5`` the float 10.5 (``-.5`` is
    -0.5). A repeated key is an error."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # YAML forbids a repeated key; PyYAML keeps the last one, so a second `synth:` block
            # would replace the first without a word
            # checked before merge keys (<<: *base) are flattened in: a key given beside one overrides it
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:  # a list or mapping as a key: the set below would raise a bare TypeError
                    raise yaml.constructor.ConstructorError(
                        None, None, f"found unhashable key (line {key_node.start_mark.line + 1}): keys are names",
                        key_node.start_mark) from None
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1}): each key may be "
                                    f"given once", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] not in ("tag:yaml.org,2002:float", "tag:yaml.org,2002:int")]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    # YAML 1.2 integers: 1_0 (10) and 010 (octal 8) are YAML 1.1's, read here as strings (so refused as counts)
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+)$"),
                                 list("-+0123456789"))
    # YAML 1.2 floats, with a point or an exponent (010 is no number): -.5 is one, 1_0.5 is not
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"""^(?:
         [-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9]+[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""", re.X), list("-+0123456789."))
    return Loader


def load_yaml(text: str):
    """``text`` read as YAML with :func:`_loader`'s floats; yaml.YAMLError on bad YAML."""
    import yaml

    return yaml.load(text, Loader=_loader())  # a SafeLoader: no tags beyond the standard ones


def packaged_configs() -> list[str]:
    """Names of the YAML run files that ship with the package (``digits``, ``vit_s_imagenet``...)."""
    return sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))


def find_config(name: str) -> Path:
    """The YAML file ``name`` names: an existing path (relative to the working directory or absolute)
    first, else a packaged config by name (``digits``, ``digits.yaml``), which also answers the old
    ``configs/digits.yaml`` spelling from a checkout's top level. Raises NsvitError naming the
    packaged configs when none is found."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if p.parent in (Path("."), Path("configs")):  # a bare name, or configs/<name> from before they moved
        for cand in (CONFIG_DIR / p.name, CONFIG_DIR / f"{p.name}.yaml"):
            if cand.is_file():
                return cand
    if p.is_dir():  # "not found" sent people looking for a file that is there (a ./digits folder still
        # lets --config digits name the packaged one, above)
        raise NsvitError(f"config {name!r} is a folder: give a YAML file in it, or a packaged config "
                         f"({', '.join(packaged_configs()) or 'none'})")
    raise NsvitError(f"config {name!r} not found (a YAML path, or one of: {', '.join(packaged_configs()) or 'none'})")


def _check_keys(raw: dict) -> None:
    """An unknown top-level key, named with its nearest among the run keys and the FinetuneConfig
    fields (the config's own check knew only the fields: 'chekpoint' got 'checkpoint_every')."""
    import dataclasses
    import difflib

    from .methods import moved_key_error

    names = sorted({f.name for f in dataclasses.fields(FinetuneConfig)} | set(RUN_KEYS))
    for k in raw:
        if str(k).split(".")[0] in names or moved_key_error(str(k)) is not None:
            continue
        near = difflib.get_close_matches(str(k), names, n=1)
        raise NsvitError(f"unknown finetune key {k!r}" + (f" (did you mean {near[0]!r}?)" if near else
                                                           f" (valid: {', '.join(names)})"))


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["rounds=5", "synth.eps=0.01"]`` -> ``{"rounds": 5, "synth.eps": 0.01}``, each value read
    as YAML. Raises NsvitError for an item without ``key=`` or with a value that is not YAML."""
    import yaml

    out = {}
    for it in items:
        key, eq, val = it.partition("=")
        key = key.strip()
        if not eq or not key:
            raise NsvitError(f"override {it!r} must be key=value (e.g. rounds=5 or synth.eps=0.01)")
        if not val.strip():  # an unset shell variable: out= fell back to the default folder
            raise NsvitError(f"override {it!r} has no value (write {key}=null for null)")
        # a key given twice, or a block beside one of its keys: the last one won without a word
        clash = next((k for k in out if k == key or k.startswith(key + ".") or key.startswith(k + ".")), None)
        if clash is not None:
            raise NsvitError(f"override {key!r} is given twice" + ("" if clash == key else f" (also as {clash!r})")
                             + ": give each setting once")
        try:
            out[key] = load_yaml(val)
        except yaml.YAMLError as e:
            raise NsvitError(f"override {it!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    return out


def load_run(path: str | None, overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], FinetuneConfig]:
    """(run inputs, FinetuneConfig) from a YAML file and overrides; unknown keys are named. Paths
    (checkpoint, data, val_data, out) expand a leading ``~``; a relative one is relative to the
    working directory, as a flag's is (not to the YAML file)."""
    import yaml

    raw: dict[str, Any] = {}
    if path:
        p = find_config(path)
        try:
            raw = load_yaml(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise NsvitError(f"{p} is not valid YAML: {str(e).splitlines()[0]}") from None
        except UnicodeDecodeError as e:
            raise NsvitError(f"{p} is not a UTF-8 text file (byte {e.start}): not a YAML config") from None
        except OSError as e:
            raise NsvitError(f"cannot read {p}: {e.strerror or e}") from None
        if not isinstance(raw, dict):
            raise NsvitError(f"{p} must hold a mapping of keys")
    for key, val in (overrides or {}).items():
        if isinstance(raw.get(key), dict) and isinstance(val, dict):  # synth={eps: 0.02}: that key, not the block
            raw[key] = {**raw[key], **val}
        elif isinstance(raw.get(key), dict) and val is None:  # it reset every other key of the config's block
            raise NsvitError(f"{key}=null would drop every {key} setting of the config: change one with "
                             f"{key}.KEY=VALUE, or write the {key} block of a YAML of your own")
        else:
            raw[key] = val
    _check_keys(raw)
    run = {k: check_type(k, raw.pop(k, v), RUN_TYPES[k]) for k, v in RUN_KEYS.items()}
    for k in ("checkpoint", "data", "val_data", "out"):  # as the shell does for flags: ~ is the home folder
        if isinstance(run[k], str) and run[k].startswith("~"):
            run[k] = str(Path(run[k]).expanduser())
    for k in ("num_classes", "img_size", "max_images"):
        if run[k] is not None:
            run[k] = check_count(k, run[k])  # >= 1 and not past 2**31 - 1 (1e20 failed later, naming another key)
    return run, make_config(None, raw)
