"""``--precision auto`` on the low-VRAM ladder (decided from the estimate, with fake free-VRAM and host figures), the
host-RAM check, and ``LoadRequest.resolve`` applying the choice only to what the user left at its default."""

from __future__ import annotations

import types

import psutil
import pytest
import torch

import quant.auto
from glm4v import ChatGLMConfig
from quant.auto import AutoChoice, choose_auto, choose_for_memory
from quant.estimate import estimate
from quant.fit import HOST_MARGIN_BYTES, Rung, check_host_memory
from quant.request import LoadRequest

GIB = 2**30
CFG = ChatGLMConfig()
OFF = ("vision", "embeddings")
PLENTY = 64 * GIB  # host RAM


def pick(free_gib: float, host: int | None = PLENTY, **kw) -> AutoChoice:
    return choose_for_memory(CFG, int(free_gib * GIB), host, **kw)


def rung(choice: AutoChoice) -> Rung:
    return Rung(choice.precision, choice.vision_precision, choice.offload, choice.lm_head_precision)


@pytest.mark.parametrize(
    "card,expected",
    [
        (24, Rung("int8")),  # bf16 needs ~29 GB
        (12, Rung("nf4")),
        (8, Rung("nf4", "bf16", OFF)),  # full-quality vision, streamed
        (6, Rung("nf4", "bf16", OFF, "nf4")),  # the estimate says a 16-bit tower still streams on 6 GiB free
    ],
)
def test_auto_on_6_8_12_24_gb_cards(card, expected):
    choice = pick(card)
    assert rung(choice) == expected, choice.reason
    assert choice.estimate.fits and choice.estimate.total_bytes <= card * GIB
    assert choice.estimate.host_bytes + HOST_MARGIN_BYTES <= PLENTY
    # every more faithful rung is what the estimator says does not fit
    assert all(r.estimate(config=CFG).total_bytes > card * GIB for r in quant.auto.auto_ladder()[: _index(expected)])
    assert "fits" in choice.reason


def _index(r: Rung) -> int:
    return quant.auto.auto_ladder().index(r)


def test_six_gb_card_with_less_free_streams_nf4_vision():
    """A 6 GB card that has lost a little to the desktop: below what the bf16 tower + nf4 head needs, the smallest
    rung (nf4 vision streamed, nf4 head) is taken — the issue's 6 GB tier."""
    bf16_tower = Rung("nf4", "bf16", OFF, "nf4").estimate(config=CFG).total_bytes
    choice = choose_for_memory(CFG, bf16_tower - 1, PLENTY)
    assert rung(choice) == Rung("nf4", "nf4", OFF, "nf4")
    assert choice.estimate.total_bytes <= bf16_tower - 1 and choice.estimate.total_bytes <= 6.0e9


def test_vision_streams_nf4_when_the_host_lacks_ram_for_bf16():
    host = 8 * GIB  # bf16 tower + table = 9.55 GiB: too much; nf4 tower + table = 3.4 GiB: fine
    choice = pick(8, host)
    assert rung(choice) == Rung("nf4", "nf4", OFF)
    assert choice.estimate.host_bytes + HOST_MARGIN_BYTES <= host
    assert rung(pick(6, host)) == Rung("nf4", "nf4", OFF, "nf4")


def test_nothing_fits_takes_the_smallest_and_says_so():
    choice = pick(4)
    assert rung(choice) == Rung("nf4", "nf4", OFF, "nf4")
    assert "nothing fits 4.00 GiB" in choice.reason and not choice.estimate.fits


def test_explicit_choices_are_kept_on_every_rung():
    c = pick(6, vision_precision="bf16")
    assert c.vision_precision == "bf16" and rung(c) == Rung("nf4", "bf16", OFF, "nf4")
    c = pick(24, offload=("vision",))
    assert c.offload == ("vision",) and c.precision == "bf16"  # bf16 LM with only the tower streamed fits 24
    c = pick(14, offload=("vision",))
    # int8 cannot be streamed: on the int8 rung the tower streams in 16-bit instead
    assert (c.precision, c.vision_precision, c.offload) == ("int8", "bf16", ("vision",))
    c = pick(8, lm_head_precision="int8")
    assert c.lm_head_precision == "int8" and c.offload == OFF
    with pytest.raises(ValueError, match="int8"):
        pick(8, vision_precision="int8", offload=("vision",))


def test_the_first_16_bit_format_follows_the_gpu():
    assert rung(pick(8, first="fp16")) == Rung("nf4", "fp16", OFF)
    assert pick(48, first="fp16").precision == "fp16"


def test_choose_auto_reads_free_vram_and_host_ram(monkeypatch):
    monkeypatch.setattr(quant.auto.torch.cuda, "mem_get_info", lambda device: (8 * GIB, 8 * GIB))
    monkeypatch.setattr(quant.auto, "device_supports_bf16", lambda device: True)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=PLENTY))
    assert rung(choose_auto(CFG, "cuda:0")) == Rung("nf4", "bf16", OFF)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * GIB))
    assert rung(choose_auto(CFG, "cuda:0")) == Rung("nf4", "nf4", OFF)


def test_choose_auto_on_a_cpu_decides_only_the_precision(monkeypatch):
    monkeypatch.setattr(quant.auto, "cpu_has_native_bf16", lambda: False)
    c = choose_auto(CFG, "cpu", offload=("embeddings",))
    assert (c.precision, c.vision_precision, c.offload, c.lm_head_precision) == ("fp32", None, ("embeddings",), None)


# ---- host RAM --------------------------------------------------------------------------------------------------
def test_check_host_memory_refuses_with_the_numbers_and_the_fixes():
    est = estimate(CFG, precision="nf4", vision_precision="bf16", offload=OFF)
    with pytest.raises(ValueError) as e:
        check_host_memory(est, available_bytes=8 * GIB)
    msg = str(e.value)
    assert "10.25 GB in host (pinned) memory" in msg and "8.59 GB of host RAM is available" in msg
    assert "--vision-precision nf4 (the streamed tower then takes 2.39 GB" in msg
    assert "drop vision from --offload" in msg and "drop embeddings from --offload" in msg
    assert check_host_memory(est, available_bytes=est.host_bytes + HOST_MARGIN_BYTES) is est
    resident = estimate(CFG, precision="nf4")
    assert check_host_memory(resident, available_bytes=0) is resident  # nothing offloaded: nothing to check


def test_check_host_memory_takes_a_request_and_reads_psutil(monkeypatch):
    r = LoadRequest(synthetic="full", precision="nf4", vision_precision="nf4", offload=OFF, device="cpu")
    check_host_memory(r, available_bytes=8 * GIB)  # 3.6 GB + 2 GiB margin
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=4 * GIB))
    with pytest.raises(ValueError, match="4.29 GB of host RAM is available"):
        check_host_memory(r)


def test_resolve_checks_the_host_before_loading(monkeypatch):
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=4 * GIB))
    r = LoadRequest(synthetic="full", precision="nf4", vision_precision="bf16", offload=OFF, device="cpu")
    with pytest.raises(ValueError, match="host RAM"):
        r.resolve()
    assert not LoadRequest(synthetic="full", precision="nf4", device="cpu").resolve().offload  # nothing to check


def test_resolve_applies_auto_only_to_fields_left_at_their_defaults(monkeypatch):
    seen = {}
    smallest = AutoChoice("nf4", "nf4", OFF, "nf4", "test")

    def fake(config, device, **kw):
        seen.update(kw)
        return smallest

    monkeypatch.setattr(quant.auto, "choose_auto", fake)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=PLENTY))
    r = LoadRequest(synthetic="tiny", device="cpu").resolve()
    assert (r.precision, r.vision_precision, r.offload, r.lm_head_precision) == ("nf4", "nf4", OFF, "nf4")
    assert seen["vision_precision"] is None and seen["offload"] is None and seen["lm_head_precision"] is None
    # an explicit --offload none is kept: auto may not move anything to the host then
    assert LoadRequest(synthetic="tiny", device="cpu", offload=()).resolve().offload == ()
    r = LoadRequest(synthetic="tiny", device="cpu", vision_precision="bf16", offload=("vision",)).resolve()
    assert (r.precision, r.vision_precision, r.offload, r.lm_head_precision) == ("nf4", "bf16", ("vision",), "nf4")
    assert seen["vision_precision"] == "bf16" and seen["offload"] == ("vision",)
    r = LoadRequest(synthetic="tiny", device="cpu", lm_head_precision="int8").resolve()
    assert r.lm_head_precision == "int8"


def test_resolve_logs_the_reason(monkeypatch, caplog):
    monkeypatch.setattr(
        quant.auto, "choose_auto", lambda config, device, **kw: AutoChoice("nf4", None, (), None, "because")
    )
    with caplog.at_level("INFO", logger="quant.request"):
        LoadRequest(synthetic="tiny", device="cpu").resolve()
    assert "--precision auto → --precision nf4 (because)" in caplog.text
    assert torch.device(LoadRequest(synthetic="tiny", device="cpu").resolve().device).type == "cpu"
