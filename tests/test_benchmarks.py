"""benchmarks/reference_memory.py: its last line is the JSON it promises, and what it counts on
the meta device (through the trainer's own _build) equals the bytes written out by hand from
WanTransformer3DModel's layer shapes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from regdpo.config import LoraConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_memory.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("reference_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wan_parameters(D: int, L: int, F: int, T: int, Q: int = 256) -> int:
    """WanTransformer3DModel (T2V, patch 1x2x2, 16 -> 16 channels, cross_attn_norm, qk rms norm
    across heads), by hand: patch embedding 64D + D; time embedder QD + D + D^2 + D; time
    projection 6D^2 + 6D; text embedder TD + D + D^2 + D; output 64D + 64 and a (2, D) table.
    Per block: 8 attention linears 8(D^2 + D), 4 qk norms 4D, norm2 2D, ffn 2DF + F + D, (6, D) table."""
    return 8 * D * D + 141 * D + Q * D + T * D + 64 + L * (8 * D * D + 2 * D * F + 21 * D + F)


def wan_fp32_parameters(D: int, L: int, Q: int = 256) -> int:
    """The parameters Wan's `_keep_in_fp32_modules` keep float32: time embedder, the (2, D) and
    per-block (6, D) tables, the per-block affine norm2 (norm1/norm3 have no weights)."""
    return (Q * D + D + D * D + D) + 2 * D + L * (6 * D + 2 * D)


def test_reference_memory_counts_equal_the_formulas(bench, capsys):
    D, L, F, T, S, heads = 32, 3, 48, 40, 64, 2
    result = bench.main(["--preset", "custom", "--dtype", "bfloat16", "--layers", str(L), "--heads", str(heads),
                         "--head-dim", str(D // heads), "--ffn", str(F), "--text-dim", str(T),
                         "--rope-max-seq-len", str(S)])
    data = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert data == json.loads(json.dumps(result))
    r = data["custom"]
    assert r["transformer"] == {"num_layers": L, "num_attention_heads": heads, "attention_head_dim": D // heads,
                                "ffn_dim": F, "text_dim": T, "rope_max_seq_len": S}

    P, K = wan_parameters(D, L, F, T), wan_fp32_parameters(D, L)
    rope = 2 * S * (D // heads) * 4  # freqs_cos and freqs_sin buffers, float32
    base_bf16 = 2 * (P - K) + 4 * K + rope  # as from_pretrained(torch_dtype=bfloat16) casts
    lora_cfg = LoraConfig()
    lora = L * 2 * len(lora_cfg.target_modules) * lora_cfg.rank * (D + D)  # A (r x D) + B (D x r), both attentions

    # (a) LoRA + adapters-off: the base in bf16 plus float32 adapters; no second copy
    assert r["lora_reference_mode"] == "adapters-off"
    assert r["lora_trainable_parameters"] == lora
    assert r["lora_parameters"] == P + lora
    assert r["lora_trainable_bytes"] == 4 * lora
    assert r["lora_weight_bytes"] == base_bf16 + 4 * lora
    assert r["lora_reference_bytes"] == 0
    # (b) full FT + copy: float32 masters of every parameter, plus the copy in model.dtype
    assert r["full_reference_mode"] == "copy"
    assert r["full_trainable_parameters"] == P
    assert r["full_parameters"] == 2 * P
    assert r["full_trainable_bytes"] == 4 * P
    assert r["full_reference_bytes"] == base_bf16
    assert r["full_weight_bytes"] == 4 * P + rope + base_bf16
    for s in ("lora", "full"):
        assert r[f"{s}_trainable_dtypes"] == ["float32"]
        assert r[f"{s}_grad_bytes"] == r[f"{s}_trainable_bytes"]
        # exp_avg + exp_avg_sq in float32, and one float32 step counter per tensor
        assert r[f"{s}_adamw_state_bytes"] == 2 * r[f"{s}_trainable_bytes"] + 4 * r[f"{s}_trainable_tensors"]
        assert r[f"{s}_training_state_bytes"] == (r[f"{s}_weight_bytes"] + r[f"{s}_grad_bytes"]
                                                  + r[f"{s}_adamw_state_bytes"])
    assert r["full_over_lora_training_state"] == pytest.approx(
        r["full_training_state_bytes"] / r["lora_training_state_bytes"])


def test_reference_memory_size_flags_need_preset_custom(bench, capsys):
    with pytest.raises(SystemExit) as err:
        bench.main(["--preset", "14b", "--layers", "2"])
    assert err.value.code == 2
    assert "--layers set the size of --preset custom" in capsys.readouterr().err
