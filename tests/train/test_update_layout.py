"""The update's layout on a TPU slice (compiled here for a TPU topology, libtpu, no TPU): FSDP
gathers each layer's weights whole for its matmuls, so XLA makes no windowed einsum that splits
a matmul on its contracting dimension, moves no activation through an all-to-all, and gathers one
layer at a time (never the stacked weights of every layer)."""
import math
import pathlib
import re
import sys

import jax
import pytest

from hbpo_jax.plan import hlo
from hbpo_jax.plan import programs as plan

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from configs import qwen1_5b  # noqa: E402

# A 2-layer cut of Qwen2-1.5B's shapes (narrower, a smaller vocabulary), packed rows of 1,024
# tokens, one lane per chip of v5p:2x2x2 (8 chips, FSDP over all 8).
MODEL = dict(num_layers=2, hidden_size=1024, intermediate_size=4096, num_heads=8, num_kv_heads=2, head_dim=128,
             vocab_size=32768, eos_token_ids=(2,), bos_token_id=1)


def _config():
    config = qwen1_5b.get_config("pod")
    config.model.update(MODEL)
    r = config.rollout
    r.budgets, r.rollouts_per_prompt, r.max_prompt_len, r.max_response_len = (256, 512), 8, 128, 896
    config.objective.l_max = 896
    t = config.train
    t.prompts_per_step, t.mini_batches, t.micro_batch_size = 2, 1, 8
    return config


def collective_results(text: str, opcode: str) -> list[tuple[tuple[int, ...], str]]:
    """(result dims, the instruction's line) of each `opcode` instruction in an HLO module's text
    (an async start's tuple result: its last array, the output)."""
    out = []
    for line in text.splitlines():
        m = re.search(rf"= (\(?[^=]*?) {opcode}\(", line)
        if m:
            shapes = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
            out.append((tuple(int(d) for d in shapes[-1].split(",") if d) if shapes else (), line))
    return out


@pytest.mark.slow
def test_fsdp_gathers_weights_whole_and_moves_no_activation(monkeypatch):
    pytest.importorskip("libtpu")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    config = _config()
    mesh = plan.topology_mesh(config.mesh, "v5p:2x2x2")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    # The project's default matmul precision (conftest's "highest" asks Mosaic for float32
    # contractions of bfloat16 tiles in splash, which it rejects).
    with jax.default_matmul_precision("default"):
        text = plan.lower_train_step(config, mesh).compile().as_text()
    assert hlo.Module(text).loops()  # parses: the micro-batch scan, the layer scans, the head's chunks
    # No windowed einsum, no collective-permute: before, each q/k/v/gate/up/lm-head matmul was a
    # ring of collective-permutes over 1/8 slices of its contracting dimension (K = E / 8), and
    # each weight gradient a ring of 1/8 slices of its output re-reading the whole other operand.
    assert "windowed_dot_general" not in text
    assert not collective_results(text, "collective-permute-start")
    assert not collective_results(text, "collective-permute")
    # No all-to-all of activations around splash or the layers. Those left: the lm head's 1/8
    # resharded E -> V for the vocabulary-parallel log-probs (update._vocab_parallel) and its
    # gradient back, and the embedding lookup's gradient: each chip's [rows, T, E] cotangent sent to
    # the chips that hold its E slice of the stored table, cheaper than scattering into a whole
    # [V, E] table and reducing that.
    e, v = MODEL["hidden_size"], MODEL["vocab_size"]
    for dims, line in collective_results(text, "all-to-all"):
        assert "scatter-add" in line or math.prod(dims) * 8 == e * v, line
    # Each layer's weights gathered whole inside the layer loop, one layer at a time: [1, ...]
    # slices, never the stacked [L, ...] weights of every layer (a constraint on the gathered
    # slice, unpinned, would propagate back through the scan and gather all of them up front).
    layers = MODEL["num_layers"]
    gathers = collective_results(text, "all-gather") + collective_results(text, "all-gather-start")
    weights = [dims for dims, _ in gathers if e in dims and math.prod(dims) >= e * 2 * 128]
    assert [d for d in weights if d[0] == 1 and len(d) > 2], weights  # per-layer slices
    assert not [d for d in weights if d[0] == layers and len(d) > 2], weights
    # The embedding table gathered once per micro-batch (bounded by [V, E]); nothing bigger.
    assert max(math.prod(d) for d in weights) <= e * v
