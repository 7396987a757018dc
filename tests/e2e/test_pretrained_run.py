"""The product path: train from a Hugging Face model folder on a local jsonl file (what
configs/qwen1_5b.py does at scale), here with a tiny random Qwen2 on 8 CPU devices."""
import json

import numpy as np
import pytest

from hbpo_jax import config as config_lib
from hbpo_jax.data import readers as data
from hbpo_jax.models import ModelConfig, create_model, load_pretrained, save_pretrained
from hbpo_jax.tasks import arithmetic
from hbpo_jax.tasks import tokenizer as tokenizer_lib
from hbpo_jax.train import loop


@pytest.mark.slow
def test_train_from_a_model_folder_and_a_jsonl_file(tmp_path, caplog):
    tok = tokenizer_lib.build_tokenizer(arithmetic.corpus_texts(200, 0), vocab_size=128)
    cfg = ModelConfig(vocab_size=-(-len(tok) // 8) * 8, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, eos_token_ids=(tok.eos_token_id,))
    save_pretrained(create_model(cfg, seed=0), str(tmp_path / "model"), tokenizer=tok)
    rows = [{"problem": r["problem"], "answer": r["answer"], "solution": ""} for r in arithmetic.make_dataset(24, 1)]
    rows += [{"problem": "Compute 1+1.", "answer": None}, {"problem": "Compute " + "1+" * 200 + "1.", "answer": "201"}]
    data.write_jsonl(tmp_path / "train.jsonl", rows)

    config = config_lib.base_config()
    config.model_path = str(tmp_path / "model")
    config.model = {}
    config.data.path = str(tmp_path / "train.jsonl")
    r = config.rollout
    r.budgets, r.rollouts_per_prompt, r.max_prompt_len, r.max_response_len = (16, 32), 4, 64, 48
    config.objective.l_max = 48
    t = config.train
    t.steps, t.prompts_per_step, t.mini_batches, t.micro_batch_size, t.checkpoint_every = 2, 4, 2, 8, 1
    config.optim.learning_rate = 1e-3
    config.grading.workers = 1
    caplog.set_level("WARNING")
    summary = loop.run(config, str(tmp_path / "work"))

    assert summary["steps"] == 2
    assert "answer_missing" in caplog.text  # the row without an answer was skipped and counted
    assert "longer than rollout.max_prompt_len" in caplog.text
    lines = [json.loads(x) for x in (tmp_path / "work" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2] and all(np.isfinite(x["loss"]) for x in lines)
    # The exported policy loads back, with the tokenizer, and differs from the initial weights.
    exported = load_pretrained(summary["export"])
    start = load_pretrained(str(tmp_path / "model"))
    assert exported.tokenizer("Compute 1+2.")["input_ids"] == tok("Compute 1+2.")["input_ids"]
    diff = np.abs(np.asarray(exported.model.embed.get_value()) - np.asarray(start.model.embed.get_value())).max()
    assert diff > 0
