"""The stage contract: a typed config, a plain ``run(config)``, atomic outputs and a manifest.

A stage module defines a config dataclass (subclass of :class:`StageConfig`, every field made
with :func:`option` so it carries its help text) and a function decorated with :func:`stage`::

    @dataclass(kw_only=True)
    class GenerateConfig(StageConfig):
        prompts: str = option(help="JSONL file of prompts.", input=True)
        def outputs(self): return {"completions": self.out("completions.jsonl")}

    @stage("generate", GenerateConfig, help="Answer prompts with a model.")
    def run(config: GenerateConfig) -> StageResult: ...

Calling ``run(config)`` hashes the inputs and the config; when ``manifest.json`` in the output
directory records the same hashes and the outputs are intact, the stage is skipped. Otherwise
the old manifest is removed, the body runs (writing its files atomically), and a new manifest
is written last — so a run killed half-way is never mistaken for a finished one.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import json
import logging
import os
import platform
import sys
import time
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from cogumi.io import sha256_path, write_json

log = logging.getLogger("cogumi")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

#: Where each stage lives; imported only when used so that ``import cogumi`` and the CLI stay light.
STAGES: dict[str, str] = {
    "validate": "cogumi.data.validate:run",
    "dedup": "cogumi.data.dedup:run",
    "materialize": "cogumi.models.materialize:run",
    "generate": "cogumi.generation.stage:run",
    "filter-length": "cogumi.data.filters:run_length",
    "filter-language": "cogumi.data.filters:run_language",
    "filter-format": "cogumi.data.filters:run_format",
    "exact-dedup": "cogumi.data.filters:run_exact_dedup",
    "decontaminate": "cogumi.data.decontaminate:run",
    "quality": "cogumi.data.quality:run",
    "judge": "cogumi.evaluate.judge:run",
    "stats": "cogumi.data.stats:run",
    "train": "cogumi.train.sft:run",
    "merge": "cogumi.train.merge:run",
    "eval": "cogumi.evaluate.run:run",
    "eval-score": "cogumi.evaluate.run:run_score",
    "failures": "cogumi.distill.failures:run",
    "cluster-failures": "cogumi.distill.cluster:run",
    "self-consistency": "cogumi.distill.self_consistency:run",
    "cascade": "cogumi.distill.cascade:run",
    "gate": "cogumi.compress.gate:run",
    "prune": "cogumi.compress.prune:run",
    "quantize": "cogumi.compress.quantize:run",
    "export-gguf": "cogumi.export.gguf:run_export_gguf",
    "export-verify": "cogumi.export.gguf:run_export_verify",
    "export-lora": "cogumi.export.gguf:run_export_lora",
    "pack": "cogumi.export.pack:run_pack",
    "unpack": "cogumi.export.pack:run_unpack",
}

#: Distributions whose versions every manifest records (those installed).
TRACKED_PACKAGES = (
    "cogumi", "torch", "transformers", "tokenizers", "accelerate", "peft", "trl", "datasets",
    "bitsandbytes", "llmcompressor", "compressed-tensors", "gguf", "llama_cpp_python", "vllm",
    "unsloth", "datasketch", "zstandard", "openai", "numpy", "ray",
)

_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD")


class ConfigError(ValueError):
    """A config field with a wrong type or value; the message names the config and field."""


class StageError(RuntimeError):
    """A stage that cannot finish for a reason the user can act on (a failed request, a
    checkpoint that does not fit); the CLI prints the message without a traceback."""


def option(
    default: Any = MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = MISSING,
    input: bool | Literal["maybe"] = False,
    positional: bool = False,
    short: str | None = None,
    hashed: bool = True,
) -> Any:
    """A documented config field.

    Args:
        help: what the field means (shown by ``--help`` and in the docs).
        input: ``True`` if the field names a file or directory the stage reads (hashed into
            the manifest; must exist at run time); ``"maybe"`` if it may be a path or a name
            such as a model id (hashed when it is an existing path).
        positional: make it a positional argument on the command line.
        short: a short flag such as ``"-o"``.
        hashed: ``False`` for fields that cannot change the outputs (worker counts, progress
            bars): changing them does not make a finished stage run again.
    """
    metadata = {"help": help, "input": input, "positional": positional, "short": short, "hashed": hashed}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(kw_only=True)
class StageConfig:
    """Base of every stage config: checked on construction, serialisable, hashable."""

    output_dir: str = option(
        help="Directory the stage writes into; its manifest.json is written there last.",
        short="-o",
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _coerce(type(self).__name__, f.name, value, _hints(type(self))[f.name]))
        if not str(self.output_dir).strip():
            raise ConfigError(f"{type(self).__name__}.output_dir: must not be empty")
        self.check()

    def check(self) -> None:
        """Value checks beyond types; subclasses raise :class:`ConfigError` naming the field."""

    def outputs(self) -> dict[str, Path]:
        """The files (or directories) the stage produces, by name; hashed into the manifest."""
        return {}

    def out(self, name: str) -> Path:
        return Path(self.output_dir) / name

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def config_sha256(self) -> str:
        hashed = {
            f.name: _jsonable(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if f.metadata.get("hashed", True) and f.name != "output_dir"
        }
        return hashlib.sha256(json.dumps(hashed, sort_keys=True).encode()).hexdigest()

    def input_paths(self) -> dict[str, Path]:
        """Inputs that are files or directories, by field name (lists expand to name[i])."""
        found: dict[str, Path] = {}
        for f in dataclasses.fields(self):
            kind = f.metadata.get("input", False)
            value = getattr(self, f.name)
            if not kind or value in (None, "", []):
                continue
            values = value if isinstance(value, list) else [value]
            for i, item in enumerate(values):
                key = f.name if not isinstance(value, list) else f"{f.name}[{i}]"
                path = Path(str(item))
                if path.exists():
                    found[key] = path
                elif kind is True:
                    raise ConfigError(
                        f"{type(self).__name__}.{key}: input '{item}' does not exist"
                    )
        return found

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _coerce(owner: str, name: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation ``hint``; convert the lossless cases."""
    where = f"{owner}.{name}"
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(owner, name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        item = args[0] if args else Any
        return [_coerce(owner, f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if isinstance(value, Path):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


# ----------------------------------------------------------------------------- results

@dataclass
class StageResult:
    """What a stage reports. The body fills ``counts`` and ``metrics``; the wrapper the rest."""

    counts: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    stage: str = ""
    output_dir: str = ""
    outputs: dict[str, str] = field(default_factory=dict)
    skipped: bool = False
    duration_s: float = 0.0

    @property
    def manifest_path(self) -> Path:
        return Path(self.output_dir) / MANIFEST


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type[StageConfig]
    body: Callable[[Any], StageResult]
    help: str


def stage(name: str, config_cls: type[StageConfig], *, help: str):
    """Turn ``body(config) -> StageResult`` into a resumable stage with a manifest."""

    def decorate(body: Callable[[Any], StageResult]):
        spec = StageSpec(name, config_cls, body, help)

        @functools.wraps(body)
        def run(config, *, force: bool = False) -> StageResult:
            if not isinstance(config, config_cls):
                raise TypeError(f"{name}: expected {config_cls.__name__}, got {type(config).__name__}")
            return execute(spec, config, force=force)

        run.spec = spec
        return run

    return decorate


def get_stage(name: str) -> StageSpec:
    try:
        target = STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage '{name}'; stages: {', '.join(sorted(STAGES))}") from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr).spec


def run_stage(name: str, config: StageConfig | dict, *, force: bool = False) -> StageResult:
    """Run a stage by name with a config object or a mapping of its fields."""
    spec = get_stage(name)
    if isinstance(config, dict):
        config = build_config(spec.config_cls, config, where=name)
    return execute(spec, config, force=force)


def build_config(config_cls: type[StageConfig], values: dict, *, where: str = "") -> StageConfig:
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - names)
    prefix = f"{where}: " if where else ""
    if unknown:
        raise ConfigError(
            f"{prefix}{config_cls.__name__} has no field {', '.join(map(repr, unknown))}; "
            f"fields: {', '.join(sorted(names))}"
        )
    try:
        return config_cls(**values)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"{prefix}{config_cls.__name__}: {exc}") from None


def package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in TRACKED_PACKAGES:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def redact(obj: Any) -> Any:
    """Replace any value equal to a secret-looking environment variable with ``"***"``."""
    secrets = {
        value for key, value in os.environ.items()
        if value and len(value) >= 8 and any(word in key.upper() for word in _SECRET_WORDS)
    }

    def walk(value):
        if isinstance(value, str):
            return "***" if value in secrets or any(s in value for s in secrets) else value
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(obj)


def read_manifest(output_dir: str | os.PathLike) -> dict | None:
    path = Path(output_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _hash_entries(paths: dict[str, Path]) -> dict[str, dict[str, str]]:
    return {key: {"path": str(path), "sha256": sha256_path(path)} for key, path in paths.items()}


def _is_up_to_date(manifest: dict | None, stage_name: str, config_hash: str, inputs: dict) -> bool:
    if not manifest or manifest.get("manifest_version") != MANIFEST_VERSION:
        return False
    if manifest.get("stage") != stage_name or manifest.get("config_sha256") != config_hash:
        return False
    if {k: v["sha256"] for k, v in manifest.get("inputs", {}).items()} != {
        k: v["sha256"] for k, v in inputs.items()
    }:
        return False
    for entry in manifest.get("outputs", {}).values():
        path = Path(entry["path"])
        if not path.exists() or sha256_path(path) != entry["sha256"]:
            return False
    return True


def execute(spec: StageSpec, config: StageConfig, *, force: bool = False) -> StageResult:
    output_dir = Path(config.output_dir)
    inputs = _hash_entries(config.input_paths())
    config_hash = config.config_sha256()
    manifest = read_manifest(output_dir)
    if not force and _is_up_to_date(manifest, spec.name, config_hash, inputs):
        log.debug("%s: up to date in %s (skipped)", spec.name, output_dir)
        return StageResult(
            counts=manifest.get("counts", {}), metrics=manifest.get("metrics", {}), stage=spec.name,
            output_dir=str(output_dir), outputs={k: v["path"] for k, v in manifest["outputs"].items()},
            skipped=True, duration_s=0.0,
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    # A stale manifest must not vouch for outputs that are about to change.
    (output_dir / MANIFEST).unlink(missing_ok=True)
    started = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    result = spec.body(config)
    if not isinstance(result, StageResult):
        raise TypeError(f"stage {spec.name} returned {type(result).__name__}, not StageResult")
    duration = time.perf_counter() - t0
    declared = config.outputs()
    missing = [f"{k} ({p})" for k, p in declared.items() if not Path(p).exists()]
    if missing:
        raise RuntimeError(f"stage {spec.name} finished without writing {', '.join(missing)}")
    outputs = _hash_entries(declared)
    result.stage = spec.name
    result.output_dir = str(output_dir)
    result.outputs = {k: v["path"] for k, v in outputs.items()}
    result.duration_s = duration
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "stage": spec.name,
        "config": config.to_dict(),
        "config_sha256": config_hash,
        "inputs": inputs,
        "outputs": outputs,
        "counts": result.counts,
        "metrics": result.metrics,
        "started_at": started.isoformat(timespec="seconds"),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "duration_s": round(duration, 3),
        "packages": package_versions(),
        "host": {"python": sys.version.split()[0], "platform": platform.platform()},
    }
    write_json(output_dir / MANIFEST, redact(manifest))
    log.debug("%s: done in %.1f s -> %s", spec.name, duration, output_dir)
    return result
