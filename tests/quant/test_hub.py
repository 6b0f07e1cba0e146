"""quant.hub: --model as a folder, a Hugging Face id or a ModelScope id, resolved by the libraries' own code.

Offline: the caches are built in the libraries' real on-disk layouts in a tmp dir. The few tests that need a Hub
answer talk to a loopback server (or a closed loopback port), never to the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from quant.hub import ALLOW_PATTERNS, ModelNotFoundError, describe_source, resolve_model_path

REPO = "acme/glm-4v-tiny"
LFS_SUFFIXES = (".safetensors", ".model", ".bin")  # stored in git LFS on the Hub: blob named by sha256


@pytest.fixture(scope="module")
def checkpoint_files(tiny_dir) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in Path(tiny_dir).iterdir() if p.is_file()}


# ---- a Hugging Face cache, in huggingface_hub's layout ---------------------------------------------------------------
@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty HF_HUB_CACHE, offline. huggingface_hub reads both variables once, at import, into
    ``huggingface_hub.constants`` (where snapshot_download looks at call time), so those are set too."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("GLM4V_USE_MODELSCOPE", raising=False)
    return cache


def hf_snapshot(cache: Path, repo: str, files: dict[str, bytes], *, ref: str | None = "main", tree: bool = False):
    """Add one commit of ``repo`` as huggingface_hub stores it: ``blobs/<etag>`` (sha256 for LFS files, the git blob
    sha1 otherwise), ``snapshots/<commit>/<name>`` relative symlinks to them, ``refs/<ref>`` holding the commit, and
    with ``tree`` the commit's tree listing (``trees/<commit>.json``, written by huggingface_hub 2.x downloads)."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repr((repo, ref, sorted(files.items()))).encode()).hexdigest()
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (storage / "blobs").mkdir(exist_ok=True)
    listing = {}
    for name, data in files.items():
        git_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = name.endswith(LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else git_id
        (storage / "blobs" / etag).write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(storage / "blobs" / etag, snapshot))
        listing[name] = {"size": len(data), "blob_id": git_id}
        if lfs:
            listing[name].update(lfs_sha256=etag, lfs_size=len(data))
    if ref:
        (storage / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    if tree:
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


def one_line_error(model: str, **kw) -> str:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model_path(model, **kw)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    return message


# ---- folders --------------------------------------------------------------------------------------------------------
def test_existing_folder_is_returned_as_is(tiny_dir, tmp_path, monkeypatch):
    assert resolve_model_path(str(tiny_dir)) == str(tiny_dir)
    monkeypatch.chdir(tiny_dir.parent)
    assert resolve_model_path(tiny_dir.name) == tiny_dir.name  # relative stays relative
    monkeypatch.setenv("HOME", str(tiny_dir.parent))
    assert resolve_model_path(f"~/{tiny_dir.name}") == str(tiny_dir)  # ~ expanded
    (tmp_path / "acme" / "local").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("acme/local") == "acme/local"  # a folder wins over a hub id of the same name


@pytest.mark.parametrize("model", ["/no/such/dir", "./glm-4v", "../glm-4v", "~/no-such-dir", "a/b/c", "acme/glm/"])
def test_missing_path_does_not_exist(model, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    message = one_line_error(model)
    assert message == f"model folder {os.path.expanduser(model)} does not exist"


# ---- Hugging Face, from the cache -----------------------------------------------------------------------------------
def test_cached_repo_resolves_to_its_snapshot_and_loads(hf_cache, checkpoint_files):
    import quant

    snapshot = hf_snapshot(hf_cache, REPO, checkpoint_files)
    path = resolve_model_path(REPO, progress=False)
    assert path == str(snapshot)
    assert Path(path, "model.safetensors").is_symlink()  # the real layout: links into blobs/
    loaded = quant.load(path, precision="fp32", device="cpu")
    assert type(loaded.model).__name__ == "ChatGLMForConditionalGeneration"
    assert loaded.model_dir == Path(path)


def test_revision_branch_and_commit(hf_cache, checkpoint_files):
    main = hf_snapshot(hf_cache, REPO, checkpoint_files)
    changed = dict(checkpoint_files, **{"generation_config.json": b'{"temperature": 0.1}\n'})
    v2 = hf_snapshot(hf_cache, REPO, changed, ref="v2")
    pr = hf_snapshot(hf_cache, REPO, dict(changed, **{"special_tokens_map.json": b"{}"}), ref="refs/pr/1")
    assert resolve_model_path(REPO) == str(main)
    assert resolve_model_path(f"{REPO}@v2") == str(v2)
    assert resolve_model_path(f"{REPO}@{v2.name}") == str(v2)  # a commit hash: no ref needed
    assert resolve_model_path(f"{REPO}@refs/pr/1") == str(pr)
    message = one_line_error(f"{REPO}@nope")
    assert message.startswith(f"{REPO}@nope: not in the Hugging Face cache") and "--revision nope" in message


def test_missing_repo_offline(hf_cache):
    message = one_line_error("acme/absent")
    assert message == (
        f"acme/absent: not in the Hugging Face cache ({hf_cache}) and HF_HUB_OFFLINE is set: download it first "
        "(hf download acme/absent) or unset HF_HUB_OFFLINE"
    )


def test_bin_only_repo_is_refused(hf_cache, checkpoint_files):
    files = {k: v for k, v in checkpoint_files.items() if not k.endswith(".safetensors")}
    hf_snapshot(hf_cache, REPO, dict(files, **{"pytorch_model.bin": b"\x80\x02pickle"}))
    message = one_line_error(REPO)
    assert message.startswith(f"{REPO}: the downloaded checkpoint (")
    assert "has no *.safetensors weights (it holds pytorch_model.bin)" in message
    assert "only GLM-4V-9B safetensors checkpoints are supported" in message


def test_missing_tokenizer_is_named(hf_cache, checkpoint_files):
    hf_snapshot(hf_cache, REPO, {k: v for k, v in checkpoint_files.items() if k != "tokenizer.model"})
    assert "has no tokenizer.model;" in one_line_error(REPO)


def test_incomplete_snapshot(hf_cache, checkpoint_files):
    snapshot = hf_snapshot(hf_cache, REPO, checkpoint_files, tree=True)
    assert resolve_model_path(REPO) == str(snapshot)  # complete by its tree listing
    (snapshot / "model.safetensors").unlink()  # as after an interrupted download
    message = one_line_error(REPO)
    assert "the cached snapshot" in message and "is incomplete" in message and "HF_HUB_OFFLINE is set" in message
    assert f"(hf download {REPO})" in message


def test_invalid_hub_id(hf_cache):
    assert "not a valid Hugging Face model id" in one_line_error("acme/bad--name")


def test_progress_false_restores_the_bars(hf_cache, checkpoint_files, monkeypatch):
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from huggingface_hub.utils import tqdm as hf_tqdm

    monkeypatch.setattr(sys.modules[hf_tqdm.__module__], "HF_HUB_DISABLE_PROGRESS_BARS", None)  # conftest sets it
    monkeypatch.setattr(sys.modules[hf_tqdm.__module__], "progress_bar_states", {})
    hf_snapshot(hf_cache, REPO, checkpoint_files)
    resolve_model_path(REPO, progress=False)
    assert not are_progress_bars_disabled()
    disable_progress_bars()
    resolve_model_path(REPO, progress=False)
    assert are_progress_bars_disabled()  # the caller's choice stays
    enable_progress_bars()


# ---- Hugging Face, online: a loopback endpoint -----------------------------------------------------------------------
@pytest.fixture
def online(hf_cache, monkeypatch, tmp_path):
    """Online mode against ``set_endpoint(url)``, with no token from the environment or the user's files."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))

    def set_endpoint(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)

    return set_endpoint


@contextlib.contextmanager
def fake_hub(status: int, error_code: str):
    """A loopback server answering every request like the Hub refusing it (status + X-Error-Code)."""
    paths = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            paths.append(self.path)
            body = json.dumps({"error": error_code}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", error_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_unreachable_endpoint(online, hf_cache, checkpoint_files):
    url = closed_port_url()
    online(url)
    message = one_line_error("acme/absent")
    assert message.startswith(f"acme/absent: could not reach {url} (ConnectError) and it is not in the Hugging Face")
    assert "HF_ENDPOINT" in message and "HF_HUB_OFFLINE=1" in message
    snapshot = hf_snapshot(hf_cache, REPO, checkpoint_files)
    assert resolve_model_path(REPO) == str(snapshot)  # cached: served from the cache


@pytest.mark.parametrize(
    "status, code, expected",
    [
        (404, "RepoNotFound", "acme/absent: no such model on {url} (check the name; private models need HF_TOKEN)"),
        (403, "GatedRepo", "acme/absent: {url}/acme/absent is gated: accept its terms on that page, then set HF_TOKEN"),
        (404, "RevisionNotFound", "acme/absent@v9: acme/absent has no revision 'v9' on {url}"),
    ],
)
def test_hub_refusals(online, status, code, expected):
    model = "acme/absent@v9" if code == "RevisionNotFound" else "acme/absent"
    with fake_hub(status, code) as (url, paths):
        online(url)
        message = one_line_error(model)
    assert message.startswith(expected.format(url=url))
    assert paths and paths[0].startswith("/api/models/acme/absent/revision/")  # the real client asked


# ---- ModelScope -----------------------------------------------------------------------------------------------------
@pytest.fixture
def ms_cache(tmp_path, monkeypatch) -> Path:
    """An empty MODELSCOPE_CACHE; HF_HUB_OFFLINE=1 keeps ModelScope on its cache (local_files_only)."""
    pytest.importorskip("modelscope")
    cache = tmp_path / "modelscope"
    cache.mkdir()
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("GLM4V_USE_MODELSCOPE", raising=False)
    with contextlib.suppress(ImportError):  # modelscope>=1.38 keeps its config (cache dir included) per process
        import modelscope_hub.config

        monkeypatch.setattr(modelscope_hub.config, "_default_config", None)
    return cache


def ms_snapshot(cache: Path, repo: str, files: dict[str, bytes], revision: str = "master") -> Path:
    """modelscope_hub's layout: ``models/<org>--<name>/snapshots/<revision>/<file>``, plain files."""
    snapshot = cache / "models" / repo.replace("/", "--") / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def test_modelscope_cached(ms_cache, checkpoint_files, monkeypatch):
    from glm4v.checkpoint import inspect_checkpoint

    master = ms_snapshot(ms_cache, REPO, checkpoint_files)
    v1 = ms_snapshot(ms_cache, REPO, checkpoint_files, revision="v1.0")
    path = resolve_model_path(f"modelscope://{REPO}")
    assert path == str(master)
    assert inspect_checkpoint(path).config.num_layers == 2
    assert resolve_model_path(f"modelscope://{REPO}@v1.0") == str(v1)
    monkeypatch.setenv("GLM4V_USE_MODELSCOPE", "1")
    assert resolve_model_path(REPO) == str(master)


def test_modelscope_missing_offline(ms_cache):
    message = one_line_error("modelscope://acme/absent")
    assert message == (
        f"modelscope://acme/absent: not in the ModelScope cache ({ms_cache}) and HF_HUB_OFFLINE is set (it keeps "
        "ModelScope offline too): download it first (modelscope download acme/absent) or unset HF_HUB_OFFLINE"
    )


def test_modelscope_bin_only(ms_cache, checkpoint_files):
    files = {k: v for k, v in checkpoint_files.items() if not k.endswith(".safetensors")}
    ms_snapshot(ms_cache, REPO, dict(files, **{"pytorch_model.bin": b"pickle"}))
    assert "has no *.safetensors weights (it holds pytorch_model.bin)" in one_line_error(f"modelscope://{REPO}")


def test_modelscope_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # what `import modelscope` sees when it is absent
    message = one_line_error(f"modelscope://{REPO}")
    assert message.endswith("install the extra: pip install 'glm4v-edge[modelscope]'")
    assert "not a ModelScope model id" in one_line_error("modelscope://not-an-id")


# ---- describe_source ------------------------------------------------------------------------------------------------
def test_describe_source(tiny_dir, monkeypatch):
    monkeypatch.delenv("GLM4V_USE_MODELSCOPE", raising=False)
    cases = {
        str(tiny_dir): "folder",
        "/no/such/dir": "folder",
        "./x": "folder",
        "~/x": "folder",
        "a/b/c": "folder",
        "acme/glm/": "folder",
        "glm-4v-9b": "folder",  # no ORG/: a (missing) folder, not a hub id
        "THUDM/glm-4v-9b": "huggingface",
        "THUDM/glm-4v-9b@main": "huggingface",
        "THUDM/glm-4v-9b@refs/pr/1": "huggingface",
        "modelscope://ZhipuAI/glm-4v-9b": "modelscope",
        "modelscope://ZhipuAI/glm-4v-9b@master": "modelscope",
    }
    assert {m: describe_source(m) for m in cases} == cases
    for value, source in [("1", "modelscope"), ("TRUE", "modelscope"), ("on", "modelscope"), ("0", "huggingface")]:
        monkeypatch.setenv("GLM4V_USE_MODELSCOPE", value)
        assert describe_source("ZhipuAI/glm-4v-9b") == source
    assert describe_source(str(tiny_dir)) == "folder"


def test_allow_patterns_fetch_no_code_or_pickles():
    from fnmatch import fnmatch

    def fetched(name):
        return any(fnmatch(name, p) for p in ALLOW_PATTERNS)

    assert all(fetched(n) for n in ["config.json", "model-00001-of-00015.safetensors", "tokenizer.model"])
    assert fetched("model.safetensors.index.json") and fetched("tokenizer_config.json")
    assert not any(fetched(n) for n in ["pytorch_model.bin", "modeling_chatglm.py", "x.pt", "x.pth", "README.md"])


def test_serve_by_hub_id_from_the_cache(hf_cache, checkpoint_files, base_settings):
    """`serve --model ORG/NAME` offline: resolved from the cache once, served under that name too."""
    from dataclasses import replace

    import quant
    from server.runtime import default_model_names

    from ..support import serve

    snapshot = hf_snapshot(hf_cache, "THUDM/glm-4v-9b", checkpoint_files)
    lm = quant.open_model(quant.LoadRequest(model="THUDM/glm-4v-9b", precision="fp32", device="cpu"))
    assert Path(lm.model_dir) == Path(snapshot)
    assert "THUDM/glm-4v-9b" in default_model_names(lm.model_dir, "THUDM/glm-4v-9b")
    with serve(replace(base_settings, model="THUDM/glm-4v-9b"), lm) as srv:
        ids = [m.id for m in srv.client().models.list().data]
        r = srv.post({"model": "THUDM/glm-4v-9b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert "THUDM/glm-4v-9b" in ids and r.status_code == 200
