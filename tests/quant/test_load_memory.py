"""Quantizing while loading: the host never holds the 16-bit model, only the quantized one plus about a shard."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, re, sys, threading, time
def anon():
    return int(re.search(r"RssAnon:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
import torch, bitsandbytes, accelerate, quant, quant.loader  # imports are not the load's memory
import transformers.integrations.bitsandbytes, transformers.quantizers.quantizer_bnb_4bit
import transformers.quantizers.quantizer_bnb_8bit
peak, done = [0], [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)
base = anon()
t = threading.Thread(target=sample); t.start()
lm = quant.load(sys.argv[1], precision=sys.argv[2], device="cpu")
done[0] = True; t.join()
print(json.dumps({"peak": peak[0] - base, "weights": lm.weight_bytes["total"]}))
"""


@pytest.fixture(scope="module")
def sharded_mid(tmp_path_factory):
    from glm4v.tiny import write_checkpoint

    # hidden 1024, 4 layers, 8 shards: big enough that weights dominate the allocator's noise.
    return write_checkpoint(tmp_path_factory.mktemp("mid") / "m", preset="mid", num_layers=4, vision_layers=1, shards=8)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("precision", ["nf4", "int8"])
def test_quantized_load_peak_stays_below_the_16bit_size(sharded_mid, precision):
    checkpoint_bytes = sum(f.stat().st_size for f in sharded_mid.glob("*.safetensors"))
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(sharded_mid), precision], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    shard = checkpoint_bytes / 8
    print(
        f"\n{precision}: bf16 checkpoint {checkpoint_bytes / 2**20:.0f} MiB, quantized {r['weights'] / 2**20:.0f} "
        f"MiB, peak host growth while loading {r['peak'] / 2**20:.0f} MiB"
    )
    largest_linear_fp32 = 2 * 2816 * 1024 * 4  # dense_h_to_4h, as float32 while bitsandbytes quantizes it
    assert r["peak"] < r["weights"] + shard + 3 * largest_linear_fp32  # quantized + a shard + a layer's temporaries
    assert r["peak"] < 0.85 * checkpoint_bytes  # never the 16-bit model
