"""Image loading without a server: address checks, redirect re-checks, DNS answers, data-URL variants, odd files."""

from __future__ import annotations

import asyncio
import base64
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from server import images
from server.errors import BadRequest, PayloadTooLarge
from server.images import ImageLoader, is_public_address
from server.settings import ServerSettings

from ..support import png_bytes

PNG = png_bytes()


@pytest.mark.parametrize(
    "address,public",
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("::ffff:8.8.8.8", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),
        ("64:ff9b::7f00:1", False),
        ("2002:7f00:1::", False),
        ("ff02::1", False),
    ],
)
def test_address_classification(address, public):
    assert is_public_address(address) is public


@pytest.mark.parametrize(
    "address",
    [
        "::7f00:1",
        "::a00:1",
        "::a9fe:a9fe",
        "::c0a8:101",  # IPv4-compatible ::/96 (deprecated) of private targets
        "::ffff:0:a00:1",
        "::ffff:0:7f00:1",
        "::ffff:0:a9fe:a9fe",  # SIIT / IPv4-translated ::ffff:0:0:0/96
        "::ffff:a00:1",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b:1::a00:1",
        "64:ff9b:1::808:808",
        "64:ff9b:1:ffff::1",  # local-use NAT64 64:ff9b:1::/48: never public
        "64:ff9b::a00:1",
        "64:ff9b::a9fe:a9fe",
        "64:ff9b::e000:1",  # well-known NAT64 of private / multicast v4
        "2002:a00:1::1",
        "2002:a9fe:a9fe::",
        "2002:c0a8:101::1",  # 6to4 of private v4
        "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo: client 10.0.0.1 (obfuscated)
        "2001:0:a00:1:8000:63bf:f7f7:f7f7",  # Teredo: server 10.0.0.1, client 8.8.8.8
        "fec0::1",
        "fec0:1:2:3::4",
        "feff::1",  # site-local fec0::/10
        "fc00::1",
        "fd12:3456::1",  # unique local fc00::/7
        "fe80::1",
        "fe80::1%2",  # link-local
        "::",
        "::1",
        "ff0e::1",
        "ff02::1",  # unspecified, loopback, multicast
        "2001:db8::1",
        "3fff::1",
        "100::1",  # documentation, discard-only
        "4000::1",
        "e000::1",  # outside global unicast 2000::/3
    ],
)
def test_ipv6_forms_of_non_public_targets_are_refused(address):
    assert is_public_address(address) is False


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "2a00:1450:4001::200e",
        "64:ff9b::808:808",
        "64:ff9b::8.8.8.8",
        "::ffff:8.8.8.8",
        "::ffff:0:808:808",
        "::808:808",
        "2002:808:808::1",
        "2001:0:808:808:8000:63bf:f7f7:f7f7",  # Teredo: server 8.8.8.8, client 8.8.8.8
    ],
)
def test_public_addresses_stay_allowed(address):
    assert is_public_address(address) is True


@pytest.fixture
def loader(media_dir):
    pool = ThreadPoolExecutor(1)
    yield ImageLoader(ServerSettings(allowed_local_media_path=str(media_dir), max_image_bytes=100_000), pool)
    pool.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_redirect_target_is_checked_again(loader, image_site, monkeypatch):
    """127.0.0.1 passes (pretend it is public); the redirect to 127.0.0.2 must be checked and refused."""
    loader.allow_private = False
    monkeypatch.setattr(images, "is_public_address", lambda a: a == "127.0.0.1")
    port = image_site.rsplit(":", 1)[1]
    assert run(loader.fetch(f"{image_site}/red.png")) == PNG
    with pytest.raises(BadRequest, match="127.0.0.2"):  # Location: //127.0.0.2:port/red.png
        run(loader.fetch(f"{image_site}/redirect//127.0.0.2:{port}/red.png"))


def test_any_private_answer_in_dns_refuses_the_host(loader, monkeypatch):
    async def fake_getaddrinfo(host, port, **kw):
        return [(2, 1, 6, "", ("93.184.216.34", port)), (2, 1, 6, "", ("10.0.0.5", port))]

    loader.allow_private = False

    async def go():
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
        return await loader.fetch("https://images.example/cat.png")

    with pytest.raises(BadRequest, match="10.0.0.5"):
        run(go())


def test_connection_goes_to_the_checked_address(loader, monkeypatch):
    """The URL is rewritten to the resolved IP, with the original Host header and TLS server name."""

    async def fake_getaddrinfo(host, port, **kw):
        return [(10, 1, 6, "", ("2606:4700::1111", port, 0, 0))]

    async def go():
        monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake_getaddrinfo)
        return await loader._pin("https://images.example:8443/a.png?x=1")

    url, headers, ext = run(go())
    assert str(url) == "https://[2606:4700::1111]:8443/a.png?x=1"
    assert headers == {"Host": "images.example:8443"} and ext == {"sni_hostname": "images.example"}


def test_redirect_limit(loader, image_site):
    loader.allow_private, loader.max_redirects = True, 1
    with pytest.raises(BadRequest, match="redirected more than 1"):
        run(loader.fetch(f"{image_site}/redirect/redirect/red.png"))


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64," + base64.b64encode(PNG).decode(),
        "data:image/png;base64," + "\n".join(base64.b64encode(PNG).decode()[i : i + 76] for i in range(0, 3000, 76)),
        "data:image/png;base64," + base64.urlsafe_b64encode(PNG).decode().rstrip("="),
        "data:;base64," + base64.b64encode(PNG).decode(),
        base64.b64encode(PNG).decode(),  # bare base64, as Ollama and llama.cpp accept
    ],
)
def test_data_url_variants(loader, url):
    assert run(loader.load_bytes(url)) == PNG


@pytest.mark.parametrize(
    "url,error",
    [
        ("data:image/png,rawbytes", BadRequest),
        ("data:image/png;base64,", BadRequest),
        ("see attached image!", BadRequest),
        ("C:\\images\\cat.png", BadRequest),
        ("data:image/png;base64," + "A" * 200_000, PayloadTooLarge),
    ],
)
def test_bad_data_urls(loader, url, error):
    with pytest.raises(error):
        run(loader.load_bytes(url))


def test_fifo_in_the_media_folder_is_refused_without_blocking(loader, media_dir):
    fifo = media_dir / "pipe.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    with pytest.raises(BadRequest, match="regular file"):
        run(loader.load_bytes(f"file://{fifo}"))


def test_oversized_file_is_413(loader, media_dir, tmp_path):
    big = media_dir / "big.png"
    big.write_bytes(b"\0" * 100_001)
    with pytest.raises(PayloadTooLarge):
        run(loader.load_bytes(f"file://{big}"))
    big.unlink()


def test_preprocess_checks_pixels_before_decoding(loader, tiny_fp32):
    loader.max_pixels = 10_000
    with pytest.raises(PayloadTooLarge, match="pixels"):
        loader.preprocess(png_bytes((200, 100)), tiny_fp32.image_processor, 112)
    assert loader.preprocess(png_bytes((99, 100)), tiny_fp32.image_processor, 56).shape == (3, 56, 56)


def test_settings_reject_unknown_policy():
    with pytest.raises(ValueError):
        replace(ServerSettings(), multi_image="all")


@pytest.mark.parametrize("path", ["/tmp/a%00b.png", "{media}/a%00b.png", "{media}/a\x00b.png", "{media}/\ud800.png"])
def test_file_url_paths_that_cannot_be_a_file_name_are_400(loader, media_dir, path):
    with pytest.raises(BadRequest):
        run(loader.load_bytes("file://" + path.format(media=media_dir)))


@pytest.mark.parametrize("url", ["file://[/x.png", "file://[::1/x.png"])
def test_malformed_file_urls_are_400(loader, url):
    with pytest.raises(BadRequest):
        run(loader.load_bytes(url))


def test_redirect_to_a_malformed_url_is_400(loader, image_site):
    loader.allow_private = True
    with pytest.raises(BadRequest, match="invalid URL"):  # Location: //[x/ → urljoin raises "Invalid IPv6 URL"
        run(loader.fetch(f"{image_site}/redirect//[x/"))


def test_preprocess_refuses_formats_outside_the_allow_list(loader, tiny_fp32):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buf, "ICO")
    with pytest.raises(BadRequest, match="PNG, JPEG, WebP, GIF, BMP or TIFF"):
        loader.preprocess(buf.getvalue(), tiny_fp32.image_processor, 56)
