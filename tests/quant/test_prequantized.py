"""Pre-quantized checkpoints (``glm4v-edge quantize``): written once, loaded as they are — the same greedy tokens and
logits as quantizing while loading, loadable by plain ``transformers``, their size what the estimator says, and a
mismatched precision refused with a message saying what the folder holds."""

from __future__ import annotations

import json
import struct

import pytest
import torch

import quant
from glm4v import SamplingParams
from glm4v.checkpoint import CheckpointError
from glm4v.generate import generate_text
from glm4v_edge.cli import main
from quant.estimate import estimate
from quant.prequantized import held_quantization

from ..support import png_bytes, prompt_ids

GREEDY = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


def _quantize(src, out, *extra) -> None:
    args = ["quantize", "--model", str(src), "--precision", *extra, "--device", "cpu", "--out", str(out)]
    assert main(args) == 0


def _tensor_bytes(folder) -> int:
    """Bytes of tensor data in the folder's safetensors (file size less its JSON header)."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as h:
            header = struct.unpack("<Q", h.read(8))[0]
        total += f.stat().st_size - 8 - header
    return total


def _same_model(a, b, image: bool) -> None:
    ids = prompt_ids(a, "what is in the picture", image=image)
    px = a.image_processor(png_bytes()) if image else None
    assert generate_text(a.model, a.tokenizer, ids, px, GREEDY) == generate_text(b.model, b.tokenizer, ids, px, GREEDY)
    with torch.no_grad():
        t = torch.tensor([ids])
        la = a.model(t, pixel_values=None if px is None else px[None]).logits
        lb = b.model(t, pixel_values=None if px is None else px[None]).logits
    assert torch.equal(la, lb)


@pytest.mark.parametrize("precision", ["nf4", "int8", "fp4"])
def test_round_trip_equals_quantizing_while_loading(tiny_dir, tmp_path, precision):
    out = tmp_path / precision
    _quantize(tiny_dir, out, precision)
    pre = quant.load(out, precision=precision, device="cpu")
    fly = quant.load(tiny_dir, precision=precision, device="cpu")
    assert pre.prequantized and not fly.prequantized
    assert pre.describe()["layers"] == fly.describe()["layers"]
    assert pre.describe()["quantization"]["prequantized"] is True
    _same_model(fly, pre, image=True)
    est = estimate(pre.config, precision=precision)
    assert abs(_tensor_bytes(out) - est.weights["total"]) <= 0.02 * est.weights["total"]
    assert (out / "tokenizer.model").is_file() and (out / "generation_config.json").is_file()
    assert json.loads((out / "config.json").read_text())["glm4v_edge"]["prequantized"] == precision


def test_vision_left_in_16_bit_and_loaded_by_plain_transformers(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "nf4-vision-bf16"
    _quantize(tiny_dir, out, "nf4", "--vision-precision", "bf16")
    held = held_quantization(out)
    assert held.precision == "nf4" and held.vision_precision == "bf16"
    pre = quant.load(out, precision="nf4", vision_precision="bf16", device="cpu")
    fly = quant.load(tiny_dir, precision="nf4", vision_precision="bf16", device="cpu")
    _same_model(fly, pre, image=True)
    plain = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")  # config.json says how
    kinds = {type(m).__name__ for m in plain.transformer.encoder.modules()}
    assert "Linear4bit" in kinds
    ids = torch.tensor([prompt_ids(pre, "hello")])
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, pre.model(ids).logits)


def test_auto_takes_what_the_folder_holds_and_a_mismatch_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "int8"
    _quantize(tiny_dir, out, "int8")
    lm = quant.open_model(quant.LoadRequest(model=str(out), precision="auto", device="cpu"))
    assert lm.spec.precision == "int8" and lm.prequantized
    with pytest.raises(CheckpointError, match="pre-quantized checkpoint holding int8.*--precision int8"):
        quant.load(out, precision="nf4", device="cpu")
    with pytest.raises(CheckpointError, match="--offload needs the bf16"):
        quant.load(out, precision="int8", device="cpu", offload=("vision",))


def test_info_and_refusals(tiny_dir, tmp_path, capsys):
    out = tmp_path / "nf4"
    _quantize(tiny_dir, out, "nf4")
    assert main(["info", str(out)]) == 0
    assert "pre-quantized nf4" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prequantized"] == "nf4 (head bf16)"
    # a non-empty target, an inexpressible mix, and re-quantizing a quantized folder are refused
    assert main(["quantize", "--model", str(tiny_dir), "--precision", "nf4", "--device", "cpu", "--out", str(out)]) == 2
    mix = ["--vision-precision", "int8", "--out", str(tmp_path / "mix")]
    assert main(["quantize", "--model", str(tiny_dir), "--precision", "nf4", "--device", "cpu", *mix]) == 2
    again = ["--out", str(tmp_path / "again")]
    assert main(["quantize", "--model", str(out), "--precision", "nf4", "--device", "cpu", *again]) == 2


def test_mid_checkpoint_round_trip(tmp_path_factory):
    """The mid checkpoint (124 M parameters, 4-bit-friendly layer sizes): same tokens and logits, size as estimated."""
    from glm4v.tiny import write_checkpoint

    src = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "mid", preset="mid", seed=0)
    out = tmp_path_factory.mktemp("q") / "mid-nf4"
    _quantize(src, out, "nf4")
    pre = quant.load(out, precision="nf4", device="cpu")
    fly = quant.load(src, precision="nf4", device="cpu")
    _same_model(fly, pre, image=False)
    est = estimate(pre.config, precision="nf4")
    assert abs(_tensor_bytes(out) - est.weights["total"]) <= 0.01 * est.weights["total"]


def test_models_endpoint_says_pre_quantized(tiny_dir, tmp_path, base_settings):
    from ..support import serve

    out = tmp_path / "nf4"
    _quantize(tiny_dir, out, "nf4")
    lm = quant.open_model(quant.LoadRequest(model=str(out), device="cpu"))
    with serve(base_settings, lm) as srv:
        card = srv.client().models.list().data[0].model_dump()
        answer = srv.post({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert card["precision"] == "nf4" and card["quantization"]["prequantized"] is True
    assert any("pre-quantized" in n for n in card["notes"]) and answer.status_code == 200


def test_a_folder_written_in_fp16_loads_in_fp16(tiny_dir, tmp_path):
    """Its unquantized tensors are fp16: loading takes that dtype (found in review: it was cast to bf16 and every
    forward failed), and asking for another is refused."""
    out = tmp_path / "nf4-fp16"
    _quantize(tiny_dir, out, "nf4", "--compute-dtype", "fp16")
    assert held_quantization(out).float_dtype == "fp16"
    pre = quant.open_model(quant.LoadRequest(model=str(out), device="cpu"))
    fly = quant.load(tiny_dir, precision="nf4", compute_dtype="fp16", device="cpu")
    _same_model(fly, pre, image=False)
    with pytest.raises(CheckpointError, match="--compute-dtype bf16"):
        quant.load(out, precision="nf4", compute_dtype="bf16", device="cpu")
    mixed = ["--vision-precision", "fp16", "--compute-dtype", "bf16", "--out", str(tmp_path / "mixed")]
    assert main(["quantize", "--model", str(tiny_dir), "--precision", "nf4", "--device", "cpu", *mixed]) == 2


def test_held_reads_what_transformers_writes(tmp_path):
    """`llm_int8_skip_modules: null` (a plain BitsAndBytesConfig) keeps the output layer in 16-bit; entries match
    by substring, as transformers matches them."""
    cfg = {"dtype": "bfloat16", "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
    for skip, vision, head in ((None, "fp4", "bf16"), (["output_layer"], "fp4", "bf16"), (["vision"], "bf16", "fp4")):
        cfg["quantization_config"]["llm_int8_skip_modules"] = skip
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        held = held_quantization(tmp_path)
        assert (held.precision, held.vision_precision, held.lm_head_precision) == ("fp4", vision, head), skip
