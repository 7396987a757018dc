"""HBPO on DeepSeek-R1-Distill-Qwen-1.5B: the paper's setup (Lyu et al. 2025, "Hierarchical Budget
Policy Optimization for Adaptive Reasoning", arXiv:2507.15844, training setup).

    python launch/train.py --config=configs/qwen1_5b.py \
        --config.model_path=/data/DeepSeek-R1-Distill-Qwen-1.5B \
        --config.data.path=/data/deepscaler.json --workdir=/runs/hbpo

A pod slice: `--config=configs/qwen1_5b.py:pod` (every host runs the same command).
One Colab v5e-1 chip (16 GiB): `--config=configs/qwen1_5b.py:colab`, LoRA rank 16 on every
projection with the base frozen in bfloat16, at the real-model notebook's batch and lengths
(8 prompts x 8 rollouts, prompts of 256 tokens, L_max 1,024, budgets 128-768, micro-batches of
4); its TPU plan (docs/real_models.md, "What fits a Colab TPU (v5e-1)"):
    python launch/memory.py --config=configs/qwen1_5b.py:colab --topology=v5e:1x1
"""
from ml_collections import config_dict

from hbpo_jax import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.name = "hbpo-qwen1_5b"
    # DeepSeek-R1-Distill-Qwen-1.5B (Qwen2): 1,777,088,000 parameters.
    config.model = config_dict.ConfigDict(dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
        num_kv_heads=2, head_dim=128, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=False, max_position_embeddings=131072, bos_token_id=151646,
        eos_token_ids=(151643,), dtype="bfloat16", param_dtype="float32",
        attention_impl="auto", remat="full", scan_layers=True))  # auto: splash on TPU, cuDNN on GPU
    config.model_path = "/data/models/DeepSeek-R1-Distill-Qwen-1.5B"
    config.data.path = "/data/deepscaler/deepscaler.json"
    config.data.field_map = "deepscaler"

    r = config.rollout
    r.budgets = (512, 1024, 2048, 2560)
    r.rollouts_per_prompt = 16  # 4 per budget
    r.max_prompt_len = 1024
    r.max_response_len = 4096  # L_max
    r.temperature = 1.0
    r.top_p = 1.0
    # Every rollout in flight (issue 28): 1,024 decode slots, so each decode step's weight read
    # serves all of a chip's rows (128 per chip on v5p-16's 8 chips, 64 on v5e-16's 16), and a
    # step is one prefill, one admit and one decode loop. The rows' KV does not fit whole (1,024 x
    # (1,024 + 16 + 4,096) tokens x 28,672 B = 151 GB) but their live KV does (the real mix's peak:
    # 1.2-3.2 GB per v5p-16 chip, at most ~0.9 M tokens): a pool of 2^21 tokens (60 GB: 7.5 GB per
    # chip on 8 chips, 3.75 GB on 16) gives pages on demand with room for ~2.3x that peak.
    r.max_batch = 0
    r.kv_tokens = 2 ** 21

    config.objective.name = "hbpo"

    t = config.train
    t.steps = 629  # one epoch of DeepScaleR-Preview at 64 prompts per step
    t.prompts_per_step = 64
    t.mini_batches = 4  # PPO mini-batch of 16 prompts = 256 sequences
    t.micro_batch_size = 16  # sequences per forward/backward (gradient accumulation)
    t.update_width_step = 1024  # (rows layout only) micro-batches grouped by length, cut to 1,024 ... 4,096
    # Rows packed by tokens (train/packing.py): micro-batches of 16 lanes x 5,120 tokens (the
    # unpacked micro-batch at the cap, whose memory the plan compiles), empty ones skipped and a
    # mini-batch's last one in half lanes run at half width when its rows fit that way: the update
    # pays for real tokens (5.4% padding at HBPO's mix; 10.8% with full micro-batches only, 44%
    # grouped by width: launch/bench_packing.py) and compiles one program per run.
    t.pack_rows = True
    t.ppo_epochs = 1

    o = config.optim
    o.learning_rate = 1e-6
    o.schedule = "constant"
    o.warmup_steps = 0
    o.weight_decay = 0.01
    o.b1, o.b2 = 0.9, 0.999
    o.grad_clip = 1.0

    # FSDP over every chip of a slice: parameters and AdamW state (~21 GB in float32) split as
    # thinly as the chips allow, their all-gathers on the slice's ICI. One host: its chips.
    config.mesh.shape = (1, -1, 1)
    if arg == "pod":
        # A pod slice (every host runs the same command): the same mesh over all of the slice's
        # chips. Over several slices (multislice) the shape is per slice and `data` runs across
        # slices (sharding.make_mesh), so only the gradient all-reduce crosses DCN. The plan
        # (docs/tpu.md) compares this with (-1, 4, 1), FSDP within a host.
        # The update's plan (launch/memory.py --config=configs/qwen1_5b.py:pod --topology=...
        # --programs=train, `update:`; docs/tpu_plan.md, "The update's bytes"), each layer's
        # weights gathered whole over FSDP, rows packed by tokens, HBM bytes per chip per
        # mini-batch: FSDP over all chips stays the default; remat "auto" picks per chip
        # (qwen2.resolve_remat): "dots" (matmul outputs saved, the rest recomputed: 13% fewer
        # flops than "full") is compute bound on v5p-32 and v5e-16; on v6e-8 (two lanes a chip)
        # "dots" is memory bound and "full" compute bound and a little faster, so v6e takes
        # "full". The one-host default keeps "full" (a v5e-8 holds two lanes a chip).
        # The layers unrolled (not one scan): a scan saves each layer's residuals into stacked
        # [L, ...] buffers, and XLA then writes every saved matmul output twice (into the stack
        # and for its consumer) and gathers each layer's weights again in the backward; unrolled,
        # v5p-32's update moves 1.85 TB instead of 2.14 at the same flops (v5e-16 1.40 instead
        # of 1.49; peaks 13.3 / 12.8 GiB) and gathers each weight half as often, for an update
        # that compiles in about twice the time.
        config.distributed = True
        config.model.remat = "auto"
        config.model.scan_layers = False
    elif arg == "colab":
        config.lora.rank, config.lora.alpha = 16, 32.0  # every projection; the base in bfloat16
        config.optim.learning_rate = 1e-5  # adapters take larger steps than full fine-tuning
        r.budgets, r.rollouts_per_prompt = (128, 256, 512, 768), 8
        r.max_prompt_len, r.max_response_len, r.max_batch = 256, 1024, 0
        t.prompts_per_step, t.mini_batches, t.micro_batch_size, t.update_width_step = 8, 2, 4, 0
        t.pack_rows = False  # the plan of this shape (docs/real_models.md) was compiled with rows at their widths
    elif arg:
        raise ValueError(f"configs/qwen1_5b.py takes no argument, 'pod' or 'colab', got {arg!r}.")
    return config
