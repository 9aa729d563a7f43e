"""Chat formatting and labels for training: exact assistant-only masks, ChatML fallback, counts."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from cogumi.models.fixtures import CHATML_TEMPLATE
from cogumi.train.data import (
    IGNORE_INDEX,
    ChatFormatter,
    TemplateError,
    encode_rows,
    messages_of,
    prepare_tokenizer,
    split_rows,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]


def _plain_tokenizer(*, eos: str = "<|endoftext|>", pad: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no chat template and no ChatML tokens (a base model's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(["The capital of France is Paris. What is 2 + 3? 5."] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=pad)


@pytest.fixture(params=["tiny", "smollm2"])
def tokenizer(request, tiny_llama_dir, smollm2_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir if request.param == "tiny" else smollm2_dir)
    prepare_tokenizer(tok)
    return tok


def test_assistant_only_masking_is_exact(tokenizer):
    ids, labels = ChatFormatter(tokenizer).encode(CHAT)
    assert len(ids) == len(labels)
    supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    # Where a label is set it is the token itself; everywhere else it is -100.
    assert all(labels[i] == ids[i] for i in supervised)
    # The supervised tokens are exactly the two answers, each with its end-of-turn token ...
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    expected = []
    for answer in ("Paris.", "Rome, of course."):
        expected += tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]
    assert [ids[i] for i in supervised] == expected
    # ... as two contiguous runs that end on <|im_end|>; the token after each (ChatML's "\n") and
    # every prompt token, system prompt included, are masked.
    runs = [[supervised[0]]]
    for i in supervised[1:]:
        if i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    assert len(runs) == 2
    for run in runs:
        assert ids[run[-1]] == end
        assert labels[run[0] - 1] == IGNORE_INDEX
        if run[-1] + 1 < len(ids):
            assert labels[run[-1] + 1] == IGNORE_INDEX
    prompt_text = tokenizer.decode([t for t, label in zip(ids, labels) if label == IGNORE_INDEX])
    assert "Be brief." in prompt_text and "Capital of France?" in prompt_text and "Paris" not in prompt_text


def test_loss_on_all_supervises_every_token(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prepare_tokenizer(tok)
    ids, labels = ChatFormatter(tok, loss_on="all").encode(CHAT)
    assert labels == ids


def test_instruction_rows_become_a_user_and_an_assistant_turn():
    row = {"instruction": "Sum these.", "input": "2 3", "response": "5"}
    assert messages_of(row) == [{"role": "user", "content": "Sum these.\n\n2 3"},
                                {"role": "assistant", "content": "5"}]
    chat = {"messages": [{"role": "user", "content": "hi", "name": "x"}, {"role": "assistant", "content": "yo"}]}
    assert messages_of(chat) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]


def test_the_spec_chatml_template_is_the_fallback(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    tok.chat_template = None
    setup = prepare_tokenizer(tok)
    assert setup.template_source == "chatml" and setup.added_tokens == []
    text = ChatFormatter(tok).render(messages_of({"instruction": "Q?", "response": "A."}))
    # The spec's formatting_func, plus the newline ChatML puts after every turn.
    assert text == "<|im_start|>user\nQ?<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"


def test_chatml_tokens_and_a_distinct_pad_are_added_when_missing():
    tok = _plain_tokenizer()
    assert tok.chat_template is None and tok.pad_token is None
    setup = prepare_tokenizer(tok)
    assert setup.added_tokens == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert setup.end_of_turn == "<|im_end|>" and tok.pad_token == "<|pad|>"
    ids, labels = ChatFormatter(tok).encode(messages_of({"instruction": "2 + 3?", "response": "5."}))
    assert [t for t, label in zip(ids, labels) if label != IGNORE_INDEX][-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_pad_is_never_eos():
    tok = _plain_tokenizer(pad="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|endoftext|>"
    assert tok.pad_token_id == tok.eos_token_id
    setup = prepare_tokenizer(tok)
    assert tok.pad_token_id != tok.eos_token_id
    assert setup.pad_token == "<|pad|>"


def test_a_template_that_never_closes_assistant_turns_is_refused():
    tok = _plain_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}" \
                        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    with pytest.raises(TemplateError, match="never learn to stop"):
        prepare_tokenizer(tok)


def test_a_template_that_rewrites_earlier_turns_is_refused(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    # Marks only the last message, so a turn renders differently once another follows it.
    tok.chat_template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}"
                         "{% if loop.last %}{{ ' (last)' }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(TemplateError, match="renders turn"):
        ChatFormatter(tok).encode(CHAT)


def test_overlong_rows_are_truncated_or_dropped_and_counted(tiny_llama_dir):
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    prepare_tokenizer(tok)
    formatter = ChatFormatter(tok)
    rows = [
        {"instruction": "Short?", "response": "Yes."},
        {"instruction": "Long answer?", "response": "word " * 60},  # answer starts inside max_length
        {"instruction": "Long question " * 40, "response": "No."},  # answer entirely past max_length
    ]
    columns, report = encode_rows(rows, formatter, max_length=48, overlong="truncate")
    assert (report.rows, report.kept, report.truncated, report.dropped_unsupervised) == (3, 2, 2, 1)
    assert all(len(ids) <= 48 for ids in columns["input_ids"])
    assert report.tokens == sum(map(len, columns["input_ids"]))
    assert 0 < report.supervised_share < 1
    _, report = encode_rows(rows, formatter, max_length=48, overlong="drop")
    assert (report.kept, report.dropped_overlong, report.truncated) == (1, 2, 0)


def test_validation_split_is_seeded_and_never_empty():
    rows = [{"i": i} for i in range(10)]
    train, val = split_rows(rows, 0.02, seed=1)
    assert len(val) == 1 and len(train) == 9
    assert split_rows(rows, 0.3, seed=7) == split_rows(rows, 0.3, seed=7)
    assert split_rows(rows, 0.3, seed=7)[1] != split_rows(rows, 0.3, seed=8)[1]
    assert split_rows(rows, 0.0, seed=1) == (rows, [])
