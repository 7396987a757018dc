"""What a run survives: a damaged newest checkpoint, runs of non-finite steps, a tokenizer
without a chat template. (SIGKILL and SIGTERM are in e2e/test_loop.py; bad config values in
test_configs.py; bad model folders in models/test_hf.py; bad datasets in data/test_data.py; hostile model
output in grading/test_answers.py.)"""
import json
import pathlib
import shutil
import subprocess
import types

import pytest


def _checkpoints(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def three_steps(tiny_run, tmp_path_factory):
    """A workdir after a 3-step run (checkpoints 1, 2, 3), which each damage test copies."""
    workdir = tmp_path_factory.mktemp("three_steps")
    tiny_run.run(workdir, 3)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tiny_run, three_steps, tmp_path, damage):
    workdir = tmp_path / "run"
    shutil.copytree(three_steps, workdir)
    assert _checkpoints(workdir) == [1, 2, 3]
    data = sorted((workdir / "checkpoints" / "3" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)[-1]
    if damage == "truncate":
        data.write_bytes(data.read_bytes()[:100])
    else:
        data.unlink()
    done = tiny_run.run(workdir, 4)
    assert "cannot be restored" in done.stderr and "resumed from step 2" in done.stderr
    assert sorted(tiny_run.metrics(workdir)) == [1, 2, 3, 4]
    assert _checkpoints(workdir)[-1] == 4


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_the_run_with_a_checkpoint(tiny_run, tmp_path):
    # A NaN reward for wrong and malformed answers makes every step's loss non-finite (the barely
    # warm-started tiny model gets nearly everything wrong).
    cmd = tiny_run.command(tmp_path, 10, "--config.objective.wrong_reward=nan", "--config.objective.format_reward=nan",
                   "--config.train.max_consecutive_skips=1",
                   "--config.train.checkpoint_every=100")
    done = subprocess.run(cmd, cwd=tiny_run.root, env=tiny_run.env(), capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "consecutive steps had a non-finite loss or gradient" in done.stderr
    rows = tiny_run.metrics(tmp_path)
    # Two updates per step (two mini-batches): the second consecutive skip ends step 1.
    assert sorted(rows) == [1] and rows[1]["skipped"] == 1.0
    assert _checkpoints(tmp_path) == [1]
    # The resume without the NaN rewards changes the objective the checkpoint was trained with.
    done = tiny_run.run(tmp_path, 2, "--config.train.max_consecutive_skips=5", "--allow_spec_change=objective")
    assert "resumed from step 1" in done.stderr


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hbpo_jax import config as config_lib
    from hbpo_jax import policy
    from hbpo_jax import spec as spec_lib
    from hbpo_jax.errors import ConfigError
    from tests.helpers import hf_model

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    hf_model(vocab_size=3, eos_token_id=2, bos_token_id=0).save_pretrained(tmp_path)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(tmp_path)
    config = config_lib.base_config()
    config.model_path = str(tmp_path)
    config.data.path = str(tmp_path / "unused.jsonl")
    with pytest.raises(ConfigError, match="no chat template"):
        # refused before the data or the rest of the spec is read
        policy.pretrained(types.SimpleNamespace(model=spec_lib.resolve_model(config),
                                                lora=spec_lib.resolve_lora(config)), None, ())
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
