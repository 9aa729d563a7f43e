"""Recipes: binding, references, errors with file:line, and resume across runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cogumi.recipe import RecipeError, bind, load_recipe, run_recipe

ROOT = Path(__file__).resolve().parents[1]
ROW = {"instruction": "Add 2 and 3.", "response": "5"}


def write_recipe(tmp_path, body: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(body)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + "{broken\n")
    return path


CHAIN = """
name: chain
stages:
  - id: first
    stage: validate
    config: {{input: {data}, schema: instruction, on_error: skip}}
  - id: second
    stage: validate
    config: {{input: "${{first.outputs.valid}}", schema: {schema}}}
"""


def test_every_shipped_recipe_binds_against_the_stage_configs():
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    assert recipes, "no recipes shipped"
    for path in recipes:
        recipe = load_recipe(path)
        configs = bind(recipe)
        assert list(configs) == [step.id for step in recipe.steps]


def test_references_resolve_to_declared_outputs(tmp_path, data):
    recipe = load_recipe(write_recipe(tmp_path, CHAIN.format(data=data, schema="sft")), workdir=tmp_path / "w")
    configs = bind(recipe)
    assert configs["second"].input == str(tmp_path / "w" / "first" / "valid.jsonl")
    assert configs["second"].output_dir == str(tmp_path / "w" / "second")


def test_recipe_resumes_and_reruns_only_what_changed(tmp_path, data):
    path = write_recipe(tmp_path, CHAIN.format(data=data, schema="sft"))
    first = run_recipe(path, workdir=tmp_path / "w", echo=lambda *_: None)
    assert [r.skipped for r in first] == [False, False]
    assert first[0].counts == {"in": 2, "kept": 1, "rejected": 1}
    again = run_recipe(path, workdir=tmp_path / "w", echo=lambda *_: None)
    assert [r.skipped for r in again] == [True, True]

    path.write_text(CHAIN.format(data=data, schema="any"))  # only the second step's config changed
    changed = run_recipe(path, workdir=tmp_path / "w", echo=lambda *_: None)
    assert [r.skipped for r in changed] == [True, False]

    data.write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "response": "five"}) + "\n")
    rerun = run_recipe(path, workdir=tmp_path / "w", echo=lambda *_: None)
    assert [r.skipped for r in rerun] == [False, False]
    assert rerun[1].counts["kept"] == 2


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("name: x\nstages:\n  - stage: nope\n", r"recipe.yaml:3: stages\[0\]: field 'stage': 'nope' is not one of"),
        ("name: x\nstages:\n  - stage: validate\n    config: {schema: chat, input: a}\n",
         r"recipe.yaml:3: step 'validate' \(validate\): ValidateConfig.schema: 'chat' is not one of"),
        ("name: x\nstages:\n  - stage: validate\n    config: {input: '${missing.outputs.valid}'}\n",
         r"no earlier step has id 'missing'"),
        ("name: x\nstages:\n  - id: a\n    stage: validate\n    config: {input: f}\n"
         "  - stage: validate\n    config: {input: '${a.outputs.nothing}'}\n", r"declares outputs \['rejected', 'report', 'valid'\]"),
        ("name: x\nstages:\n  - stage: validate\n    config: {input: f, colour: red}\n", r"has no field 'colour'"),
        ("name: x\nstages: []\n", r"field 'stages': must be a non-empty list"),
        ("name: x\nstages:\n  - stage: validate\n    config: {input: [1\n", r"invalid YAML"),
        ("stages:\n  - stage: validate\n", r"field 'name': missing"),
    ],
)
def test_recipe_errors_name_file_line_and_field(tmp_path, body, message):
    with pytest.raises(RecipeError, match=message):
        bind(load_recipe(write_recipe(tmp_path, body)))
