"""The command-line programs, importable: `python -m hbpo_jax.scripts.<name>`, the console scripts
`hbpo-<name>` (setup.py), and the thin `launch/<name>.py` files of a checkout all run `run()` of
the module here. Config paths resolve from anywhere (hbpo_jax.cli.find_config)."""
