"""The task tokenizer: round trip, single-token specials, chat template, save/load, prefixes."""
import numpy as np
import pytest

from hbpo_jax.tasks import arithmetic as A
from hbpo_jax.tasks import tokenizer as T


@pytest.fixture(scope="module")
def tok():
    return T.build_tokenizer(A.corpus_texts(600, 0))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_round_trip_on_task_text(tok):
    for ex in A.sft_examples(100, 9):
        text = tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False) + ex.response
        ids = _ids(tok, text)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_special_tokens_are_single_ids(tok):
    for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "\\boxed{", "\n"):
        assert len(_ids(tok, t)) == 1, t
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert len(_ids(tok, "x <think> y")) == len(_ids(tok, "x ")) + 1 + len(_ids(tok, " y"))
    # think tags survive skip_special_tokens (the grader needs them); chat markers do not
    text = "<|im_start|><think>\n1+1=2\n</think>\n\\boxed{2}<|im_end|>"
    assert tok.decode(_ids(tok, text), skip_special_tokens=True) == "<think>\n1+1=2\n</think>\n\\boxed{2}"


def test_digits_are_split(tok):
    vocab = tok.get_vocab()
    assert not any(sum(c.isdigit() for c in piece) > 1 for piece in vocab)
    assert len(_ids(tok, "1234567890")) == 10
    assert len(tok) < 300


def test_chat_template(tok):
    messages = [{"role": "user", "content": "Compute 3+4."}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>user\nCompute 3+4.<|im_end|>\n<|im_start|>assistant\n")
    messages.append({"role": "assistant", "content": "ok"})
    assert tok.apply_chat_template(messages, tokenize=False).endswith(
        "<|im_start|>assistant\nok<|im_end|>\n")


def test_save_load_identical(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer
    back = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    texts = [tok.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False) + ex.response
             for ex in A.sft_examples(50, 3)]
    assert [_ids(back, t) for t in texts] == [_ids(tok, t) for t in texts]
    assert back.eos_token_id == tok.eos_token_id and back.pad_token_id == tok.pad_token_id
    assert back.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                    tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert back.get_vocab() == tok.get_vocab()


def test_deterministic_and_cached(tmp_path):
    texts = A.corpus_texts(200, 1)
    a = T.build_tokenizer(texts, vocab_size=128)
    b = T.build_tokenizer(texts, vocab_size=128, workdir=str(tmp_path))
    c = T.build_tokenizer(texts, vocab_size=128, workdir=str(tmp_path))  # from the cache
    assert a.get_vocab() == b.get_vocab() == c.get_vocab()
    assert len(list(tmp_path.iterdir())) == 1
    assert T.build_tokenizer(texts, vocab_size=160).get_vocab() != a.get_vocab()


def test_prefix_tokenization_is_stable(tok):
    rng = np.random.default_rng(0)
    prefixes = [A.MINIMAL_PREFIX, ""] + [A.BUDGET_PREFIX.format(budget=b) for b in (*A.BUDGETS, 512, 2560)]
    for p in A.make_dataset(40, 4):
        prompt = tok.apply_chat_template(A.prompt_messages(p), add_generation_prompt=True, tokenize=False)
        for prefix in prefixes:
            rest = A.warm_start_response(p, rng, prefix=prefix or None)[len(prefix):]
            head, full = _ids(tok, prompt + prefix), _ids(tok, prompt + prefix + rest + tok.eos_token)
            assert full[:len(head)] == head, (prefix, rest)


def test_whole_words_are_single_tokens_only_where_they_stand_alone(tmp_path):
    budgets = tuple(str(b) for b in A.BUDGETS)
    whole = T.build_tokenizer(A.corpus_texts(300, 0), whole_words=budgets, workdir=str(tmp_path))
    split = T.build_tokenizer(A.corpus_texts(300, 0), workdir=str(tmp_path))
    assert len(list(tmp_path.iterdir())) == 2  # cached apart
    for b in budgets:
        prefix = A.BUDGET_PREFIX.format(budget=b)
        assert len(_ids(split, prefix)) == len(_ids(whole, prefix)) + len(b) - 1
        assert whole.convert_ids_to_tokens(_ids(whole, prefix))[-2] == b
        rest = A.warm_start_response(A.make_problem(0, 3), 0, prefix=prefix)[len(prefix):]
        assert _ids(whole, prefix + rest)[:len(_ids(whole, prefix))] == _ids(whole, prefix)  # pre-fill is stable
    # the operands and any number that merely contains a budget stay digit by digit
    for text in ("Compute 3+2-6+4.", "1320 321 6432"):
        assert whole.convert_ids_to_tokens(_ids(whole, text)) == split.convert_ids_to_tokens(_ids(split, text))
    for ex in A.sft_examples(60, 5):
        text = whole.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False) + ex.response
        assert whole.decode(_ids(whole, text)) == text
