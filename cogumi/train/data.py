"""Training examples from JSONL rows: chat formatting, assistant-only labels, length accounting.

Every row becomes a chat (phase 0's instruction/response rows become one user turn and one
assistant turn) rendered by the tokenizer's own chat template, or by the spec's ``<|im_start|>``
ChatML template when the tokenizer has none. Labels are ``-100`` everywhere except on the
assistant turns, and each assistant turn's supervised span ends with its end-of-turn token, so
the model learns to stop.

Why not TRL's ``assistant_only_loss``: TRL 1.16 needs ``{% generation %}`` markers in the
template; for a template without them it swaps in a patched copy only for ~30 templates it
knows and raises otherwise. SmolLM2's template, the spec's ChatML fallback and most Llama
fine-tunes are not on its list. The assistant spans here come from rendering the chat prefix by
prefix (the text up to the assistant turn with the generation prompt, then the text including
the turn) and mapping those character spans onto tokens through the fast tokenizer's offsets —
which works for any template that renders earlier turns identically when later ones are added,
and fails loudly for one that does not.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from cogumi.io import response_of, to_messages
from cogumi.models.fixtures import CHATML_TEMPLATE

IGNORE_INDEX = -100

LossOn = Literal["assistant", "all"]
Overlong = Literal["truncate", "drop"]

#: Tokens the spec's ChatML template needs as single tokens of the vocabulary.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")

#: Distinct padding tokens that many vocabularies already have, tried in order before adding one.
PAD_CANDIDATES = ("<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<|endoftext|>", "[PAD]")


class TemplateError(ValueError):
    """A chat template (or tokenizer) that cannot give exact assistant-only labels."""


# ----------------------------------------------------------------------------- rows


def messages_of(row: dict) -> list[dict[str, str]]:
    """The full chat a training row describes (with its answer).

    Instruction rows (phase 0's output) become ``user: instruction (+ input)`` and
    ``assistant: response``; chat rows keep their messages (roles and contents only).
    """
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [*to_messages(row), {"role": "assistant", "content": response_of(row)}]


def split_rows(rows: list[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, validation)``: a seeded random ``val_fraction`` of the rows is held out.

    At least one row is held out whenever ``val_fraction > 0`` and there are two rows or more,
    so a small set still gets a validation loss. The training rows keep their file order (the
    trainer shuffles them with its own seed).
    """
    if val_fraction <= 0 or len(rows) < 2:
        return list(rows), []
    n_val = min(len(rows) - 1, max(1, round(len(rows) * val_fraction)))
    held_out = set(random.Random(seed).sample(range(len(rows)), n_val))
    train = [row for i, row in enumerate(rows) if i not in held_out]
    val = [row for i, row in enumerate(rows) if i in held_out]
    return train, val


# ----------------------------------------------------------------------------- tokenizer


@dataclass
class TokenizerSetup:
    """What :func:`prepare_tokenizer` did, recorded next to the adapter for the merge stage."""

    template_source: str
    """``tokenizer`` (its own template), ``chatml`` (the spec's) or the Jinja file used."""
    end_of_turn: str
    """The token that closes an assistant turn (trained, so the model learns to stop)."""
    pad_token: str
    added_tokens: list[str] = field(default_factory=list)
    """Tokens added to the vocabulary (the embedding matrix must grow by as many rows)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _single_token_id(tokenizer, token: str) -> int | None:
    """The id of ``token`` if the vocabulary holds it as one token, else ``None``."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (tokenizer.unk_token_id is not None and token_id == tokenizer.unk_token_id
                            and token != tokenizer.unk_token):
        return None
    return token_id


def prepare_tokenizer(tokenizer, chat_template: str = "auto") -> TokenizerSetup:
    """Give ``tokenizer`` a chat template, the tokens that template needs, and a pad token != EOS.

    Args:
        chat_template: ``"auto"`` uses the tokenizer's template, or the spec's ChatML template
            when it has none; ``"chatml"`` always uses the spec's; anything else is a Jinja file.

    A pad token equal to EOS is a classic way to train a model that never stops (collators that
    mask padding by id mask every EOS too), so padding gets a distinct token: an existing one
    from :data:`PAD_CANDIDATES`, or a new ``<|pad|>``. ChatML's markers are added as special
    tokens when the vocabulary lacks them; the caller must then grow the embeddings and train
    them (see ``added_tokens``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TemplateError(
            f"{type(tokenizer).__name__} is a slow tokenizer; exact assistant-only labels need a fast "
            "tokenizer (character offsets). Save the model with its tokenizer.json."
        )
    added: list[str] = []
    if chat_template == "auto":
        source = "tokenizer" if tokenizer.chat_template else "chatml"
    elif chat_template == "chatml":
        source = "chatml"
    else:
        path = Path(chat_template)
        if not path.is_file():
            raise TemplateError(f"chat template file {path} does not exist")
        source = str(path)
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    if source == "chatml":
        tokenizer.chat_template = CHATML_TEMPLATE
        missing = [t for t in CHATML_TOKENS if _single_token_id(tokenizer, t) is None]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
            added += missing
    if isinstance(tokenizer.chat_template, dict):  # named variants: the default one renders chats
        tokenizer.chat_template = tokenizer.chat_template["default"]

    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        for candidate in PAD_CANDIDATES:
            if candidate != tokenizer.eos_token and _single_token_id(tokenizer, candidate) is not None:
                tokenizer.pad_token = candidate
                break
        else:
            tokenizer.add_tokens(["<|pad|>"], special_tokens=True)
            tokenizer.pad_token = "<|pad|>"
            added.append("<|pad|>")

    formatter = ChatFormatter(tokenizer)
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ids, labels = formatter.encode(probe)
    end_id = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX][-1]
    end_of_turn = tokenizer.convert_ids_to_tokens(end_id)
    if end_id == tokenizer.pad_token_id:
        raise TemplateError(f"the chat template ends assistant turns with the pad token {end_of_turn!r}")
    return TokenizerSetup(template_source=source, end_of_turn=end_of_turn,
                          pad_token=tokenizer.pad_token, added_tokens=added)


# ----------------------------------------------------------------------------- formatting


class ChatFormatter:
    """Render chats with a tokenizer's template; token ids plus assistant-only labels.

    Args:
        loss_on: ``"assistant"`` supervises the assistant turns only (each through its
            end-of-turn token); ``"all"`` supervises every token.
    """

    def __init__(self, tokenizer, *, loss_on: LossOn = "assistant"):
        if not tokenizer.chat_template:
            raise TemplateError("the tokenizer has no chat template (call prepare_tokenizer first)")
        self.tokenizer = tokenizer
        self.loss_on = loss_on
        self._special_ids = set(tokenizer.all_special_ids) | set(tokenizer.get_added_vocab().values())

    def render(self, messages: list[dict], *, add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered chat and the character span of each assistant turn in it.

        A span runs from the end of the generation prompt (``<|im_start|>assistant\\n``) to the
        end of the turn's end-of-turn token; whitespace the template puts after that token
        (ChatML's ``\\n``) is not part of what the model must generate.
        """
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                before = self.render(messages[:i], add_generation_prompt=True)
                through = self.render(messages[: i + 1])
            except Exception as exc:  # jinja2 errors from templates that need a user turn first
                raise TemplateError(f"the chat template cannot render the chat up to turn {i}: {exc}") from exc
            if not (through.startswith(before) and text.startswith(through)):
                raise TemplateError(
                    f"the chat template renders turn {i} differently once later turns follow, so the "
                    "assistant tokens cannot be located exactly; use chat_template='chatml' or a "
                    "template that renders earlier turns unchanged"
                )
            end = len(through.rstrip())
            if end <= len(before):
                raise TemplateError(f"the chat template renders assistant turn {i} as nothing")
            spans.append((len(before), end))
        return text, spans

    def encode(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """``(input_ids, labels)`` of a chat; labels are ``-100`` off the supervised tokens.

        A token is supervised when its characters overlap an assistant span. The last
        supervised token of every span must be a special token (the end-of-turn marker): a
        template that closes assistant turns with plain text, or not at all, would train a model
        that cannot stop, so it is refused.
        """
        import numpy as np

        text, spans = self.assistant_spans(messages)
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        if self.loss_on == "all":
            return ids, list(ids)
        offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        starts, ends = offsets[:, 0], offsets[:, 1]
        supervised = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            inside = (starts < end) & (ends > start)
            if not inside.any():
                raise TemplateError(f"no token covers the assistant span {start}:{end} of {text!r}")
            last = int(np.flatnonzero(inside)[-1])
            if ids[last] not in self._special_ids:
                raise TemplateError(
                    "the chat template does not close assistant turns with a special end-of-turn token "
                    f"(the turn ends with {self.tokenizer.convert_ids_to_tokens(ids[last])!r}); the model "
                    "would never learn to stop. Use chat_template='chatml' or fix the template."
                )
            supervised |= inside
        labels = [token if keep else IGNORE_INDEX for token, keep in zip(ids, supervised.tolist())]
        return ids, labels


# ----------------------------------------------------------------------------- datasets


@dataclass
class FormatReport:
    """How rows became examples: ``rows = kept + dropped_overlong + dropped_unsupervised``."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    """Kept, but cut to ``max_length`` tokens (the start is kept)."""
    dropped_overlong: int = 0
    """Longer than ``max_length`` with ``overlong='drop'``."""
    dropped_unsupervised: int = 0
    """No supervised token left (an answer entirely past ``max_length``)."""
    tokens: int = 0
    supervised_tokens: int = 0

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "supervised_share": round(self.supervised_share, 4)}


def encode_rows(
    rows: list[dict],
    formatter: ChatFormatter,
    *,
    max_length: int,
    overlong: Overlong = "truncate",
) -> tuple[dict[str, list[list[int]]], FormatReport]:
    """Encode rows into ``{"input_ids": [...], "labels": [...]}`` columns, counting every row.

    Supervised tokens are counted from the second token on: the first token of a sequence is
    never predicted, so a label there trains nothing.
    """
    report = FormatReport(rows=len(rows))
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for row in rows:
        ids, labels = formatter.encode(messages_of(row))
        if len(ids) > max_length:
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            ids, labels = ids[:max_length], labels[:max_length]
            report.truncated += 1
        supervised = sum(1 for label in labels[1:] if label != IGNORE_INDEX)
        if supervised == 0:
            report.dropped_unsupervised += 1
            continue
        columns["input_ids"].append(ids)
        columns["labels"].append(labels)
        report.kept += 1
        report.tokens += len(ids)
        report.supervised_tokens += supervised
    return columns, report
