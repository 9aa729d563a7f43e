"""The `cogumi` command: every subcommand's --help, models, and running stages and recipes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from cogumi.cli import build_parser, main
from cogumi.stage import STAGES

SUBCOMMANDS = ["run", "models", "data", "distill", "export", *STAGES]
DATA_STAGES = [name for name, target in STAGES.items() if target.startswith("cogumi.data.")]


def test_top_level_help_lists_every_stage(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert f"    {name}" in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_help_works(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: cogumi {name}" in capsys.readouterr().out


@pytest.mark.parametrize("action", ["gguf", "verify", "lora"])
def test_export_group_help_works(action, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["export", action, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: cogumi export {action}" in capsys.readouterr().out


@pytest.mark.parametrize("name", DATA_STAGES)
def test_data_group_help_works(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", name, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: cogumi data {name}" in capsys.readouterr().out


def test_data_group_runs_the_same_stage(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    assert main(["data", "validate", str(data), "-o", str(tmp_path / "out")]) == 0
    assert main(["validate", str(data), "-o", str(tmp_path / "out")]) == 0
    assert "skipped: up to date" in capsys.readouterr().out


def test_stage_options_mirror_the_config_fields():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    generate = sub.choices["generate"]
    dests = {a.dest for a in generate._actions}
    assert {"prompts", "model", "backend", "max_tokens", "temperature", "n", "output_dir", "force"} <= dests


def test_models_prints_the_registry_and_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for text in ("smollm2-135m", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen2.5-7B-Instruct",
                 "mistralai/Mixtral-8x22B-Instruct-v0.1", "memory_optimized"):
        assert text in out


def test_stage_subcommand_runs_and_skips(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n{bad\n")
    argv = ["validate", str(data), "-o", str(tmp_path / "out"), "--on-error", "skip"]
    assert main(argv) == 0
    assert "kept: 1" in capsys.readouterr().out
    assert main(argv) == 0
    assert "skipped: up to date" in capsys.readouterr().out


def test_bad_input_exits_2_with_the_message(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": 1, "response": "b"}\n')
    assert main(["validate", str(data), "-o", str(tmp_path / "out")]) == 2
    assert f"error: {data}:1: field 'instruction': expected string, got int" in capsys.readouterr().err


def test_dry_run_validates_a_recipe(capsys):
    assert main(["run", "recipes/demo.yaml", "--dry-run"]) == 0
    assert re.search(r"recipes/demo.yaml: OK \(\d+ steps\)", capsys.readouterr().out)


def test_import_cogumi_does_not_import_heavy_modules():
    code = ("import sys, cogumi, cogumi.cli, cogumi.recipe; "
            "heavy = [m for m in ('torch', 'transformers', 'llama_cpp', 'openai', 'vllm', 'ray', 'datasets') if m in sys.modules]; "
            "cogumi.cli.build_parser(); "
            "heavy += [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
