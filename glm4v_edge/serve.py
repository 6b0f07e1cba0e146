"""Serve GLM-4V-9B over an OpenAI-compatible HTTP API (the built-in demo model when --model is not given).

    glm4v-edge serve --model /models/glm-4v-9b --precision nf4 --api-key "$KEY"

Every flag also reads an environment variable (``--precision`` ↔ ``GLM4V_PRECISION``); see docs/SERVER.md.
"""

from __future__ import annotations

import argparse
import logging

from server.settings import COMPILE_CHOICES, MAX_TOKENS_POLICIES, MULTI_IMAGE_POLICIES, ServerSettings

from .options import add, add_model_arguments

log = logging.getLogger("glm4v_edge.serve")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``serve`` flags. Defaults come from :class:`ServerSettings`, so the two cannot drift apart."""
    d = ServerSettings()
    add_model_arguments(p, env=True, precision_default=d.precision)
    add(
        p,
        "--synthetic",
        help="serve random weights of this architecture instead of a checkpoint: full (the real "
        "13.9B GLM-4V-9B, built straight on the GPU), mid, tiny or a config.json — for memory and speed tests",
    )
    add(p, "--host", default=d.host, help="address to bind; a non-loopback address without --api-key logs a warning")
    add(p, "--port", default=d.port, type=int, help="TCP port")
    add(
        p,
        "--api-key",
        help="require 'Authorization: Bearer KEY' on every /v1 route (prefer the env variable: flags show up in `ps`)",
    )
    add(
        p,
        "--served-model-name",
        default=d.served_model_name,
        help="model ids clients send and /v1/models lists, comma-separated (the first is the primary one); default: "
        "glm-4v-9b, glm-4v, the checkpoint's _name_or_path (THUDM/glm-4v-9b) and its folder name",
    )
    add(
        p,
        "--cors-origins",
        default=d.cors_origins,
        help="comma-separated origins allowed by CORS, '*' for any; empty = no CORS headers",
    )
    add(
        p,
        "--allowed-hosts",
        default=d.allowed_hosts,
        help="comma-separated Host names this server answers besides loopback ones ('*' = any); without it a "
        "key-less server on a loopback address answers only localhost/127.0.0.1/[::1] (DNS-rebinding defence)",
    )
    add(
        p,
        "--max-connections",
        default=d.max_connections,
        type=int,
        help="open HTTP connections at once; more are answered 503 and closed (kept below the open-file limit)",
    )
    add(
        p,
        "--header-timeout",
        default=d.header_timeout,
        type=float,
        help="seconds a client has to send a request's headers; slower connections are closed",
    )
    add(
        p,
        "--body-timeout",
        default=d.body_timeout,
        type=float,
        help="seconds a client has to send a request's body once its headers arrived; slower gets 408",
    )
    add(p, "--max-batch-size", default=d.max_batch_size, type=int, help="sequences decoded together")
    add(
        p,
        "--max-model-len",
        type=int,
        help="context length: prompt (image embeddings included) + completion "
        "(default: the checkpoint's seq_length; on a GPU capped to what the memory left after loading holds for "
        "--max-batch-size sequences)",
    )
    add(
        p,
        "--max-queue",
        default=d.max_queue,
        type=int,
        help="requests allowed to wait for a batch slot; more answer 429 with Retry-After",
    )
    add(
        p,
        "--prefill-chunk",
        default=d.prefill_chunk,
        type=int,
        help="prompt tokens prefilled per engine step (bounds how long one prompt stalls other streams)",
    )
    add(
        p,
        "--vision-layers-per-step",
        default=d.vision_layers_per_step,
        type=int,
        help="ViT layers of a new image encoded per engine step, between decode steps of the running streams",
    )
    add(
        p,
        "--compile",
        default=d.compile,
        nargs="?",
        const="reduce-overhead",
        choices=COMPILE_CHOICES,
        help="GPU: compile the decode step per batch size before serving — 'reduce-overhead' (the flag alone: "
        "inductor kernels replayed as CUDA graphs), 'cudagraphs' (CUDA graphs without code generation) or "
        "'default' (inductor only); takes minutes at startup; ignored on CPU, where it is slower",
    )
    add(
        p,
        "--prefix-cache",
        default=d.prefix_cache,
        choices=("on", "off"),
        help="keep each finished conversation's KV-cache row while no one needs it, and prefill only what a new "
        "request adds to the longest kept prefix (chat UIs resend the history: turn 2 skips turn 1)",
    )
    add(
        p,
        "--image-cache-mb",
        default=d.image_cache_mb,
        type=float,
        help="host memory for the vision tower's output per image (same bytes, same vision size: no decode, no "
        "vision tower); LRU; 0 = off",
    )
    add(
        p,
        "--default-max-tokens",
        default=d.default_max_tokens,
        type=int,
        help="completion limit when a request sends neither max_tokens nor max_completion_tokens "
        "(default: the rest of the context)",
    )
    add(
        p,
        "--max-tokens-policy",
        default=d.max_tokens_policy,
        choices=MAX_TOKENS_POLICIES,
        help="a max_tokens larger than the room left in the context: 'clamp' generates up to the context "
        "(finish_reason length; header x-glm4v-max-tokens-clamped), 'reject' answers 400 as OpenAI does",
    )
    add(
        p,
        "--request-timeout",
        default=d.request_timeout,
        type=float,
        help="seconds a request may take from arrival to its last token, upload and preparation included; 0 = no limit",
    )
    add(
        p,
        "--shutdown-timeout",
        default=d.shutdown_timeout,
        type=float,
        help="on SIGINT/SIGTERM, seconds running requests may take to finish before they are cut",
    )
    add(
        p,
        "--max-request-bytes",
        default=d.max_request_bytes,
        type=int,
        help="largest request body accepted (base64 images included); larger answers 413",
    )
    add(
        p,
        "--max-preparing",
        default=d.max_preparing,
        type=int,
        help="requests whose body is read, parsed and preprocessed at once (bounds their memory); others wait, "
        "and past --max-queue waiting answer 429",
    )
    add(
        p,
        "--low-detail-size",
        default=d.low_detail_size,
        type=int,
        help="vision resolution for image_url.detail='low' (a multiple of 28, clamped to what the checkpoint "
        "allows and to the server's vision size)",
    )
    add(
        p,
        "--multi-image",
        default=d.multi_image,
        choices=MULTI_IMAGE_POLICIES,
        help="GLM-4V-9B sees one image per conversation: 'newest' (chat UIs resend the history: the newest upload is "
        "the one it sees, older image parts dropped, their text kept), 'first' keeps the first, 'reject' answers 400",
    )
    add(p, "--max-image-bytes", default=d.max_image_bytes, type=int, help="largest encoded image (any source)")
    add(
        p,
        "--max-image-pixels",
        default=d.max_image_pixels,
        type=int,
        help="largest image in width×height pixels, checked before decoding (decompression bombs)",
    )
    add(
        p,
        "--image-fetch-timeout",
        default=d.image_fetch_timeout,
        type=float,
        help="seconds to fetch one http(s) image, redirects included",
    )
    add(p, "--image-max-redirects", default=d.image_max_redirects, type=int, help="redirects followed per image")
    add(
        p,
        "--allow-private-urls",
        action="store_true",
        default=False,
        help="allow image URLs that resolve to private, loopback, link-local or reserved addresses",
    )
    add(
        p,
        "--allowed-local-media-path",
        help="folder from which file:// image URLs may be read (default: file:// is refused)",
    )


def run(args: argparse.Namespace) -> int:
    from server.launch import run_server

    try:
        settings = ServerSettings.from_args(args)
    except ValueError as e:  # e.g. --max-queue 0, an empty GLM4V_API_KEY
        log.error("%s", e)
        return 2
    return run_server(settings)
