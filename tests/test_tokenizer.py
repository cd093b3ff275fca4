import io
import json
import os

import gguf
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers

from leanserve.errors import InvalidRequest, ModelLoadError
from leanserve.models.loader import builtin_model_path
from leanserve.models.tokenizer import Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "12345 and 3.14159, or 1,000,000 apples",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)  # slow\n\n\tx = {'a': [1, 2]}\r\n",
    "naïve café — 日本語のテキスト, Ελληνικά, 🤖🎉 and 👨‍👩‍👧 emoji",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "   leading and trailing spaces   ",
    "I'm sure they'll say WE'VE done it",
    "",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def smol():
    return Tokenizer.from_gguf(builtin_model_path())


def test_special_tokens(smol):
    assert smol.encode("<|im_start|>", add_special_tokens=False) == [1]
    assert (smol.bos_token, smol.bos_token_id, smol.eos_token, smol.eos_token_ids) == ("<|im_start|>", 1, "<|im_end|>", {2})
    assert smol.all_special_ids == set(range(17)) and smol.vocab_size == 49152
    assert smol.encode("hi") == smol.encode("hi", add_special_tokens=False)  # add_bos_token is false in this GGUF
    ids = smol.encode("<|im_start|>user hi<|im_end|>")
    assert smol.decode(ids) == "user hi"
    assert smol.decode(ids, skip_special_tokens=False) == "<|im_start|>user hi<|im_end|>"
    assert smol.token_text(smol.encode(" hello")[0]) == " hello"


def test_smollm_splits_every_digit(smol):
    """llama.cpp's "smollm" pre-tokenizer (like SmolLM2's tokenizer.json) isolates each digit first.
    transformers' GGUF loader does not, so it merges " ²" into one token where we give " " + "²"."""
    assert smol.encode(" ²³") == smol.encode(" ") + smol.encode("²") + smol.encode("³")
    assert smol.encode("2024") == [smol.encode(d)[0] for d in "2024"]


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(smol, tmp_path):
    from transformers import AutoTokenizer

    path = builtin_model_path()
    reference = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for text in TEXTS:
        ids = smol.encode(text)
        assert ids == reference.encode(text), text
        assert smol.decode(ids, skip_special_tokens=False) == text
        assert smol.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    expected = reference.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert smol.apply_chat_template(MESSAGES) == expected

    # the same tokenizer as a Hugging Face folder (transformers writes tokenizer.json + chat_template.jinja)
    reference.save_pretrained(tmp_path)
    folder = Tokenizer.from_hf_folder(str(tmp_path), {"eos_token_id": [2, 0]})
    folder_reference = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert folder.encode(text) == folder_reference.encode(text), text
    assert folder.apply_chat_template(MESSAGES, add_generation_prompt=False) == \
        folder_reference.apply_chat_template(MESSAGES, tokenize=False)
    assert (folder.bos_token_id, folder.eos_token_ids, folder.vocab_size) == (1, {0, 2}, 49152)


def tiny_folder(path, **tokenizer_config):
    """A word-level tokenizer.json and the given tokenizer_config.json."""
    backend = Backend(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3, "there": 4}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return str(path)


def test_hf_folder_special_tokens_and_bos(tmp_path):
    added = {"5": {"content": "<tool>", "special": True}, "6": {"content": "<think>", "special": False}}
    tok = Tokenizer.from_hf_folder(tiny_folder(tmp_path, bos_token={"content": "<s>"}, eos_token="</s>",
                                               add_bos_token=True, added_tokens_decoder=added))
    assert tok.encode("hi there") == [1, 3, 4] and tok.encode("hi", add_special_tokens=False) == [3]
    assert tok.encode("hi<tool><think>", add_special_tokens=False) == [3, 5, 6]
    assert tok.all_special_ids == {1, 2, 5} and tok.eos_token_ids == {2} and tok.vocab_size == 7
    assert tok.decode([1, 3, 5, 6]) == "hi <think>"


def test_hf_folder_chat_template_sources(tmp_path):
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "default"}]
    assert Tokenizer.from_hf_folder(tiny_folder(tmp_path, chat_template=named)).apply_chat_template([]) == "default"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from json"}))
    assert Tokenizer.from_hf_folder(str(tmp_path)).apply_chat_template([]) == "from json"
    (tmp_path / "chat_template.jinja").write_text("from jinja")
    assert Tokenizer.from_hf_folder(str(tmp_path)).apply_chat_template([]) == "from jinja"


def test_hf_folder_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_folder(str(tmp_path))


def template_tokenizer(tmp_path, template):
    return Tokenizer.from_hf_folder(tiny_folder(tmp_path, bos_token="<s>", eos_token="</s>", chat_template=template))


def test_chat_template_rendering(tmp_path):
    template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m.content | tojson }}\n{% endfor %}"
                "{% if add_generation_prompt %}{{ greeting }}{% endif %}{{ strftime_now('%Y')[:2] }}")
    tok = template_tokenizer(tmp_path, template)
    messages = [{"role": "user", "content": "<b>café</b> & \"you\""}]
    assert tok.apply_chat_template(messages, greeting="bot:") == '<s>user: "<b>café</b> & \\"you\\""\nbot:20'
    assert tok.apply_chat_template(messages, add_generation_prompt=False, greeting="bot:").endswith('"\n20')


def test_chat_template_errors(tmp_path):
    tok = template_tokenizer(tmp_path, "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                                       "{% endif %}{{ messages[0]['content'] + 1 }}")
    with pytest.raises(InvalidRequest, match="^first must be user$"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(InvalidRequest):  # str + int: the client's data does not fit the template
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    (tmp_path / "plain").mkdir()
    with pytest.raises(InvalidRequest, match="no chat template"):
        Tokenizer.from_hf_folder(tiny_folder(tmp_path / "plain")).apply_chat_template([])
    with pytest.raises(InvalidRequest):  # the sandbox refuses to reach into Python internals
        template_tokenizer(tmp_path, "{{ messages.__class__.__mro__ }}").apply_chat_template([])


def test_sentencepiece_gguf_matches_sentencepiece(tmp_path):
    """A "llama" (SentencePiece BPE) GGUF, written the way llama.cpp's converter does, encodes like
    sentencepiece itself; byte fallback covers characters the vocabulary lacks."""
    import sentencepiece as spm

    corpus = io.BytesIO()
    lines = open(os.path.join(os.path.dirname(__file__), "test_loader.py"), encoding="utf-8").read().splitlines()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=corpus, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, user_defined_symbols=["<tool>"],
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=corpus.getvalue())

    def token_type(i):
        for kind, check in [("UNKNOWN", sp.is_unknown), ("CONTROL", sp.is_control), ("BYTE", sp.is_byte)]:
            if check(i):
                return gguf.TokenType[kind]
        return gguf.TokenType.USER_DEFINED if sp.id_to_piece(i) == "<tool>" else gguf.TokenType.NORMAL

    n = sp.get_piece_size()
    writer = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([token_type(i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        write()
    tok = Tokenizer.from_gguf(str(tmp_path / "spm.gguf"))

    for text in TEXTS[:4] + TEXTS[5:7] + ["x", "  two  spaces"]:
        ids = tok.encode(text)  # llama.cpp adds BOS to a SentencePiece vocabulary unless told otherwise
        assert ids == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(ids) == sp.decode(sp.encode(text)) == text
    # like llama.cpp, user-defined tokens stay whole and a space is prefixed to each text piece after them
    assert tok.encode("a<tool>b", add_special_tokens=False) == sp.encode("a") + [sp.piece_to_id("<tool>")] + sp.encode("b")


def test_unsupported_gguf_tokenizer(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[CLS]", "a"])
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file, writer.close):
        write()
    with pytest.raises(ModelLoadError, match="'bert'"):
        Tokenizer.from_gguf(str(tmp_path / "bert.gguf"))
