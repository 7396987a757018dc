"""Converts a Hugging Face model folder to an Orbax params checkpoint, and back.

    python launch/convert.py --to=orbax --src=/models/DeepSeek-R1-Distill-Qwen-1.5B --dst=/ckpt/r1
    python launch/convert.py --to=hf --src=/ckpt/r1 --dst=/export/r1 --dtype=bfloat16

A missing source or a malformed config.json is printed as one line (exit status 2).
"""
# The program lives in hbpo_jax/scripts/convert.py (also `hbpo-convert`, `python -m hbpo_jax.scripts.convert`).
from hbpo_jax.scripts.convert import run

if __name__ == "__main__":
    run()
