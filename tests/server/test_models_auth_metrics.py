"""/v1/models reports what is really loaded; API-key auth; /health while loading; /metrics; CORS; aliases."""

from __future__ import annotations

import threading
from dataclasses import replace

import httpx
import openai
import pytest

from server.errors import ServiceUnavailable

from ..support import data_url, png_bytes, serve, user_with_image


def test_models_report_the_loaded_fp32_model(api, tiny_fp32):
    listed = api.client().models.list()
    # the default aliases: what clients send (glm-4v from THUDM's example client), the checkpoint's _name_or_path
    # and its folder name — every one of them answers
    assert [m.id for m in listed.data] == ["glm-4v-9b", "glm-4v", "glm4v-edge/tiny-random", "tiny"]
    for name in ("glm-4v", "glm4v-edge/tiny-random", "tiny"):
        r = api.post({"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == name
    card = httpx.get(f"{api.url}/v1/models/glm-4v-9b").json()
    assert card["object"] == "model" and card["owned_by"] == "glm4v-edge" and isinstance(card["created"], int)
    assert card["precision"] == card["vision_precision"] == "fp32"
    assert card["quantization"]["method"] == "none" and card["quantization"]["bits"] == 32
    assert card["layers"]["language_model"] == {"Linear": 8}
    assert (card["vision_size"], card["image_tokens"]) == (112, 18)
    assert (card["low_detail_vision_size"], card["low_detail_image_tokens"]) == (56, 6)
    assert card["max_model_len"] == 256 and card["device"] == "cpu" and card["vram"] is None
    assert card["weight_bytes"] == tiny_fp32.weight_bytes["total"] > 0
    assert card["demo"] is False and card["root"] == "tiny"
    assert card["compile"] is None  # --compile off (and always off on a CPU)
    assert card["multi_image"] == "newest" and card["max_tokens_policy"] == "clamp"
    assert card["sampling_defaults"] == {"temperature": 0.8, "top_p": 0.8}  # the checkpoint's generation_config


@pytest.fixture(scope="module")
def nf4_keyed(base_settings, load_tiny):
    with serve(
        replace(base_settings, api_key="s3cret-key", served_model_name="glm-4v-9b, glm4v", compile="reduce-overhead"),
        load_tiny("nf4"),
    ) as s:
        yield s


def test_nf4_model_says_nf4_with_real_bitsandbytes_layers(nf4_keyed):
    card = nf4_keyed.client("s3cret-key").models.retrieve("glm-4v-9b").model_dump()
    assert card["precision"] == "nf4"
    q = card["quantization"]
    assert (q["method"], q["bits"], q["quant_type"]) == ("bitsandbytes", 4, "nf4")
    assert q["double_quant"] is True and "transformer.output_layer" in q["skipped_modules"]
    assert q["compute_dtype"] in ("bfloat16", "float32", "float16")
    assert set(card["layers"]["language_model"]) == {"Linear4bit"}  # real bnb modules, not a label
    assert card["layers"]["lm_head"] == {"Linear": 1}
    assert card["compile"]["mode"] == "reduce-overhead" and card["compile"]["active"] is False  # on a CPU
    assert card["compile"]["error"].startswith("ignored on cpu")
    # and generation runs through them, image included
    r = nf4_keyed.client("s3cret-key").chat.completions.create(
        model="glm4v", messages=[user_with_image(data_url(png_bytes()))], max_tokens=4
    )
    assert r.model == "glm4v" and r.usage.completion_tokens >= 1 and r.system_fingerprint.endswith("-nf4")


def test_aliases_are_all_listed(nf4_keyed):
    ids = [m.id for m in nf4_keyed.client("s3cret-key").models.list().data]
    assert ids == ["glm-4v-9b", "glm4v"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"}, {"Authorization": "Basic s3cret-key"}],
)
def test_every_v1_route_needs_the_key(nf4_keyed, headers):
    for method, path in (
        ("GET", "/v1/models"),
        ("GET", "/v1/models/glm-4v-9b"),
        ("GET", "/v1/models/nope"),
        ("POST", "/v1/chat/completions"),
    ):
        r = httpx.request(method, f"{nf4_keyed.url}{path}", headers=headers, json={"messages": "broken"})
        assert r.status_code == 401, (path, r.text)  # before body validation: no probing without a key
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{nf4_keyed.url}/health").status_code == 200  # health stays open
    assert httpx.get(f"{nf4_keyed.url}/health", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200


def test_openai_client_with_and_without_the_key(nf4_keyed):
    with pytest.raises(openai.AuthenticationError):
        nf4_keyed.client("not-it").chat.completions.create(
            model="glm-4v-9b", messages=[{"role": "user", "content": "hi"}]
        )
    ok = nf4_keyed.client("s3cret-key").chat.completions.create(
        model="glm-4v-9b", max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_health_is_503_while_loading_then_200(base_settings, tiny_fp32):
    release = threading.Event()

    def slow_loader():
        release.wait(10)
        return tiny_fp32

    with serve(base_settings, slow_loader, wait_ready=False) as s:
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert r.headers["retry-after"]
        r = s.post({"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading"
        assert httpx.get(f"{s.url}/v1/models").status_code == 503
        release.set()
        s.wait(lambda: httpx.get(f"{s.url}/health").status_code == 200)
        assert httpx.get(f"{s.url}/health").json()["precision"] == "fp32"
        assert s.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).status_code == 200


def test_failed_load_reports_and_stops(base_settings):
    def broken_loader():
        raise FileNotFoundError("no config.json in /nowhere")

    with serve(base_settings, broken_loader, wait_ready=False) as s:
        s.wait(lambda: s.runtime.state == "failed")
        assert "no config.json" in s.runtime.error
        with pytest.raises(ServiceUnavailable) as e:  # what /health and /v1 answer until the server is gone
            s.runtime.require_ready()
        assert e.value.code == "model_load_failed"
        s.thread.join(timeout=10)  # on_failure asked uvicorn to exit
        assert not s.thread.is_alive()


def test_metrics_expose_queue_tokens_latency_and_precision(api):
    api.client().chat.completions.create(model="glm-4v-9b", max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    text = httpx.get(f"{api.url}/metrics").text
    for series in (
        "glm4v_requests_waiting",
        "glm4v_requests_running",
        "glm4v_prompt_tokens_total",
        "glm4v_generation_tokens_total",
        "glm4v_time_to_first_token_seconds_bucket",
        "glm4v_time_per_output_token_seconds_bucket",
        "glm4v_e2e_request_latency_seconds_count",
        "glm4v_kv_cache_bytes",
        "glm4v_model_weight_bytes",
        "process_resident_memory_bytes",
    ):
        assert series in text, series
    assert 'glm4v_model_info{demo="false",device="cpu",model="glm-4v-9b",precision="fp32"' in text
    assert 'glm4v_requests_total{model="glm-4v-9b",precision="fp32",status="200"}' in text
    ttft = [line for line in text.splitlines() if line.startswith("glm4v_time_to_first_token_seconds_count")]
    assert float(ttft[0].rsplit(" ", 1)[1]) >= 1


def test_cors_only_when_configured(api, base_settings, tiny_fp32):
    preflight = {
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    r = httpx.options(f"{api.url}/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    with serve(replace(base_settings, cors_origins="http://app.example", api_key="k"), tiny_fp32) as s:
        r = httpx.options(f"{s.url}/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(f"{s.url}/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"


def test_serving_a_synthetic_model(base_settings):
    """`serve --synthetic tiny --precision nf4`: random weights built on the device, reported as such."""
    from dataclasses import replace

    from ..support import serve

    settings = replace(base_settings, synthetic="tiny", precision="nf4", device="cpu")
    with serve(settings, None) as srv:
        card = srv.client().models.list().data[0].model_dump()
        assert card["precision"] == "nf4" and card["demo"] is True
        assert card["layers"]["language_model"] == {"Linear4bit": 8}
        reply = srv.client().chat.completions.create(
            model=card["id"], max_tokens=3, temperature=0, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.usage.completion_tokens >= 1


def test_context_is_sized_to_the_memory_left_after_loading(base_settings, load_tiny):
    """On a GPU without --max-model-len, the KV cache is sized to the free memory (as vLLM does)."""
    from dataclasses import replace

    import pytest

    from engine import choose_max_model_len
    from quant.estimate import estimate
    from quant.fit import max_context_that_fits

    lm = load_tiny("nf4")
    s = replace(base_settings, max_model_len=None, max_batch_size=8)
    per_token = estimate(lm.config, precision="nf4").kv_cache_bytes_per_token
    activation = estimate(lm.config, precision="nf4", context=s.prefill_chunk, prompt_tokens=s.prefill_chunk)
    free = activation.activation_peak_bytes + 512 * 2**20 + 8 * 1000 * per_token
    assert max_context_that_fits(free, lm.config, 8, "nf4", prefill_tokens=s.prefill_chunk) == 1000
    assert choose_max_model_len(lm, s.engine_config(), free_bytes=free) == 768  # rounded down to a multiple of 256
    assert choose_max_model_len(lm, s.engine_config(), free_bytes=10 * 2**30) == lm.config.seq_length  # capped
    assert choose_max_model_len(lm, replace(s, max_model_len=300).engine_config(), free_bytes=1) == 300  # explicit wins
    assert choose_max_model_len(lm, s.engine_config()) == lm.config.seq_length  # CPU: the checkpoint's context
    import torch

    # On a GPU, --compile leaves another 512 MiB for CUDA-graph pools (a CPU ignores --compile).
    gpu, compiled = replace(lm, device=torch.device("cuda", 0)), replace(s, compile="reduce-overhead")
    assert choose_max_model_len(gpu, compiled.engine_config(), free_bytes=free + 512 * 2**20) == 768
    assert choose_max_model_len(lm, compiled.engine_config(), free_bytes=free) == 768
    with pytest.raises(MemoryError):
        choose_max_model_len(gpu, compiled.engine_config(), free_bytes=free)
    with pytest.raises(MemoryError, match="lower --max-batch-size"):
        choose_max_model_len(lm, s.engine_config(), free_bytes=activation.activation_peak_bytes)


def test_models_report_where_each_part_lives(base_settings, tiny_dir):
    import quant

    lm = quant.load(tiny_dir, precision="nf4", vision_precision="bf16", device="cpu", offload=("vision", "embeddings"))
    with serve(base_settings, lm) as s:
        card = s.client().models.list().data[0].model_dump()
        off = card["offload"]
        assert off["parts"] == ["vision", "embeddings"]
        assert off["placement"]["vision"] == {
            "device": "host",
            "precision": "bf16",
            "streamed": {
                "units": len(lm.model.transformer.vision.streamer.units),
                "slots": 2,
                "slot_bytes": lm.model.transformer.vision.streamer.slots[0].numel(),
            },
        }
        assert off["placement"]["embeddings"]["device"] == "host"
        assert off["placement"]["language_model"] == {"device": "cpu", "precision": "nf4"}
        assert off["resident_bytes"] + off["host_bytes"] >= card["weight_bytes"]
        r = s.post({"messages": [user_with_image(data_url(png_bytes()))], "max_tokens": 3})
        assert r.status_code == 200, r.text
