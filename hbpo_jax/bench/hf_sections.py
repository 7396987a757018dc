"""The transformers baseline sections of launch/bench.py (the torch worker): `generate` at the
sampler sections' shapes and one training step at the training section's shape."""
from __future__ import annotations

import time

from hbpo_jax.bench import hf
from hbpo_jax.bench.common import bench_model_config, decode_bytes, failure_reason, median, progress
from hbpo_jax.bench.settings import section_shape
from hbpo_jax.bench.train_sections import OPTIM


class TorchContext:
    """The torch worker's model (made on first use) and settings."""

    def __init__(self, s: dict):
        import torch
        import transformers

        self.torch, self.transformers, self.s = torch, transformers, s
        self.cfg = bench_model_config(s["model"], s["dtype"], **s.get("model_changes", {}))
        self.device = hf.device()
        self._model = None

    def info(self) -> dict:
        """Versions and the device, for the table's header."""
        torch = self.torch
        try:
            name = torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu"
        except Exception as e:  # noqa: BLE001
            name = f"unavailable ({failure_reason(e)[:80]})"
        return dict(torch=torch.__version__, transformers=self.transformers.__version__, torch_device=name,
                    torch_cuda=torch.version.cuda)

    def model(self):
        if self._model is None:
            t = time.time()
            self._model = hf.model(self.cfg, self.device, self.s["dtype"])
            hf.sync(self.device)
            progress(f"transformers model on {self.device} in {time.time() - t:.1f} s "
                     f"(attention {self._model.config._attn_implementation})")
        return self._model

    def free(self) -> None:
        if self.device == "cuda":
            self.torch.cuda.empty_cache()


def hf_sampler(ctx: TorchContext, emit_row, name: str) -> None:
    """name: "hf_sampler_large" or "hf_sampler_small": a short warm-up call, then timed calls."""
    s = ctx.s
    batch = s["sampler_batches"][0 if name == "hf_sampler_large" else 1]
    p, n = s["prompt_len"], s["new_tokens"]
    model = ctx.model().eval()
    ids = hf.random_prompts(ctx.cfg.vocab_size, batch, p, ctx.device, seed=batch)
    warm, _ = hf.generate_seconds(model, ids, s["hf_warmup_tokens"], ctx.device)
    times = []
    for _ in range(s["hf_repeats"]):
        dt, out = hf.generate_seconds(model, ids, n, ctx.device)
        times.append(dt)
        progress(f"generate {n} tokens: {dt:.2f} s")
    if out.shape[1] != p + n:
        raise RuntimeError(f"generate returned {out.shape[1] - p} new tokens, expected {n}")
    total = median(times)
    emit_row(kind="sampler", job="sampler (generate)", impl=f"transformers {ctx.transformers.__version__} (sdpa)",
             shape=section_shape(name, s), tokens_per_s=batch * n / total, step_s=total / n,
             step_label="token (end to end)", compile_s=None, batch=batch, kv_read=None,
             notes=f"do_sample, min_new_tokens={n}, dynamic cache; {s['hf_repeats']} timed call(s) after a "
                   f"{s['hf_warmup_tokens']}-token warm-up ({warm:.1f} s); ms/step = call time / {n}",
             **{k: v for k, v in decode_bytes(ctx.cfg, batch, p, n).items() if k != "kv_read"})
    del out
    ctx.free()


def hf_train(ctx: TorchContext, emit_row) -> None:
    """Forward with labels, backward, clipping and torch's AdamW at the training section's shape."""
    torch, s = ctx.torch, ctx.s
    b, seq = s["train_batch"], s["train_seq"]
    model = ctx.model().train()
    opt = torch.optim.AdamW(model.parameters(), lr=OPTIM.learning_rate, betas=(OPTIM.b1, OPTIM.b2),
                            weight_decay=OPTIM.weight_decay)
    ids = hf.random_prompts(ctx.cfg.vocab_size, b, seq, ctx.device)
    times = []
    for r in range(1 + s["hf_train_repeats"]):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        loss = loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hf.sync(ctx.device)
        times.append(time.perf_counter() - t)
        progress(f"{'warm-up' if r == 0 else 'timed'} step: {times[-1]:.3f} s")
    step = median(times[1:])
    tokens = b * seq
    emit_row(kind="train", job="training step", impl=f"transformers {ctx.transformers.__version__} (sdpa)",
             shape=section_shape("hf_train", s), tokens_per_s=tokens / step, step_s=step, step_label="update",
             compile_s=None, flops_per_s=6 * ctx.cfg.num_params() * tokens / step, flops_rule="6N", batch=b,
             notes=f"forward with labels (cross-entropy), backward, clip 1.0, torch.optim.AdamW; "
                   f"{s['dtype']} params and moments; median of {s['hf_train_repeats']}; loss {loss.item():.3f}")
    del opt, loss
    model.eval()
    ctx.free()
