import pytest

from leanserve.engine.detokenizer import IncrementalDetokenizer
from leanserve.models.loader import builtin_model_path
from leanserve.models.tokenizer import Tokenizer

TEXT = "Sure! The answer is 42. 日本語 works 🤖👨‍👩‍👧 too, END of story."


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(builtin_model_path())


@pytest.fixture(scope="module")
def prompt(tok):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say something."}]), add_special_tokens=False)


def stream(tok, prompt, ids, stop=(), **kwargs):
    """All deltas from add(), the stop matched, and the deltas joined with flush() when nothing matched."""
    detok = IncrementalDetokenizer(tok, prompt, list(stop), **kwargs)
    deltas = []
    for token_id in ids:
        text, matched = detok.add(token_id)
        deltas.append(text)
        if matched:
            assert detok.output_text == "".join(deltas)
            return deltas, matched, detok.output_text
    deltas.append(detok.flush())
    assert detok.output_text == "".join(deltas)
    return deltas, None, detok.output_text


def test_deltas_concatenate_to_decode(tok, prompt):
    ids = tok.encode(TEXT) + [2] + tok.encode(" after the end")
    for skip in (True, False):
        deltas, stop, text = stream(tok, prompt, ids, skip_special_tokens=skip)
        assert stop is None and text == tok.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" in text


def test_multibyte_characters_are_never_split(tok, prompt):
    ids = tok.encode("日本語 🤖👨‍👩‍👧")
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # byte-level BPE: some tokens hold partial characters
    deltas, _, text = stream(tok, prompt, ids)
    assert text == "日本語 🤖👨‍👩‍👧" and not any("\ufffd" in d for d in deltas)
    assert "" in deltas  # a token that only starts a character emits nothing


def test_truncated_character_is_released_on_flush(tok, prompt):
    ids = tok.encode("ok 🤖")[:-1]  # the emoji's last byte never comes
    assert stream(tok, prompt, ids)[2] == tok.decode(ids) == "ok \ufffd"


@pytest.mark.parametrize("stop", ["END", "is 42", "日本", "🤖👨"])
def test_stop_string_across_tokens(tok, prompt, stop):
    ids = tok.encode(TEXT)
    deltas, matched, text = stream(tok, prompt, ids, stop=["never", stop])
    assert matched == stop and text == TEXT[:TEXT.index(stop)]
    assert len(deltas) < len(ids)  # stopped as soon as the stop string was complete


def test_stop_string_at_the_very_start(tok, prompt):
    deltas, matched, text = stream(tok, prompt, tok.encode(TEXT), stop=["Sure"])
    assert (deltas, matched, text) == ([""], "Sure", "")


def test_earliest_stop_wins(tok, prompt):
    _, matched, text = stream(tok, prompt, tok.encode(TEXT), stop=["story", "answer"])
    assert (matched, text) == ("answer", "Sure! The ")


def test_held_back_prefix_is_released(tok, prompt):
    ids = tok.encode("The answer is 42 and 43")
    deltas, matched, text = stream(tok, prompt, ids, stop=["42!", "43 apples"])
    assert matched is None and text == "The answer is 42 and 43"
    assert deltas[-1] == "43"  # "43" could still start "43 apples" until the stream ended
    index = ids.index(tok.encode("4")[0])  # after "4" is generated, the text stops at "is "
    assert "".join(deltas[:index + 1]).endswith("is ")


def test_each_step_decodes_a_small_window(tok, prompt):
    calls = []

    class Recording:
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode(TEXT * 20)
    assert stream(Recording(), prompt, ids)[2] == TEXT * 20
    assert max(calls) <= 16
