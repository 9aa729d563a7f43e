"""Phase 1A: QLoRA supervised fine-tuning (``cogumi train``) and merging (``cogumi merge``).

* :mod:`cogumi.train.sft` — the ``train`` stage: data → chat-formatted, assistant-only labelled,
  packed examples → LoRA on a 4-bit NF4 base through TRL's ``SFTTrainer`` (unsloth on CUDA when
  installed), resumable from its last checkpoint.
* :mod:`cogumi.train.data` — chat formatting, label masking, truncation accounting.
* :mod:`cogumi.train.callbacks` — the spec's monitoring rules, metrics JSONL, progress bar.
* :mod:`cogumi.train.merge` — the ``merge`` stage: the adapter folded into full-precision
  weights, checked against base + adapter.

Nothing here imports torch until a stage runs.
"""
