"""serve-cluster on a real local Ray instance (loopback only): 2 replicas of the demo checkpoint behind Ray Serve's
proxy, the official openai client, requests spread over both, auth, and a replica killed under load."""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from dataclasses import replace

import httpx
import openai
import pytest

from ..support import data_url, free_port, png_bytes, user_with_image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

KEY = "cluster-test-key"


@pytest.fixture(scope="module")
def cluster(tiny_dir, base_settings):
    from server.cluster import APP_NAME, build_application

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR", _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = replace(
            base_settings, model=str(tiny_dir), precision="fp32", device="cpu", api_key=KEY, max_model_len=256
        )
        serve.run(build_application(settings, replicas=2, num_gpus=0, num_cpus=1), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _ask(url, stream=False, image=True):
    messages = [user_with_image(data_url(png_bytes())) if image else {"role": "user", "content": "hi"}]
    kw = dict(model="glm-4v-9b", messages=messages, max_tokens=6, temperature=0)
    if stream:
        chunks = _client(url).chat.completions.create(**kw, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks)
    return _client(url).chat.completions.create(**kw).choices[0].message.content


def test_answers_streamed_and_not_with_images(cluster):
    assert _ask(cluster, stream=False) == _ask(cluster, stream=True)  # greedy, same model in every replica


def test_requests_spread_over_both_replicas_and_models_says_two(cluster):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    seen = set()
    with cf.ThreadPoolExecutor(4) as pool:
        url = f"{cluster}/v1/chat/completions"
        rs = list(pool.map(lambda _: httpx.post(url, json=body, headers=headers, timeout=60), range(16)))
    for r in rs:
        assert r.status_code == 200, r.text
        seen.add(r.headers["x-glm4v-replica"])
    assert len(seen) == 2
    deadline = time.time() + 15  # the count is refreshed in the background every 2 s
    while (card := _client(cluster).models.list().data[0].model_dump())["cluster"]["replicas_serving"] != 2:
        assert time.time() < deadline, card["cluster"]
        time.sleep(0.5)
    assert card["cluster"]["replica"] in seen
    metrics = httpx.get(f"{cluster}/metrics").text
    assert 'replica="' in metrics and "glm4v_requests_total" in metrics


def test_auth_holds(cluster):
    r = httpx.post(f"{cluster}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{cluster}/health").status_code == 200  # health needs no key, as in serve


def _replicas() -> list[str]:
    """The replica actors' names (SERVE_REPLICA::glm4v#GLM4VReplica#<id>), from the GCS (no dashboard needed)."""
    return sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if "GLM4VReplica" in a["name"] and a["namespace"] == "serve"
    )


def test_a_killed_replica_fails_its_requests_cleanly_and_comes_back(cluster):
    names = _replicas()
    assert len(names) == 2
    health, stop = [], threading.Event()

    def poll():
        while not stop.is_set():
            try:
                health.append(httpx.get(f"{cluster}/health", timeout=10).status_code)
            except httpx.HTTPError as e:
                health.append(type(e).__name__)
            time.sleep(0.05)

    def long_stream():
        try:
            kw = dict(model="glm-4v", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=200)
            chunks = list(_client(cluster).chat.completions.create(**kw, stream=True, extra_body={"ignore_eos": True}))
            return "ok", len(chunks)
        except Exception as e:  # the replica died under it: an error, not a hang
            return "error", type(e).__name__

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    with cf.ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(long_stream) for _ in range(6)]
        time.sleep(1.0)
        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)  # the replica's process dies
        outcomes = [f.result(timeout=90) for f in streams]  # every in-flight request ends: no hang
    assert all(kind in ("ok", "error") for kind, _ in outcomes)
    for _ in range(5):  # new requests are answered by the survivor while Ray restarts the other
        assert _ask(cluster, image=False) is not None
    deadline = time.time() + 120
    while time.time() < deadline and len(set(_replicas()) - {names[0]}) < 2:
        time.sleep(1)
    stop.set()
    poller.join(5)
    assert len(set(_replicas()) - {names[0]}) == 2  # Ray brought a replacement up
    assert health and all(h == 200 for h in health), sorted(set(map(str, health)))


def test_the_config_file_application_builds_from_the_environment(monkeypatch, tiny_dir):
    """`import_path: glm4v_edge.cluster_app:app` (serve deploy, KubeRay) reads the GLM4V_* variables."""
    from glm4v_edge import cluster_app

    monkeypatch.setenv("GLM4V_MODEL", str(tiny_dir))
    monkeypatch.setenv("GLM4V_PRECISION", "fp32")
    monkeypatch.setenv("GLM4V_REPLICAS", "3")
    app = cluster_app.build()
    deployment = app._bound_deployment
    assert deployment.name == "GLM4VReplica" and deployment.num_replicas == 3
    settings = deployment.init_args[0]
    assert settings["model"] == str(tiny_dir) and settings["precision"] == "fp32"


def test_driver_settings_make_every_replica_read_the_same_model(tmp_path, monkeypatch, base_settings):
    """A relative folder is made absolute on the driver (a replica elsewhere would read it as a hub id), a bare id
    meant for ModelScope is spelled modelscope://, and the hub variables travel to the replicas (found in review)."""
    from server.cluster import build_application, driver_settings

    (tmp_path / "THUDM" / "glm-4v-9b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert driver_settings(replace(base_settings, model="THUDM/glm-4v-9b")).model == str(
        tmp_path / "THUDM" / "glm-4v-9b"
    )
    monkeypatch.chdir("/")
    assert driver_settings(replace(base_settings, model="THUDM/glm-4v-9b")).model == "THUDM/glm-4v-9b"
    monkeypatch.setenv("GLM4V_USE_MODELSCOPE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.example")
    assert driver_settings(replace(base_settings, model="ZhipuAI/glm-4v-9b")).model == "modelscope://ZhipuAI/glm-4v-9b"
    app = build_application(replace(base_settings, model="ZhipuAI/glm-4v-9b"))
    env = app._bound_deployment.ray_actor_options["runtime_env"]["env_vars"]
    assert env["GLM4V_USE_MODELSCOPE"] == "1" and env["HF_ENDPOINT"] == "https://mirror.example"
