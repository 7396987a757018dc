"""HBPO on a small instruct model (Qwen2.5-0.5B/1.5B-Instruct class) with reasoning-gym problems,
for ablations on one v5e-1 chip or one GPU.

    python launch/train.py --config=configs/qwen0_5b_instruct.py \
        --config.model_path=/data/Qwen2.5-0.5B-Instruct --workdir=/runs/hbpo-0.5b
    python launch/eval.py --config=configs/qwen0_5b_instruct.py --checkpoint=/runs/hbpo-0.5b/export

What differs from the paper's R1-Distill setup (configs/qwen1_5b.py), and why:
  - An instruct model does not think in <think> tags by itself: the `r1_zero` prompt preset asks
    for reasoning in <think> </think> and a \\boxed{} answer, and grading is `lenient` (a boxed
    answer without any think block counts; a think block opened and never closed is still a
    format error). Without both, the real 0.5B scores 0% with 100% format errors
    (docs/real_models.md).
  - Budgets and L_max scaled to a model that answers arithmetic in ~100-300 tokens:
    128 / 256 / 512 / 768 in L_max = 1,024.
  - Training data: reasoning-gym's basic_arithmetic and chain_sum, generated offline (rg:); the
    eval's rg:basic_arithmetic comes from `seed`, the training problems from data.seed, so it is
    held out.
  - lr 2e-6 (the paper's 1e-6 is for 1.5B; smaller models usually take a larger step) for 60
    steps of 8 prompts x 8 rollouts. What was measured, on a 2-core CPU only (docs/real_models.md):
    before training, 18.8% accuracy and 3.1% format errors (natural, greedy, 32
    rg:basic_arithmetic problems); 2 training steps of 1 prompt x 4 rollouts with finite losses
    (rollout 51-139 s, update ~140 s per step, 16 GB resident). No lr sweep was possible without an
    accelerator: lr and steps are a starting point, not a tuned value.

Memory plan for one v5e-1 chip (16 GB HBM), 0.5B (494,032,768 parameters with tied embeddings;
630 M when the head is untied, as in the GGUF-converted folder), by hand:
  parameters float32 2.0 GB + AdamW moments 4.0 GB + gradients 2.0 GB = 8.0 GB of state;
  the rollout KV cache (bfloat16, 24 layers x 2 KV heads x 64 dims x 2 (K, V) x 2 B = 12 KB per
  token) for 64 rows x (256 prompt + 1,024 response) slots = 1.0 GB; the update's log-probs run in
  512-token chunks (trainer.chunked_logprobs), so its largest activation is a micro-batch of
  4 x 512 x 151,936 float32 logits = 1.2 GB, with full remat for the layers. About 11 GB in all.
  The only instrument run so far, `python launch/memory.py --config=configs/qwen0_5b_instruct.py`
  on a CPU, gives XLA:CPU's plan, not a TPU's: parameters 1.84 GiB + AdamW 3.68 GiB; per device,
  train step (one mini-batch) 5.52 GiB arguments + 43.37 GiB temporaries, sampler prefill 8.25 GiB,
  decode loop 5.27 GiB. XLA:CPU does not shrink the train step with remat and materialises the
  attention scores (docs/performance.md), so its 43 GiB is no TPU estimate; run the same command
  on the v5e-1 before a long run, and lower train.micro_batch_size if it does not fit.
"""
from ml_collections import config_dict

from hbpo_jax import config as config_lib


def get_config(arg: str | None = None):
    config = config_lib.base_config()
    config.name = "hbpo-qwen0_5b-instruct"
    # Qwen2.5-0.5B-Instruct (Qwen2): 494,032,768 parameters; a model_path's config.json replaces this.
    config.model = config_dict.ConfigDict(dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True, max_position_embeddings=32768, bos_token_id=None,
        eos_token_ids=(151645, 151643), dtype="bfloat16", param_dtype="float32",
        attention_impl="auto", remat="full"))  # auto: splash on TPU, cuDNN on GPU
    config.model_path = "/data/models/Qwen2.5-0.5B-Instruct"
    config.data.path = "rg:basic_arithmetic,chain_sum"
    config.data.max_rows = 20_000  # problems generated (an epoch is 2,500 steps: no repeats)
    config.data.seed = 1  # the eval's rg: problems come from config.seed (0)

    r = config.rollout
    r.prompt_format = "r1_zero"
    r.budgets = (128, 256, 512, 768)
    r.rollouts_per_prompt = 8  # 2 per budget
    r.max_prompt_len = 256
    r.max_response_len = 1024  # L_max
    r.temperature = 1.0
    r.top_p = 1.0
    r.max_batch = 0  # 64 rollouts in one sampler call: ~1 GB of bf16 KV cache
    config.grading.format = "lenient"
    config.grading.workers = 2

    config.objective.name = "hbpo"

    t = config.train
    t.steps = 60
    t.prompts_per_step = 8
    t.mini_batches = 2  # PPO mini-batch of 4 prompts = 32 sequences
    t.micro_batch_size = 4
    t.checkpoint_every = 20
    t.keep_checkpoints = 2

    o = config.optim
    o.learning_rate = 2e-6
    o.schedule = "constant"
    o.grad_clip = 1.0

    e = config.eval
    e.benchmarks = ("rg:basic_arithmetic",)
    e.max_problems = 32
    e.modes = ("natural", "fixed")
    e.temperature = 0.0  # greedy
    e.max_response_len = 1024
    e.batch_size = 32

    config.mesh.shape = (1, -1, 1)  # one chip; FSDP over the chips of a host when there are more
    if arg:
        raise ValueError(f"configs/qwen0_5b_instruct.py takes no argument, got {arg!r}.")
    return config
