"""Image URLs from a chat request → bytes → a preprocessed (3, N, N) tensor, safely.

Three sources, each capped at ``--max-image-bytes``:

* ``data:image/*;base64,...`` (line breaks and URL-safe base64 tolerated; the MIME type is not trusted);
* ``http(s)://`` — the host is resolved *here*, every address is checked (see :func:`is_public_address`: private,
  loopback, link-local, site-local, multicast, reserved, local-use NAT64 and the IPv4-in-IPv6 forms of all of them
  are refused unless ``--allow-private-urls``), and the connection goes to the checked address (TLS still verifies
  the original host name via SNI), so DNS rebinding cannot swap the target. Redirects are followed by hand, each hop
  checked the same way; the body is streamed with the byte cap; the whole fetch has one deadline; proxy variables
  are ignored (a proxy would bypass the address check);
* ``file://`` — only under ``--allowed-local-media-path``, percent-decoded to bytes (so any file name is reachable,
  and a NUL byte or an unencodable character is a 400, not a crash), resolved with realpath so ``..`` and symlinks
  cannot leave it, regular files only (a FIFO would hang the read).

Decoding (:func:`glm4v.image_processor.open_image`) happens in a worker thread, never on the event loop. Only the
decoders in ``ALLOWED_FORMATS`` — PNG, JPEG, WebP, GIF, BMP, TIFF — ever see the bytes (no EPS → Ghostscript, no
ICO/ICNS that decode while opening, whatever the data URL claims); any other format is a 400 naming the accepted
ones. The pixel cap is checked from the header before any pixel is decoded (413), multi-frame images use their first
frame only, and error messages are fixed text: Pillow's own exception text never reaches the client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import re
import socket
import stat
from urllib.parse import unquote_to_bytes, urljoin, urlsplit

import httpx
import torch

from glm4v import ImageError, ImageProcessor, open_image
from glm4v.image_processor import ALLOWED_FORMATS, ImageTooLarge  # noqa: F401 — ALLOWED_FORMATS: the allow-list

from .errors import BadRequest, PayloadTooLarge
from .settings import ServerSettings
from .version import __version__

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^;,]*)*?);base64,(?P<data>.*)$", re.DOTALL)
_REDIRECTS = (301, 302, 303, 307, 308)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the low 32 bits are the IPv4 reached
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # IPv4-translated (RFC 2765), not the same as mapped ::ffff:0:0/96
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible form (::a.b.c.d)
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")  # the only IPv6 space handed out as public unicast
_NOT_GLOBAL_V6 = (ipaddress.ip_network("3fff::/20"),)  # documentation (RFC 9637), newer than some Pythons know
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]{0,15}):")


def _scheme(url: str) -> str:
    """The URL scheme, lower-cased; "" for bare base64 (whose alphabet has no colon). Cheaper than urlsplit on a
    multi-megabyte data URL."""
    m = _SCHEME.match(url)
    return m.group(1).lower() if m else ""


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...] | None:
    """The IPv4 addresses an IPv6 address really reaches, for the forms that carry one (mapped, SIIT,
    IPv4-compatible, 6to4, Teredo, well-known NAT64); None for a plain IPv6 address."""
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.ipv4_mapped:  # ::ffff:a.b.c.d
        return (ip.ipv4_mapped,)
    if ip in _SIIT or ip in _NAT64 or ip in _IPV4_COMPATIBLE:  # ::ffff:0:a.b.c.d, 64:ff9b::a.b.c.d, ::a.b.c.d
        return (low32,)  # (:: and ::1 land on 0.0.0.0 and 0.0.0.1: not public either)
    if ip.sixtofour:  # 2002:aabb:ccdd::/48
        return (ip.sixtofour,)
    if ip.teredo:  # 2001::/32: the Teredo server and the client's (de-obfuscated) address; both must be public
        return ip.teredo
    return None


def is_public_address(address: str) -> bool:
    """Whether a resolved address may be fetched without ``--allow-private-urls``.

    IPv4: globally reachable and not multicast. IPv6 forms that carry an IPv4 address are judged by that address;
    any other IPv6 address must be global unicast (2000::/3), globally reachable and not multicast — so ULA
    (fc00::/7), link-local (fe80::/10), site-local (fec0::/10), local-use NAT64 (64:ff9b:1::/48), ::, ::1 and
    documentation prefixes are all refused.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return all(v4.is_global and not v4.is_multicast for v4 in inner)
        if ip not in _GLOBAL_UNICAST or any(ip in net for net in _NOT_GLOBAL_V6):
            return False
    return ip.is_global and not ip.is_multicast


class ImageLoader:
    def __init__(self, settings: ServerSettings, pool):
        self.max_bytes = settings.max_image_bytes
        self.max_pixels = settings.max_image_pixels
        self.fetch_timeout = settings.image_fetch_timeout
        self.max_redirects = settings.image_max_redirects
        self.allow_private = settings.allow_private_urls
        root = settings.allowed_local_media_path
        self.media_root = os.path.realpath(root) if root else None
        self.pool = pool  # the executor that decodes; shared with prompt building

    async def load_bytes(self, url: str) -> bytes:
        """Any accepted image URL → its encoded bytes (raises BadRequest / PayloadTooLarge with a safe message)."""
        url = url.strip()
        scheme = _scheme(url)
        loop = asyncio.get_running_loop()
        if scheme == "data" or not scheme:
            return await loop.run_in_executor(self.pool, self.decode_data_url, url)
        if scheme in ("http", "https"):
            return await self.fetch(url)
        if scheme == "file":
            return await loop.run_in_executor(self.pool, self.read_file, url)
        raise BadRequest(f"unsupported image URL scheme {scheme!r}: use data:, http(s):// or file://")

    # ---- data: ----------------------------------------------------------------------------------------------
    def decode_data_url(self, url: str) -> bytes:
        m = _DATA_URL.match(url)
        if m is None and url.startswith("data:"):
            raise BadRequest("data URLs must be base64: data:image/<type>;base64,<data>")
        payload = m.group("data") if m else url  # bare base64 (Ollama and llama.cpp accept it, so clients send it)
        payload = re.sub(r"\s+", "", payload)
        if len(payload) * 3 // 4 > self.max_bytes:
            raise PayloadTooLarge(f"image is larger than the limit of {self.max_bytes:,} bytes")
        payload = payload.replace("-", "+").replace("_", "/")
        payload += "=" * (-len(payload) % 4)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            if m is None:
                raise BadRequest("image_url must be a data: URL, an http(s):// URL or a file:// URL") from None
            raise BadRequest("image data URL holds invalid base64") from None
        if not data:
            raise BadRequest("image data URL is empty")
        return data

    # ---- file:// --------------------------------------------------------------------------------------------
    def read_file(self, url: str) -> bytes:
        if self.media_root is None:
            raise BadRequest("file:// image URLs are disabled on this server (see --allowed-local-media-path)")

        def invalid() -> BadRequest:
            return BadRequest("file:// URL is not a valid local path")

        try:
            parts = urlsplit(url)
            # Percent-escapes are bytes: decode them as the OS does (surrogateescape), so any file name is reachable.
            path = os.fsdecode(unquote_to_bytes(parts.path))
        except (ValueError, UnicodeError):  # a malformed URL, or a lone surrogate that UTF-8 cannot encode
            raise invalid() from None
        if parts.netloc not in ("", "localhost"):
            raise BadRequest("file:// URLs must name a local path (file:///path/to/image.png)")
        if "\0" in path or not path.startswith("/"):
            raise invalid()
        try:
            real = os.path.realpath(path)
            inside = os.path.commonpath([self.media_root, real]) == self.media_root
        except (ValueError, UnicodeError):
            raise invalid() from None
        if not inside:
            raise BadRequest("file:// URL is outside the folder this server allows")
        try:
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode):
                raise BadRequest("file:// URL does not name a regular file")
            if st.st_size > self.max_bytes:
                raise PayloadTooLarge(f"image is larger than the limit of {self.max_bytes:,} bytes")
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
            with os.fdopen(fd, "rb") as f:
                data = f.read(self.max_bytes + 1)
        except (OSError, ValueError, UnicodeError):
            raise BadRequest("file:// URL could not be read (missing or not readable)") from None
        if len(data) > self.max_bytes:
            raise PayloadTooLarge(f"image is larger than the limit of {self.max_bytes:,} bytes")
        return data

    # ---- http(s):// -----------------------------------------------------------------------------------------
    async def fetch(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self.fetch_timeout):
                async with httpx.AsyncClient(
                    follow_redirects=False,
                    trust_env=False,
                    timeout=self.fetch_timeout,
                    headers={"User-Agent": f"glm4v-edge/{__version__}"},
                ) as client:
                    for _ in range(self.max_redirects + 1):
                        target, headers, extensions = await self._pin(url)
                        async with client.stream("GET", target, headers=headers, extensions=extensions) as r:
                            if r.status_code in _REDIRECTS and "location" in r.headers:
                                try:
                                    url = urljoin(url, r.headers["location"])
                                except ValueError:
                                    raise BadRequest("image URL redirected to an invalid URL") from None
                                continue
                            if r.status_code != 200:
                                raise BadRequest(f"fetching the image URL answered HTTP {r.status_code}")
                            return await self._read_capped(r)
                    raise BadRequest(f"image URL redirected more than {self.max_redirects} times")
        except TimeoutError:
            raise BadRequest(f"fetching the image URL took longer than {self.fetch_timeout:g} s") from None
        except httpx.HTTPError as e:
            raise BadRequest(f"could not fetch the image URL ({type(e).__name__})") from None

    async def _pin(self, url: str) -> tuple[httpx.URL, dict, dict]:
        """Resolve and check the host; return a URL that connects to the checked address, plus Host/SNI."""
        try:
            u = httpx.URL(url)
        except httpx.InvalidURL:
            raise BadRequest("image URL is not a valid URL") from None
        if u.scheme not in ("http", "https") or not u.host:
            raise BadRequest("image URLs (and their redirects) must be http:// or https:// with a host")
        host = u.raw_host.decode("ascii")
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise BadRequest(f"image URL host {host!r} could not be resolved") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        if not addresses:
            raise BadRequest(f"image URL host {host!r} could not be resolved")
        if not self.allow_private:
            for a in addresses:
                if not is_public_address(a):
                    raise BadRequest(
                        f"image URL host {host!r} resolves to a non-public address ({a}); this server refuses "
                        "private, loopback and link-local targets (see --allow-private-urls)",
                        code="image_url_forbidden",
                    )
        headers = {"Host": u.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if u.scheme == "https" else {}
        return u.copy_with(host=addresses[0]), headers, extensions

    async def _read_capped(self, r: httpx.Response) -> bytes:
        declared = r.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise PayloadTooLarge(f"image is larger than the limit of {self.max_bytes:,} bytes")
        buf = bytearray()
        async for chunk in r.aiter_bytes():
            buf += chunk
            if len(buf) > self.max_bytes:
                raise PayloadTooLarge(f"image is larger than the limit of {self.max_bytes:,} bytes")
        return bytes(buf)

    # ---- decoding (runs in the pool) ------------------------------------------------------------------------
    def preprocess(self, data: bytes, processor: ImageProcessor, size: int) -> torch.Tensor:
        """Encoded bytes → (3, size, size) float32.

        ``open_image`` is the one place the bytes are opened: with the ``ALLOWED_FORMATS`` decoders only, the pixel
        count checked from the header before any pixel is decoded (413), first frame only. Its messages are fixed
        text, safe to pass on; Pillow's own exception text is only logged (debug).
        """
        try:
            image = open_image(data, self.max_pixels, target=size)
        except ImageTooLarge as e:
            raise PayloadTooLarge(str(e)) from None
        except ImageError as e:
            raise BadRequest(f"image could not be used: {e}") from None
        return processor(image, size=size)
