"""Tests for serving.tokenizer and serving.chat_template: HF tokenizer loading, chat templates (transformers as the oracle),
the byte tokenizer, streaming detokenization and conversation continuation."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.chat_template import render_continuation
from serving.tokenizer import (
    BYTE_CHAT_TEMPLATE,
    ByteTokenizer,
    IncrementalDecoder,
    Tokenizer,
    load_tokenizer,
)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML-like, written over several lines so trim_blocks / lstrip_blocks matter, and using tojson,
# tools, bos_token, raise_exception and the {% generation %} tag.
CHATML_TEMPLATE = """{{ bos_token }}
{%- if tools %}
<|im_start|>system
Tools: {{ tools | tojson }}<|im_end|>
{% endif %}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role') }}
    {% endif %}
<|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}
{% generation %}{{ message['content'] }}{% endgeneration %}<|im_end|>
    {% else %}
{{ message['content'] }}<|im_end|>
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Rewrites earlier turns depending on what follows: not prefix-stable.
UNSTABLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if loop.last %}{{ m['content'] }}{% else %}{{ m['content'][:3] }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "hello world, this is a test.",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, naïve café 你好世界 🙂🚀",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n",
] * 4

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "héllo 🙂"},
        {"role": "assistant", "content": "Hi! 你好"},
        {"role": "user", "content": "again <b>&</b>"},
    ],
    [{"role": "user", "content": "x", "name": None}],  # None-valued keys are dropped, as in transformers
]


def _train_tokenizer():
    """A real byte-level BPE tokenizer.json, trained in-process (no download). The small vocabulary
    keeps multi-byte characters split over several tokens, which the streaming tests need."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_tok")
    _train_tokenizer().save(str(d / "tokenizer.json"))
    config = {
        "bos_token": "<|endoftext|>",
        # AddedToken dict form, as written by older transformers versions
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": True},
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML_TEMPLATE,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    return d


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def oracle(model_dir):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        chat_template=CHATML_TEMPLATE,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )


# ------------------------------------------------------------------------------------------------
# HF tokenizer
# ------------------------------------------------------------------------------------------------


def test_hf_attributes(tok):
    assert tok.vocab_size == 320
    assert tok.bos_token_id == tok.token_to_id("<|endoftext|>") == 0
    # config eos first, then generation_config's ids, de-duplicated
    assert tok.eos_token_ids == (2, 0)
    assert tok.pad_token_id == 0


@pytest.mark.parametrize("text", ["", "hello world", "naïve café 你好 🙂🚀", "a<|im_start|>b<|im_end|>\n"])
def test_hf_encode_decode_roundtrip(tok, oracle, text):
    ids = tok.encode(text)
    assert ids == oracle.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == oracle.decode(ids, skip_special_tokens=True)


def test_hf_special_tokens_are_single_ids(tok):
    ids = tok.encode("<|im_start|>user<|im_end|>")
    assert ids[0] == tok.token_to_id("<|im_start|>") and ids[-1] == tok.token_to_id("<|im_end|>")
    assert tok.decode(ids) == "user"


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, oracle, messages, add_generation_prompt):
    expected = oracle.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    got = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert tok.apply_chat_template(messages, add_generation_prompt, tokenize=True) == oracle.encode(
        expected, add_special_tokens=False
    )


def test_chat_template_tools_match_transformers(tok, oracle):
    tools = [{"type": "function", "function": {"name": "f", "description": "<é & ü>", "parameters": {}}}]
    messages = CONVERSATIONS[0]
    expected = oracle.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(messages, tools=tools) == expected
    assert "<é & ü>" in expected  # tojson neither escapes HTML nor non-ASCII


def test_chat_template_raise_exception(tok):
    import jinja2

    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role"):
        tok.apply_chat_template([{"role": "robot", "content": "x"}])


def test_chat_template_list_form_and_jinja_file(tmp_path, model_dir, tok):
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    config = {
        "eos_token": "<|im_end|>",
        "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML_TEMPLATE}],
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    listed = Tokenizer.from_pretrained(d)
    # no bos_token in this config, so the template renders it as empty
    with_bos = tok.apply_chat_template(CONVERSATIONS[1])
    assert listed.apply_chat_template(CONVERSATIONS[1]) == with_bos[len("<|endoftext|>") :]
    assert listed.apply_chat_template(CONVERSATIONS[0], chat_template="tool_use") == "T"
    assert listed.eos_token_ids == (2,)
    assert listed.pad_token_id == 2  # falls back to the first eos id

    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_pretrained(d).apply_chat_template(CONVERSATIONS[0]) == "hi!"


def test_missing_files(tmp_path, model_dir):
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_load_tokenizer(tmp_path, model_dir):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    (tmp_path / "byte_tokenizer.json").write_text(json.dumps({"type": "byte"}))
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    assert isinstance(load_tokenizer(str(model_dir)), Tokenizer)


# ------------------------------------------------------------------------------------------------
# Byte tokenizer
# ------------------------------------------------------------------------------------------------


def test_byte_tokenizer_ids():
    bt = ByteTokenizer()
    assert bt.vocab_size == 264
    assert (bt.pad_token_id, bt.bos_token_id) == (256, 257)
    assert bt.eos_token_ids == (262, 258)
    assert bt.encode("A€") == [65, 0xE2, 0x82, 0xAC]
    assert bt.encode("hi", add_special_tokens=True) == [257, 104, 105]
    ids = bt.encode("<|user|>hé<|end|><eos><|assistant|>")
    assert ids == [259, 104, 0xC3, 0xA9, 262, 258, 260]
    assert bt.decode(ids) == "hé"
    assert bt.decode(ids, skip_special_tokens=False) == "<|user|>hé<|end|><eos><|assistant|>"
    assert bt.decode([0xE2, 263, 0x82, 0xAC]) == "€"  # spare / skipped ids are invisible


def test_byte_chat_template():
    bt = ByteTokenizer()
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]},
        {"role": "assistant", "content": "yo"},
    ]
    text = bt.apply_chat_template(messages)
    assert text == "<|system|>s<|end|><|user|>hi<|end|><|assistant|>yo<|end|><|assistant|>"
    assert bt.apply_chat_template(messages, add_generation_prompt=False).endswith("yo<|end|>")
    ids = bt.apply_chat_template(messages, tokenize=True)
    assert ids[:3] == [261, ord("s"), 262] and ids[-1] == 260
    assert bt.chat_template == BYTE_CHAT_TEMPLATE


# ------------------------------------------------------------------------------------------------
# Incremental decoding
# ------------------------------------------------------------------------------------------------


def _stream(tokenizer, ids, skip_special_tokens=True):
    dec = IncrementalDecoder(tokenizer, skip_special_tokens=skip_special_tokens)
    deltas = [dec.feed(i) for i in ids]
    tail = dec.flush()
    assert dec.text == "".join(deltas) + tail
    return deltas, tail


texts = st.text(st.characters(codec="utf-8"), max_size=40) | st.lists(
    st.sampled_from(["a", " ", "é", "€", "你", "🙂", "\n", "<|end|>", "<eos>"]), max_size=30
).map("".join)


@settings(max_examples=150, deadline=None)
@given(texts, st.booleans())
def test_incremental_bytes_valid_text(text, skip):
    bt = ByteTokenizer()
    ids = bt.encode(text)
    deltas, tail = _stream(bt, ids, skip)
    assert "".join(deltas) + tail == bt.decode(ids, skip_special_tokens=skip)
    if "\ufffd" not in text:
        assert not any("\ufffd" in d for d in deltas)
        assert tail == ""  # valid UTF-8: nothing left over


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 263), max_size=40), st.booleans())
def test_incremental_bytes_arbitrary_ids(ids, skip):
    """Invalid UTF-8 and truncated characters too: the stream still equals the full decode."""
    bt = ByteTokenizer()
    deltas, tail = _stream(bt, ids, skip)
    assert "".join(deltas) + tail == bt.decode(ids, skip_special_tokens=skip)


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\ufffd"), max_size=40))
def test_incremental_hf_tokenizer(tok, text):
    ids = tok.encode(text)
    deltas, tail = _stream(tok, ids)
    assert "".join(deltas) + tail == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incremental_holds_back_split_character(tok):
    # "🦀" is not in the training corpus, so its 4 UTF-8 bytes span several byte-level tokens
    ids = tok.encode("🦀")
    assert len(ids) >= 2 and tok.decode(ids[:1]) == "\ufffd"
    dec = IncrementalDecoder(tok)
    assert [dec.feed(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert dec.feed(ids[-1]) == "🦀" and dec.flush() == ""


def test_incremental_flush_of_truncated_character():
    dec = IncrementalDecoder(ByteTokenizer())
    assert dec.feed(ord("a")) == "a"
    assert dec.feed(0xE2) == "" and dec.feed(0x82) == ""
    assert dec.flush() == "\ufffd"


# ------------------------------------------------------------------------------------------------
# Conversation continuation
# ------------------------------------------------------------------------------------------------

TURN1 = [{"role": "system", "content": "S"}, {"role": "user", "content": "héllo"}]
ANSWER = {"role": "assistant", "content": "hi 🙂"}
TURN2 = [{"role": "user", "content": "more"}]


def test_render_continuation_byte():
    bt = ByteTokenizer()
    prompt = bt.apply_chat_template(TURN1, tokenize=True)
    generated = bt.encode(ANSWER["content"]) + [bt.eos_token_ids[0]]  # the model stops at <|end|>
    committed = [*TURN1, ANSWER]
    cont = render_continuation(bt, committed, TURN2)
    full = bt.apply_chat_template([*committed, *TURN2], tokenize=True)
    assert prompt + generated + cont == full
    assert render_continuation(bt, committed, TURN2, committed_ids=prompt + generated) == cont
    assert render_continuation(bt, [], TURN1) == prompt


def test_render_continuation_chatml(tok):
    committed = [*TURN1, ANSWER]
    full = tok.apply_chat_template([*committed, *TURN2], tokenize=True)
    # Rendered-prefix form: committed rendering + continuation == full rendering
    cont = render_continuation(tok, committed, TURN2)
    assert tok.apply_chat_template(committed, add_generation_prompt=False, tokenize=True) + cont == full
    # What the engine holds: prompt + generated, ending at <|im_end|> without the template's "\n"
    prompt = tok.apply_chat_template(TURN1, tokenize=True)
    generated = tok.encode(ANSWER["content"]) + [tok.token_to_id("<|im_end|>")]
    cont = render_continuation(tok, committed, TURN2, committed_ids=prompt + generated)
    assert cont[: len(tok.encode("\n"))] == tok.encode("\n")
    assert prompt + generated + cont == full


def test_render_continuation_not_prefix_stable(tmp_path, model_dir):
    t = Tokenizer.from_pretrained(model_dir)
    t.chat_template = UNSTABLE_TEMPLATE
    assert render_continuation(t, [*TURN1, ANSWER], TURN2) is None
    # the client edited the answer: the committed ids no longer match the conversation
    bt = ByteTokenizer()
    ids = bt.apply_chat_template([*TURN1, ANSWER], add_generation_prompt=False, tokenize=True)
    edited = [*TURN1, {"role": "assistant", "content": "changed"}]
    assert render_continuation(bt, edited, TURN2, committed_ids=ids) is None
