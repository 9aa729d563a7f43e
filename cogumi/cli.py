"""The ``cogumi`` command: one subcommand per stage (derived from its config), plus
``run`` for recipes and ``models`` for the registry."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing
from typing import Any, Literal

from cogumi import __version__
from cogumi.io import DataError
from cogumi.stage import (
    STAGES,
    ConfigError,
    StageError,
    StageResult,
    build_config,
    execute,
    get_stage,
)


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argument per config field: its help, type, choices and default come from the field."""
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        hint = _unwrap_optional(hints[f.name])
        origin = typing.get_origin(hint)
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None
        if not required:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = meta.get("help", "")
        if not required:
            help_text += f" (default: {default!r})"
        # argparse %-formats help text: a literal "60%" must reach it as "60%%".
        kwargs: dict[str, Any] = {"help": help_text.replace("%", "%%"), "default": argparse.SUPPRESS}
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is Literal:
            kwargs["choices"] = list(typing.get_args(hint))
        elif origin in (list, tuple) or hint in (list, tuple):
            item = typing.get_args(hint)[0] if typing.get_args(hint) else str
            kwargs["nargs"] = "+"
            kwargs["type"] = item if item in (int, float, str) else json.loads if item is dict or \
                typing.get_origin(item) is dict else str
        elif origin is dict or hint is dict:
            kwargs["type"] = json.loads
            kwargs["metavar"] = "JSON"
        elif hint in (int, float, str):
            kwargs["type"] = hint
        if meta.get("positional"):
            kwargs.pop("default")
            if not required:
                kwargs["nargs"] = "?"
                kwargs["default"] = argparse.SUPPRESS
            parser.add_argument(f.name, metavar=f.name.upper(), **kwargs)
            continue
        names = ["--" + f.name.replace("_", "-")]
        if meta.get("short"):
            names.append(meta["short"])
        if required:
            kwargs["required"] = True
        parser.add_argument(*names, dest=f.name, **kwargs)


def _print_result(result: StageResult) -> None:
    status = "skipped: up to date" if result.skipped else f"done in {result.duration_s:.1f} s"
    print(f"{result.stage}: {status}")
    for key, value in result.counts.items():
        print(f"  {key}: {value}")
    for key, value in result.metrics.items():
        print(f"  {key}: {value if not isinstance(value, float) else round(value, 4)}")
    print(f"  output: {result.output_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cogumi",
        description="Train, evaluate, distill and compress LLMs (the Cogumi method).",
    )
    parser.add_argument("--version", action="version", version=f"cogumi {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log debug messages.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run_p = sub.add_parser("run", help="Run a recipe (YAML) stage by stage; finished stages are skipped.")
    run_p.add_argument("recipe", metavar="RECIPE", help="Recipe YAML file.")
    run_p.add_argument("--workdir", help="Directory for the steps' outputs (default: the recipe's).")
    run_p.add_argument("--force", action="store_true", help="Re-run every step even if up to date.")
    run_p.add_argument("--only", nargs="+", metavar="STEP", help="Run only these step ids.")
    run_p.add_argument("--dry-run", action="store_true", help="Bind and validate the recipe; run nothing.")

    models_p = sub.add_parser("models", help="List the model registry and the serving presets.")
    models_p.add_argument("--preset", choices=["performance", "balanced", "memory_optimized"],
                          help="Show every model under this preset.")

    compare_p = sub.add_parser("eval-compare", help="Two eval runs side by side (also: cogumi eval compare A B).")
    compare_p.add_argument("a", metavar="A", help="Eval output directory (or its summary.json).")
    compare_p.add_argument("b", metavar="B", help="Eval output directory (or its summary.json) to compare with A.")
    compare_p.add_argument("--no-categories", action="store_true", help="Leave out the per-category rows.")

    data_p = sub.add_parser("data", help="The data-curation stages as one group: cogumi data STAGE ...")
    data_sub = data_p.add_subparsers(dest="data_command", metavar="STAGE", required=True)
    distill_p = sub.add_parser("distill", help="Phase 1B.2/1C stages as one group: cogumi distill STAGE ... "
                               "(failures, cluster-failures, self-consistency, cascade)")
    distill_sub = distill_p.add_subparsers(dest="distill_command", metavar="STAGE", required=True)
    export_p = sub.add_parser("export", help="Phase 2b GGUF stages as one group: cogumi export gguf|verify|lora ... "
                              "(also export-gguf, export-verify, export-lora)")
    export_sub = export_p.add_subparsers(dest="export_command", metavar="ACTION", required=True)
    for name in STAGES:
        spec = get_stage(name)
        groups = [(sub, name)]
        if STAGES[name].startswith("cogumi.data."):
            groups.append((data_sub, name))
        if STAGES[name].startswith("cogumi.distill."):
            groups.append((distill_sub, name))
        if name.startswith("export-"):
            groups.append((export_sub, name.removeprefix("export-")))
        for group, sub_name in groups:
            stage_p = group.add_parser(sub_name, help=spec.help.replace("%", "%%"), description=spec.help)
            add_config_arguments(stage_p, spec.config_cls)
            stage_p.add_argument("--force", action="store_true", help="Run even if the output is up to date.")
            stage_p.set_defaults(command=name)
    return parser


#: ``cogumi eval score ...`` and ``cogumi eval compare ...`` are the ``eval-score`` and
#: ``eval-compare`` subcommands; ``cogumi eval BENCHMARK ...`` is the ``eval`` stage itself.
_EVAL_ACTIONS = {"score": "eval-score", "compare": "eval-compare"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "eval" and argv[1] in _EVAL_ACTIONS:
        argv = [_EVAL_ACTIONS[argv[1]], *argv[2:]]
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    values = {k: v for k, v in vars(args).items() if k not in ("command", "data_command", "distill_command", "export_command", "verbose", "force")}
    try:
        if args.command == "run":
            from cogumi.recipe import RecipeError, bind, load_recipe, run_recipe

            try:
                if args.dry_run:
                    recipe = load_recipe(args.recipe, workdir=args.workdir)
                    for step_id, config in bind(recipe).items():
                        print(f"{step_id}: {type(config).__name__} -> {config.output_dir}")
                    print(f"{args.recipe}: OK ({len(recipe.steps)} steps)")
                    return 0
                run_recipe(args.recipe, workdir=args.workdir, force=args.force, only=args.only)
            except RecipeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            return 0
        if args.command == "eval-compare":
            from cogumi.evaluate.run import compare

            print(compare(args.a, args.b, categories=not args.no_categories))
            return 0
        if args.command == "models":
            from cogumi.models.registry import presets_table, registry_table

            print(registry_table(args.preset))
            print()
            print(presets_table())
            return 0
        spec = get_stage(args.command)
        config = build_config(spec.config_cls, values)
        _print_result(execute(spec, config, force=args.force))
        return 0
    except (ConfigError, DataError, StageError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
