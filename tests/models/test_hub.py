"""models.hub: hub ids resolve to a snapshot folder (the hub client mocked), local paths win, and
offline an uncached id is one sentence naming the `hf download` command."""
import os
import subprocess
import sys

import pytest

from hbpo_jax.models import hub


class FakeHub:
    """snapshot_download standing in for the Hub: records its calls; `cached` says what a
    local_files_only call finds; `online` whether a download works."""

    def __init__(self, tmp_path, cached=False, online=True):
        self.tmp, self.cached, self.online, self.calls = tmp_path, cached, online, []

    def __call__(self, repo_id, *, revision=None, local_files_only=False, allow_patterns=None):
        self.calls.append(dict(repo=repo_id, revision=revision, local_files_only=local_files_only,
                               allow_patterns=allow_patterns))
        folder = self.tmp / "snapshots" / repo_id.replace("/", "--") / (revision or "main")
        if local_files_only and not self.cached:
            raise FileNotFoundError("not in the cache")  # LocalEntryNotFoundError in the real client
        if not local_files_only and not self.online:
            raise ConnectionError("Failed to resolve 'huggingface.co'")
        folder.mkdir(parents=True, exist_ok=True)
        self.cached = True
        return str(folder)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants
    fake = FakeHub(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return fake


def test_parse_hub_id():
    assert hub.parse_hub_id("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", None)
    assert hub.parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    for not_an_id in ("/data/models/x", "./a/b", "a/b/c", "gs://bucket/x", "name", "../x", "a/b@"):
        assert hub.parse_hub_id(not_an_id) is None, not_an_id


def test_id_downloads_once_with_its_revision(fake_hub):
    folder = hub.resolve_model_path("org/model@abc123")
    assert os.path.isdir(folder) and folder.endswith("abc123")
    first, second = fake_hub.calls
    assert first == dict(repo="org/model", revision="abc123", local_files_only=True,
                         allow_patterns=list(hub.ALLOW_PATTERNS))
    assert second["local_files_only"] is False and second["revision"] == "abc123"
    # The next call (another process on the host, or a rerun) finds the snapshot: no download.
    assert hub.resolve_model_path("org/model@abc123") == folder
    assert [c["local_files_only"] for c in fake_hub.calls[2:]] == [True]


def test_local_path_wins_over_an_id(fake_hub, tmp_path, monkeypatch):
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert hub.resolve_model_path("org/model") == "org/model"
    assert hub.resolve_model_path("/data/not/there") == "/data/not/there"  # not an id: passed on
    assert fake_hub.calls == []


@pytest.mark.parametrize("how", ["env", "no_network"])
def test_offline_error_is_one_sentence(fake_hub, monkeypatch, how):
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        fake_hub.online = False
    with pytest.raises(hub.HubError) as e:
        hub.resolve_model_path("org/model@v2")
    message = str(e.value)
    assert "'org/model@v2'" in message and "`hf download org/model --revision v2`" in message
    assert "\n" not in message and message.count(". ") == 0 and message.endswith(".")
    assert all(c["local_files_only"] for c in fake_hub.calls) == (how == "env")


def test_offline_but_cached_resolves(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fake_hub.cached = True
    assert os.path.isdir(hub.resolve_model_path("org/model"))


def test_launcher_exits_2_with_the_sentence(tmp_path):
    """launch/convert.py --src=<uncached id> offline (the tests' HF_HUB_OFFLINE=1): exit 2, one line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, os.path.join(root, "launch", "convert.py"), "--to=orbax",
                          "--src=nobody-here/no-model", f"--dst={tmp_path / 'out'}"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "HubError" in last and "hf download nobody-here/no-model" in last
