"""What launch/bench.py measures: the settings (full or smoke), the sections with their worker
group, priority and time estimate, the order they run and are shown in, and each one's shape
column. The parent (harness, report) and the workers (runner) read this table."""
from __future__ import annotations

import dataclasses

# The paper's training setup (arXiv 2507.15844: DeepScaleR-1.5B, 64 prompts x 16 rollouts,
# responses up to 4,096 tokens), as the projection row uses it.
PAPER = dict(steps=629, prompts=64, rollouts=16, prompt_len=256, mean_response=2400, max_response=4096,
             max_batch=256)


def bench_settings(smoke: bool = False) -> dict:
    """What `harness.run` measures. Full: the Qwen2-1.5B shape in bf16 (estimates in seconds on an
    H100, compilation included). Smoke: the same code paths at toy size, on a CPU in a minute or two."""
    if smoke:
        return dict(
            mode="smoke", model="tiny", model_changes=dict(num_layers=1), dtype="float32", prompt_len=8,
            new_tokens=8, sampler_batches=[2, 1], sampler_repeats=2, train_batch=2, train_seq=32, train_prompt=1,
            train_repeats=2,
            train_large=[[4, "full"], [2, "full"]],
            hbpo=dict(prompts=1, rollouts=2, prompt_len=8, response_len=8, mini_batches=2, micro=1, remat="full"),
            copy_bytes=1 << 24, matmul_n=256, hf_warmup_tokens=2, hf_repeats=1, hf_train_repeats=2,
            budget_s=420.0, grace_s=30.0, section_timeout_s=None,
            startup_est={"jax": 8.0, "torch": 10.0}, est_scale=0.1)
    return dict(
        mode="full", model="qwen1_5b", model_changes={}, dtype="bfloat16", prompt_len=256, new_tokens=512,
        sampler_batches=[256, 64], sampler_repeats=3, train_batch=4, train_seq=2048, train_prompt=1, train_repeats=3,
        train_large=[[16, "full"], [8, "full"]],
        # rows = prompts x rollouts = the small sampler batch and the same lengths, so the rollout
        # reuses that section's compiled sampler; the paper's remat for the update.
        hbpo=dict(prompts=4, rollouts=16, prompt_len=256, response_len=512, mini_batches=4, micro=16, remat="full"),
        copy_bytes=1 << 31, matmul_n=8192, hf_warmup_tokens=4, hf_repeats=1, hf_train_repeats=3,
        budget_s=375.0, grace_s=15.0, section_timeout_s=None,
        startup_est={"jax": 25.0, "torch": 20.0}, est_scale=1.0)


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    group: str  # "jax" or "torch": the worker process kind
    priority: int  # lower runs first when time is short; higher-priority work keeps its time
    est_s: float  # full-mode estimate on an H100, compilation included
    job: str
    impl: str


SECTIONS = {s.name: s for s in [
    Section("ceilings", "jax", 0, 8, "ceilings", "jax"),
    Section("sampler_large", "jax", 1, 50, "sampler (generate)", "hbpo_jax"),
    Section("sampler_small", "jax", 2, 40, "sampler (generate)", "hbpo_jax"),
    Section("train_small", "jax", 3, 70, "training step", "hbpo_jax"),
    Section("hf_sampler_large", "torch", 4, 40, "sampler (generate)", "transformers"),
    Section("hf_sampler_small", "torch", 5, 32, "sampler (generate)", "transformers"),
    Section("hf_train", "torch", 6, 12, "training step", "transformers"),
    Section("hbpo_fraction", "jax", 7, 70, "HBPO step (fraction)", "hbpo_jax"),
    Section("train_large", "jax", 8, 75, "training step (largest batch)", "hbpo_jax"),
    Section("train_xla", "jax", 9, 60, "training step", "hbpo_jax (xla attention)"),
]}
PLAN = [("jax", ["ceilings", "sampler_large", "sampler_small", "train_small", "hbpo_fraction", "train_large",
                 "train_xla"]),
        ("torch", ["hf_sampler_large", "hf_sampler_small", "hf_train"])]

DISPLAY = ["ceilings", "sampler_large", "hf_sampler_large", "sampler_small", "hf_sampler_small", "train_small",
           "train_xla", "train_large", "hf_train", "hbpo_fraction"]  # table order


def section_shape(name: str, s: dict) -> str:
    """The shape column of a section's rows (also of its failed/skipped row)."""
    p, n = s["prompt_len"], s["new_tokens"]
    if name in ("sampler_large", "hf_sampler_large"):
        return f"B={s['sampler_batches'][0]}, prompt {p}, +{n} tokens"
    if name in ("sampler_small", "hf_sampler_small"):
        return f"B={s['sampler_batches'][1]}, prompt {p}, +{n} tokens"
    if name in ("train_small", "hf_train", "train_xla"):
        return f"{s['train_batch']} x {s['train_seq']} tokens"
    if name == "train_large":
        return " or ".join(f"{b} x {s['train_seq']}" for b, _ in s["train_large"])
    if name == "hbpo_fraction":
        h = s["hbpo"]
        return (f"{h['prompts']} prompts x {h['rollouts']} rollouts, prompt {h['prompt_len']}, "
                f"+{h['response_len']} tokens")
    return ""
