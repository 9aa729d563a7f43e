"""Recipes: YAML files that list stages and their configs, run in order, resumably.

```yaml
name: demo
workdir: runs/demo            # default: runs/<name>; each step writes to <workdir>/<id>
stages:
  - id: model
    stage: materialize
    config: {model: smollm2-135m}
  - id: answers
    stage: generate
    config:
      model: ${model.outputs.model}     # a path another step declares
      prompts: recipes/data/demo_prompts.jsonl
```

References: ``${workdir}``, ``${STEP.FIELD}`` (a config field of an earlier step) and
``${STEP.outputs.NAME}`` (an output it declares). Outputs are declared by the configs, so a
whole recipe binds — and is validated — without running anything.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cogumi.stage import (
    STAGES,
    ConfigError,
    StageConfig,
    StageResult,
    build_config,
    execute,
    get_stage,
)

_REF = re.compile(r"\$\{([^}]+)\}")


class RecipeError(ValueError):
    """A recipe that cannot be bound; the message names the file, line and step."""


@dataclass
class Step:
    id: str
    stage: str
    config: dict[str, Any]
    line: int


@dataclass
class Recipe:
    name: str
    path: Path
    workdir: Path
    steps: list[Step]
    description: str = ""
    bound: dict[str, StageConfig] = field(default_factory=dict)


def load_recipe(path: str | Path, *, workdir: str | Path | None = None) -> Recipe:
    """Parse a recipe file and check its shape (not yet its configs: see :func:`bind`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such recipe file") from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping with 'name' and 'stages'")
    unknown = set(data) - {"name", "description", "workdir", "stages"}
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {sorted(unknown)}")
    name = data.get("name")
    if not isinstance(name, str) or not name:
        raise RecipeError(f"{path}: field 'name': missing or not a string")
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{path}: field 'stages': must be a non-empty list")
    lines = _step_lines(root)
    steps, seen = [], set()
    for index, raw in enumerate(stages):
        line = lines[index] if index < len(lines) else 0
        where = f"{path}:{line}: stages[{index}]"
        if not isinstance(raw, dict):
            raise RecipeError(f"{where}: each step is a mapping with 'stage' and 'config'")
        extra = set(raw) - {"id", "stage", "config"}
        if extra:
            raise RecipeError(f"{where}: unknown key(s) {sorted(extra)}")
        stage_name = raw.get("stage")
        if stage_name not in STAGES:
            raise RecipeError(f"{where}: field 'stage': '{stage_name}' is not one of {', '.join(sorted(STAGES))}")
        step_id = str(raw.get("id") or stage_name)
        if step_id in seen:
            raise RecipeError(f"{where}: field 'id': '{step_id}' is used twice; give each step its own id")
        seen.add(step_id)
        config = raw.get("config") or {}
        if not isinstance(config, dict):
            raise RecipeError(f"{where}: field 'config': must be a mapping")
        steps.append(Step(step_id, stage_name, config, line))
    chosen = workdir or data.get("workdir") or f"runs/{name}"
    return Recipe(name=name, path=path, workdir=Path(chosen), steps=steps,
                  description=str(data.get("description", "")))


def _step_lines(root) -> list[int]:
    if root is None or not hasattr(root, "value"):
        return []
    for key, value in root.value:
        if getattr(key, "value", None) == "stages" and isinstance(value, yaml.SequenceNode):
            return [item.start_mark.line + 1 for item in value.value]
    return []


def bind(recipe: Recipe) -> dict[str, StageConfig]:
    """Build every step's config (references resolved); raises :class:`RecipeError`."""
    bound: dict[str, StageConfig] = {}
    for step in recipe.steps:
        where = f"{recipe.path}:{step.line}: step '{step.id}' ({step.stage})"
        values = {k: _resolve(v, bound, recipe, where) for k, v in step.config.items()}
        values.setdefault("output_dir", str(recipe.workdir / step.id))
        spec = get_stage(step.stage)
        try:
            bound[step.id] = build_config(spec.config_cls, values)
        except ConfigError as exc:
            raise RecipeError(f"{where}: {exc}") from None
    recipe.bound = bound
    return bound


def _resolve(value: Any, bound: dict[str, StageConfig], recipe: Recipe, where: str) -> Any:
    if isinstance(value, list):
        return [_resolve(v, bound, recipe, where) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, bound, recipe, where) for k, v in value.items()}
    if not isinstance(value, str) or "${" not in value:
        return value
    whole = _REF.fullmatch(value)
    if whole:
        return _lookup(whole.group(1), bound, recipe, where)
    return _REF.sub(lambda m: str(_lookup(m.group(1), bound, recipe, where)), value)


def _lookup(ref: str, bound: dict[str, StageConfig], recipe: Recipe, where: str) -> Any:
    if ref == "workdir":
        return str(recipe.workdir)
    parts = ref.split(".")
    step_id = parts[0]
    if step_id not in bound:
        raise RecipeError(f"{where}: reference '${{{ref}}}': no earlier step has id '{step_id}'")
    config = bound[step_id]
    if len(parts) == 3 and parts[1] == "outputs":
        outputs = config.outputs()
        if parts[2] not in outputs:
            raise RecipeError(
                f"{where}: reference '${{{ref}}}': step '{step_id}' declares outputs {sorted(outputs)}"
            )
        return str(outputs[parts[2]])
    if len(parts) == 2 and hasattr(config, parts[1]):
        return getattr(config, parts[1])
    raise RecipeError(f"{where}: reference '${{{ref}}}' is not STEP.FIELD or STEP.outputs.NAME")


def run_recipe(
    path: str | Path,
    *,
    workdir: str | Path | None = None,
    force: bool = False,
    only: list[str] | None = None,
    echo=print,
) -> list[StageResult]:
    """Run a recipe's steps in order; a step whose manifest matches is skipped."""
    recipe = load_recipe(path, workdir=workdir)
    configs = bind(recipe)
    if only:
        missing = sorted(set(only) - set(configs))
        if missing:
            raise RecipeError(f"{recipe.path}: no step(s) {missing}; steps: {list(configs)}")
    results = []
    t0 = time.perf_counter()
    for step in recipe.steps:
        if only and step.id not in only:
            continue
        echo(f"[{recipe.name}] {step.id} ({step.stage}) ...")
        result = execute(get_stage(step.stage), configs[step.id], force=force)
        status = "skipped (up to date)" if result.skipped else f"done in {result.duration_s:.1f} s"
        echo(f"[{recipe.name}] {step.id}: {status} -> {result.output_dir}")
        results.append(result)
    echo(f"[{recipe.name}] finished in {time.perf_counter() - t0:.1f} s; results in {recipe.workdir}")
    return results
