"""launch/tpu_probe.py's library (hbpo_jax.bench.probe) in its smoke mode on the CPU: a tiny
model, every section run, the kernel in TPU interpret mode, the trace written, and the engine's
schedule equal to the plan's."""
import pytest

from hbpo_jax.bench import probe


@pytest.mark.slow
def test_probe_smoke(tmp_path):
    text = probe.run(probe.smoke_config(), tmp_path, probe.SMOKE)
    assert (tmp_path / "probe.md").read_text() == text
    for section in ("## Update", "## Decode step", "## Paged-attention kernel", "## One scaled HBPO step"):
        assert section in text
    assert "SMOKE mode" in text and "no predictions" in text  # a CPU has no chip figures
    # Both meshes of 8 devices (FSDP over all; data 2 x fsdp 4), one width each.
    update_rows = [line for line in text.splitlines() if line.startswith("| {'data'")]
    assert len(update_rows) == 2 and all(float(r.split("|")[3]) > 0 for r in update_rows)
    kernel_rows = [line for line in text.splitlines() if line.startswith("| 16 |") or line.startswith("| 32 |")]
    assert len(kernel_rows) == 2 and all(float(r.split("|")[4]) > 0 for r in kernel_rows), kernel_rows
    assert "equal." in text  # the engine's decode steps, calls and admits are the schedule's
    assert any((tmp_path / "trace").rglob("*.xplane.pb"))
