"""Converts a Hugging Face model folder to an Orbax params checkpoint, and back.

    python launch/convert.py --to=orbax --src=/models/DeepSeek-R1-Distill-Qwen-1.5B --dst=/ckpt/r1
    python launch/convert.py --to=hf --src=/ckpt/r1 --dst=/export/r1 --dtype=bfloat16
    python launch/convert.py --to=orbax --src=Qwen/Qwen2.5-0.5B-Instruct@main --dst=/ckpt/q05   # a Hub id

A missing source or a malformed config.json is printed as one line (exit status 2). A --dst
that exists and is not empty is refused (exit 2, nothing written) unless --overwrite.
"""
import os

from hbpo_jax import checkpoint, cli, files
from hbpo_jax.errors import WorkdirError
from hbpo_jax.models.hub import resolve_model_path

cli.flags.DEFINE_enum("to", None, ["orbax", "hf"], "Target format.", required=True)
cli.flags.DEFINE_string("src", None, "Source folder (or, --to=orbax, a Hub id org/name[@revision]).",
                        required=True)
cli.flags.DEFINE_string("dst", None, "Destination folder.", required=True)
cli.flags.DEFINE_string("dtype", None, "Parameter dtype to write (default: float32 for orbax, as saved for hf).")
cli.flags.DEFINE_bool("overwrite", False, "Write into --dst even when it holds files (they may be replaced).")


def refuse_non_empty(dst: str, overwrite: bool) -> None:
    """WorkdirError when folder `dst` exists with something in it and `overwrite` is False."""
    if overwrite or not files.exists(dst):
        return
    if not files.isdir(dst):
        raise WorkdirError(f"--dst={dst} is a file, not a folder.")
    if any(True for _ in files.path(dst).iterdir()):
        raise WorkdirError(f"--dst={dst} is not empty; choose an empty or new folder, or pass --overwrite "
                           "to write over its files.")


def main(argv):
    del argv
    f = cli.flags.FLAGS
    if os.path.abspath(f.src) == os.path.abspath(f.dst) and files.is_local(f.dst):
        raise WorkdirError(f"--dst={f.dst} is the source folder.")
    refuse_non_empty(f.dst, f.overwrite)
    if f.to == "orbax":
        cfg = checkpoint.hf_to_orbax(resolve_model_path(f.src), f.dst, dtype=f.dtype or "float32")
    else:
        cfg = checkpoint.orbax_to_hf(f.src, f.dst, dtype=f.dtype)
    print(f"wrote {f.dst}: {cfg.model_type} with {cfg.num_params():,} parameters ({f.to})")


def run() -> None:
    """The program (`hbpo-convert`, `python -m hbpo_jax.scripts.convert`, `python launch/convert.py`)."""
    cli.run(main)


if __name__ == "__main__":
    run()
