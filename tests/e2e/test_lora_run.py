"""LoRA end to end (launch/train.py on the tiny config with --config.lora.rank=4): it trains,
its checkpoints hold the adapters only, a rerun resumes from them (the base read again from the
warm start) to the metrics of an uninterrupted run, and the export is a plain HF folder with the
adapters merged."""
import json

import numpy as np
import pytest

LORA = ("--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.lora.base_dtype=float32",
        "--config.optim.learning_rate=1e-2")


@pytest.mark.slow
def test_lora_trains_checkpoints_resumes_and_exports(tiny_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tiny_run.run(straight, 3, *LORA, "--config.train.export_hf=True")
    tiny_run.run(resumed, 2, *LORA)
    done = tiny_run.run(resumed, 3, *LORA)
    assert "resumed from step 2" in done.stderr
    want, got = tiny_run.metrics(straight), tiny_run.metrics(resumed)
    assert sorted(got) == [1, 2, 3] and all(np.isfinite(row["loss"]) for row in want.values())
    for key, value in want[3].items():
        np.testing.assert_allclose(got[3][key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # The checkpoint's parameters are the adapters (A and B per target), nothing of the base.
    tree = json.loads((straight / "checkpoints" / "3" / "state" / "_METADATA").read_text())["tree_metadata"]
    params = [k for k in tree if k.startswith("('params'")]
    assert params and all("_lora'" in k for k in params), params[:4]
    assert len(params) == 2 * 7
    # The export: config.json without LoRA, weights W + scale A B that our loader reads as a plain model.
    from hbpo_jax.models import load_pretrained
    config = json.loads((straight / "export" / "config.json").read_text())
    assert not any("lora" in k for k in config)
    model, cfg, _ = load_pretrained(str(straight / "export"))
    assert cfg.lora_rank == 0 and model(np.ones((1, 4), np.int32)).shape[-1] == cfg.vocab_size
