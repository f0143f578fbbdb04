"""int8 / int4 quantization: the layers, loading, batched rows, and quality against float32."""

from __future__ import annotations

import copy
import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from golden_chat import INPUT_NAMES, build_state

from lfm2audio import LFM2AudioModel, LFM2AudioProcessor
from lfm2audio.model import quantize, w4a8
from lfm2audio.model.lfm2 import SwiGLU
from lfm2audio.model.linear import Linear
from lfm2audio.model.quantize import (
    Int4Linear,
    Int8Linear,
    W4A8Linear,
    W8A8Linear,
    act_levels,
    int8_linear,
    join_float_projections,
    join_projections,
    quantize_int4,
    quantize_int8,
    quantized_linear,
    w8a8_available,
)
from lfm2audio.model.quantize_eval import compare, depth_logits_forced, teacher_forced

INT8 = (Int8Linear, W8A8Linear)
QUANTIZED = (Int8Linear, W8A8Linear, Int4Linear, W4A8Linear)
MODEL_INT8 = W8A8Linear if w8a8_available() else Int8Linear  # what the model's int8 projections are here
MODEL_INT4 = W4A8Linear if w4a8.available() else Int4Linear  # and its int4 ones
needs_w4a8 = pytest.mark.skipif(not w4a8.available(), reason="needs the AVX2 int4 kernel (x86-64, AVX2, a C compiler)")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def model_f32(checkpoint_dir):
    return LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module", params=["int8", "int4"])
def model_q(request, checkpoint_dir):
    return request.param, LFM2AudioModel.from_pretrained(
        checkpoint_dir, device="cpu", dtype=torch.float32, quantize=request.param
    )


# Layers ------------------------------------------------------------------------------------------------


def test_int8_roundtrip_and_matmul():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g) * 0.02
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    deq = q.float() * scales.float()[:, None]
    # Rounding to the nearest level: at most half a step (plus the bf16 rounding of the scale) per weight.
    assert float(((deq - w).abs() / scales.float()[:, None]).max()) <= 0.5 + 1e-3
    layer = Int8Linear.from_float(w)
    x = torch.randn(5, 160, generator=g)
    assert _rel(layer(x), x @ deq.T) < 1e-2  # bf16 activations inside
    assert _rel(layer(x), x @ w.T) < 2e-2


def test_int4_roundtrip_and_matmul():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g) * 0.02
    q, sz = quantize_int4(w, 64)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (4, 64, 2)
    scale, zero = sz[..., 0].float().T, sz[..., 1].float().T  # (out, groups)
    deq = ((q.float() - 8).view(64, 4, 64) * scale[..., None] + zero[..., None]).view(64, 256)
    assert float(((deq - w).abs().view(64, 4, 64) / scale[..., None]).max()) <= 0.5 + 1e-2
    layer = Int4Linear.from_float(w, 64)
    x = torch.randn(3, 256, generator=g)
    assert _rel(layer(x), x @ deq.T) < 1e-2
    assert _rel(layer(x), x @ w.T) < 0.2  # 16 levels per group: ~10% weight noise


def test_int4_packed_a_block_of_rows_at_a_time_is_the_whole_packing():
    """pack_int4 packs blocks of rows apart (to keep loading's peak memory down): the same bytes and
    scales as packing the whole weight's codes, with a last block shorter than the others, from
    float32 or bfloat16 weights."""
    g = torch.Generator().manual_seed(2)
    for rows, dtype in ((4096 + 80, torch.float32), (1040, torch.bfloat16)):
        w = (torch.randn(rows, 1024, generator=g) * 0.02).to(dtype)
        q, sz = quantize_int4(w, 128)
        packed, sz_blocks = quantize.pack_int4(w, 128)
        assert torch.equal(packed, torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        assert torch.equal(sz_blocks, sz) and sz_blocks.dtype == sz.dtype  # equal() compares values only


def test_int4_falls_back_where_its_kernels_cannot(monkeypatch):
    """The int4 kernel of w4a8.c takes any row count and groups of a multiple of 8 features; ATen's needs
    rows a multiple of 16 (a codebook head has 2049); what fits neither is int8."""
    head, narrow = torch.randn(2049, 64) * 0.02, torch.randn(64, 96) * 0.02  # 96 features: groups of 32
    if w4a8.available():
        assert isinstance(quantized_linear(head, None, "int4"), W4A8Linear)
        assert isinstance(quantized_linear(narrow, None, "int4"), W4A8Linear)
        assert isinstance(quantized_linear(torch.randn(64, 36), None, "int4"), MODEL_INT8)  # groups of 18
    monkeypatch.setenv(w4a8.ENV_KERNEL, "aten")
    assert not w4a8.available()
    assert isinstance(quantized_linear(head, None, "int4"), MODEL_INT8)
    assert isinstance(quantized_linear(torch.randn(64, 64), None, "int4"), Int4Linear)


@needs_w4a8
def test_w4a8_has_int4s_weights_and_is_close_to_their_product():
    """W4A8Linear holds Int4Linear's weights (the same codes and scales, another layout); its int8
    activations, one scale per row and group, cost well under 1% of the output; a row gives the same
    bits alone or in a batch, an all-zero row gives the bias, and (B, T, D) inputs work."""
    g = torch.Generator().manual_seed(11)
    w, b = torch.randn(80, 256, generator=g) * 0.02, torch.randn(80, generator=g)
    layer = W4A8Linear.from_float(w, 128, b)
    q, sz = quantize_int4(w, 128)
    scale, zero = sz[..., 0].float().T, sz[..., 1].float().T
    deq = ((q.float() - 8).view(80, 2, 128) * scale[..., None] + zero[..., None]).view(80, 256)
    torch.testing.assert_close(w4a8.unpack(layer.weight, layer.scales, layer.corr, 80), deq, rtol=0, atol=1e-6)
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1e4, 1.0])[:, None]
    x[3] = 0
    y = layer(x)
    for i in range(6):
        assert torch.equal(layer(x[i : i + 1]), y[i : i + 1])
        assert _rel(y[i] - b, x[i] @ deq.T) < 1e-2 or i == 3
    assert torch.equal(y[3], b)
    assert torch.equal(layer(x.view(2, 3, 256)), y.view(2, 3, 80))
    assert W4A8Linear.from_float(w, 128)(x.bfloat16()).dtype == torch.bfloat16  # the model's dtype
    assert layer(x[:0]).shape == (0, 80)
    layer.to(torch.bfloat16)  # casts the float scales: refused with a clear error, not read out of bounds
    with pytest.raises(ValueError, match="expected contiguous float32"):
        layer(x)


@needs_w4a8
def test_w4a8_paths_agree_and_pad_the_last_tile():
    """Every path this CPU has (AVX2; AVX-512 VNNI where present) gives the same product to float rounding,
    each keeps a row's bits in any batch, and the padded rows of a last, partial tile of 16 outputs never
    reach the output (out of 2049 rows, 21 outputs and groups of 8 features)."""
    g = torch.Generator().manual_seed(3)
    for out_features, in_features, group_size in ((2049, 256, 128), (21, 24, 8)):
        w = torch.randn(out_features, in_features, generator=g) * 0.02
        layer = W4A8Linear.from_float(w, group_size)
        assert layer.weight.shape == (-(-out_features // 16), in_features // 8, 64)
        x = torch.randn(9, in_features, generator=g)
        exact = x @ w4a8.unpack(layer.weight, layer.scales, layer.corr, out_features).T
        outs = {}
        for isa in w4a8.cpu_isas():
            y = outs[isa] = w4a8.matmul(x, layer.weight, layer.scales, layer.corr, out_features, isa=isa)
            assert y.shape == (9, out_features) and _rel(y, exact) < 1e-2
            for i in (0, 4, 8):
                one = w4a8.matmul(x[i : i + 1], layer.weight, layer.scales, layer.corr, out_features, isa=isa)
                assert torch.equal(one, y[i : i + 1])
        for y in outs.values():
            torch.testing.assert_close(y, outs["avx2"], rtol=1e-5, atol=1e-5 * exact.abs().max().item())
    assert w4a8.isa() in w4a8.cpu_isas()


@needs_w4a8
def test_w4a8_compiles_as_one_graph():
    """fullgraph=True raises at a graph break: the kernel reaches inductor's graph as the custom op."""
    from lfm2audio.model.compiled import have_cxx_compiler

    if not have_cxx_compiler():
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    layer = W4A8Linear.from_float(torch.randn(64, 128) * 0.02, 64, torch.randn(64))
    x = torch.randn(3, 128)
    with torch.inference_mode():
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_w4a8_builds_from_source_or_says_why(tmp_path, monkeypatch):
    """A fresh cache compiles the kernel (where AVX2 is); a library in the cache needs no compiler (the CPU
    image's case); without either, int4 gets a warning and ATen's kernel, not an error."""
    if not w4a8._cpu_has_avx2():
        pytest.skip("the kernel is for x86-64 CPUs with AVX2")
    monkeypatch.setenv("LFM2AUDIO_KERNEL_CACHE", str(tmp_path / "built"))
    w4a8._library.cache_clear()
    try:
        assert w4a8.available()
        assert [p.name for p in (tmp_path / "built").iterdir()] == [w4a8.library_path().name]
        assert isinstance(quantized_linear(torch.randn(64, 64), None, "int4"), W4A8Linear)
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        w4a8._library.cache_clear()
        assert w4a8.available()  # built already
        monkeypatch.setenv("LFM2AUDIO_KERNEL_CACHE", str(tmp_path / "empty"))
        w4a8._library.cache_clear()
        with pytest.warns(UserWarning, match="no C compiler"):
            assert not w4a8.available()
        assert isinstance(quantized_linear(torch.randn(64, 64), None, "int4"), Int4Linear)
    finally:
        monkeypatch.undo()
        w4a8._library.cache_clear()


@pytest.mark.skipif(not w8a8_available(), reason="needs fbgemm (x86 builds of torch)")
@pytest.mark.parametrize("residual", [False, True], ids=["one-pass", "residual"])
def test_w8a8_rows_are_independent_and_close_to_float(residual):
    """Each row is scaled to its own peak before the fixed int8 grid: a row gives the same bits alone
    or batched beside rows of any size, an all-zero row gives the bias, and the result is close to float,
    with the input on one grid or (the residual pass of 7-bit CPUs) on two."""
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(192, 256, generator=g) * 0.02, torch.randn(192, generator=g)
    layer = W8A8Linear.from_float(w, b)
    layer.residual = residual
    tolerance = 1.5e-2 if residual or layer.levels == 127 else 3e-2  # a 7-bit grid alone errs twice as far
    x = torch.randn(6, 256, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1.0, 1e4, 1.0])[:, None]
    x[3] = 0
    y = layer(x)
    for i in range(6):
        assert torch.equal(layer(x[i : i + 1]), y[i : i + 1])
    assert torch.equal(y[3], b)
    ref = x @ w.T + b
    for i in (0, 1, 2, 4, 5):
        assert _rel(y[i] - b, ref[i] - b) < tolerance  # int8 weights and int8 activations
    assert _rel(layer.dequantize(), w) < 1e-2
    assert layer(x.bfloat16()).dtype == torch.bfloat16 and layer(x.view(2, 3, 256)).shape == (2, 3, 192)
    assert not any(t.numel() for t in layer.buffers())  # the kernel's packed copy is the only weight


@pytest.mark.skipif(not w8a8_available(), reason="needs fbgemm (x86 builds of torch)")
def test_w8a8_residual_pass_gives_the_input_about_13_bits():
    """Against the product with the layer's own (dequantized) weight, only the input's rounding is left:
    one 7-bit grid errs by about a percent, the residual pass by under a tenth of that."""
    g = torch.Generator().manual_seed(5)
    layer = W8A8Linear.from_float(torch.randn(64, 256, generator=g) * 0.02)
    x = torch.randn(8, 256, generator=g)
    ref = x @ layer.dequantize().T
    layer.levels, layer.residual = 63, False
    one_pass = _rel(layer(x), ref)
    layer.residual = True
    two_pass = _rel(layer(x), ref)
    assert 2e-3 < one_pass < 3e-2 and two_pass < one_pass / 10
    assert W8A8Linear.from_float(torch.eye(8)).residual == (act_levels() < 127)


@pytest.mark.skipif(not w8a8_available(), reason="needs fbgemm (x86 builds of torch)")
def test_w8a8_rotated_input_computes_the_same_product():
    """A rotated layer works on x @ H and W @ H (H block-diagonal Hadamard, orthogonal): the product is
    the float one within int8 error, a heavy-tailed row loses less than without the rotation, and the
    loaded model rotates exactly the backbone's gated-product inputs."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(128, 512, generator=g) * 0.02
    plain, rotated = W8A8Linear.from_float(w), W8A8Linear.from_float(w, rotate=True)
    plain.residual = rotated.residual = False  # the single 7- or 8-bit grid, which the rotation is for
    assert rotated.rotation is not None and rotated.rotation.shape == (128, 128)
    assert _rel(rotated.dequantize(), w) < 1e-2
    x = torch.randn(16, 512, generator=g) * torch.randn(16, 512, generator=g) ** 3  # heavy tails
    ref = x @ w.T
    assert _rel(rotated(x), ref) < 0.6 * _rel(plain(x), ref)
    assert torch.equal(rotated(x[3:4]), rotated(x)[3:4])


JOIN_KINDS = {
    "w8a8": W8A8Linear.from_float,
    "int8 weight-only": Int8Linear.from_float,
    "int4": lambda w, b: Int4Linear.from_float(w, 64, b),
    "w4a8": lambda w, b: W4A8Linear.from_float(w, 64, b),
}


@pytest.mark.parametrize("kind", JOIN_KINDS)
def test_joined_projections_give_the_separate_layers_bits(kind):
    """A feed-forward's w1 and w3 quantized as one layer: the same output bits as quantized apart, for
    one row, several rows and (B, T, D) inputs; the float parts are gone."""
    if kind == "w8a8" and not w8a8_available():
        pytest.skip("needs fbgemm (x86 builds of torch)")
    if kind == "w4a8" and not w4a8.available():
        pytest.skip("needs the AVX2 int4 kernel")
    make = JOIN_KINDS[kind]
    torch.manual_seed(5)
    separate = SwiGLU(128, 256)
    for layer in separate.parameters():
        torch.nn.init.normal_(layer, std=0.05)
    joined = copy.deepcopy(separate)
    join_projections(joined, "w13", make)
    assert joined.w13.out_features == 512 and not hasattr(joined, "w1") and not hasattr(joined, "w3")
    for ff in (separate, joined):
        ff.w2 = make(ff.w2.weight.detach(), None)
    separate.w1, separate.w3 = (make(w.weight.detach(), None) for w in (separate.w1, separate.w3))
    assert type(joined.w13) is type(separate.w1)
    for x in (torch.randn(1, 128), torch.randn(5, 128), torch.randn(2, 3, 128)):
        assert torch.equal(joined(x), separate(x))


def test_join_float_projections_joins_whole_float_groups_only():
    ff, done = SwiGLU(64, 128), SwiGLU(64, 128)
    done.w1 = Int8Linear.from_float(done.w1.weight.detach())  # already quantized: left as it is
    root = torch.nn.ModuleList([ff, done])
    assert join_float_projections(root, Int8Linear.from_float) == 1
    assert isinstance(ff.w13, Int8Linear) and done.w13 is None and isinstance(done.w3, Linear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loaded_model_joins_sibling_projections_without_changing_its_outputs(checkpoint_dir, monkeypatch, mode):
    """The quantized model's feed-forwards (w1 + w3) and attention blocks (q + k + v) are single layers;
    its outputs are those of the same model loaded with nothing joined, bit for bit."""
    from lfm2audio.model.lfm2 import Attention

    kw = dict(device="cpu", dtype=torch.float32, quantize=mode)
    joined = LFM2AudioModel.from_pretrained(checkpoint_dir, **kw)
    monkeypatch.setattr(SwiGLU, "joinable", {})
    monkeypatch.setattr(Attention, "joinable", {})
    separate = LFM2AudioModel.from_pretrained(checkpoint_dir, **kw)
    layers = joined.lfm.layers
    assert all(blk.feed_forward.w13 is not None and not hasattr(blk.feed_forward, "w1") for blk in layers)
    attention = [blk.self_attn for blk in layers if blk.is_attention]
    assert attention and all(a.qkv_proj is not None and not hasattr(a, "q_proj") for a in attention)
    assert all(blk.feed_forward.w13 is not None for blk in joined.depthformer.layers)
    assert all(blk.feed_forward.w13 is None for blk in separate.lfm.layers)
    x = torch.randn(2, 7, joined.config.lfm.hidden_size, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        h_joined, h_separate = joined.lfm(x)[0], separate.lfm(x)[0]
        assert torch.equal(h_joined, h_separate)
        assert torch.equal(joined.sample_audio_frame(h_joined[:, -1]), separate.sample_audio_frame(h_separate[:, -1]))


def test_loaded_int8_model_rotates_the_gated_inputs(checkpoint_dir):
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu", dtype=torch.float32, quantize="int8")
    if not w8a8_available():
        pytest.skip("needs fbgemm (x86 builds of torch)")
    rotated = {n for n, m in model.named_modules() if isinstance(m, W8A8Linear) and m.rotation is not None}
    layers = model.config.lfm.num_hidden_layers
    assert {f"lfm.layers.{i}.feed_forward.w2" for i in range(layers)} <= rotated
    out_projs = {n for n, _ in model.named_modules() if n.startswith("lfm.layers.") and n.endswith(".out_proj")}
    assert len(out_projs) == layers and out_projs <= rotated  # one per block, conv or attention
    assert not any(n.startswith("depthformer.") or n.endswith(("w1", "w3", "in_proj")) for n in rotated)


def test_int8_falls_back_to_bf16_activations_without_fbgemm(monkeypatch):
    monkeypatch.setattr(quantize, "w8a8_available", lambda: False)
    assert isinstance(int8_linear(torch.randn(32, 64)), Int8Linear)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_batched_rows_equal_single_rows(mode):
    g = torch.Generator().manual_seed(2)
    layer = quantized_linear(torch.randn(256, 128, generator=g) * 0.02, torch.randn(256, generator=g), mode)
    x = torch.randn(7, 128, generator=g)
    batched = layer(x)
    single = torch.cat([layer(x[i : i + 1]) for i in range(7)])
    torch.testing.assert_close(batched, single, atol=2e-3, rtol=1e-2)
    # 3-D and non-contiguous inputs (the backbone's (B, T, D) and transposed conv outputs) work too.
    x3 = torch.randn(2, 128, 3, generator=g).transpose(1, 2)
    torch.testing.assert_close(layer(x3), layer(x3.reshape(6, 128)).view(2, 3, 256), atol=2e-3, rtol=1e-2)


# Loading -----------------------------------------------------------------------------------------------


def test_from_pretrained_quantizes_backbone_and_audio_head(model_q):
    mode, model = model_q
    quantized = {n for n, m in model.named_modules() if isinstance(m, QUANTIZED)}
    floats = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lfm.layers.0.feed_forward.w13" in quantized and "depth_linear" in quantized  # w1 + w3 joined
    assert "depthformer.layers.0.operator.qkv_proj" in quantized
    assert {f"depth_embeddings.{k}.to_logits" for k in range(8)} <= quantized  # tied heads: quantized copies
    assert not any(n.startswith(("lfm.", "depthformer.", "depth_linear", "depth_embeddings.")) for n in floats)
    assert any(n.startswith("conformer.") for n in floats) and any(n.startswith("audio_adapter.") for n in floats)
    # Embeddings stay float (lookups), so the model's dtype and its caches do too.
    assert model.dtype == torch.float32 and model.depth_embeddings[0].embedding.weight.dtype == torch.float32
    w13 = model.get_submodule("lfm.layers.0.feed_forward.w13")
    assert isinstance(w13, MODEL_INT4 if mode == "int4" else MODEL_INT8)
    assert isinstance(model.depth_embeddings[0].to_logits, MODEL_INT8)


def test_quantize_argument_errors(checkpoint_dir):
    with pytest.raises(ValueError, match="quantize must be"):
        LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu", quantize="int3")
    with pytest.raises(ValueError, match="CPU-only"):
        LFM2AudioModel.from_pretrained(checkpoint_dir, device="meta", quantize="int8")


# Quality against float32 (teacher-forced on the golden float32 greedy chat stream) --------------------


def test_teacher_forced_quality(model_f32, model_q, golden):
    mode, model = model_q
    steps, prompt = golden["gen.inter.chat.steps"], golden["prefill.chat.embeddings"]
    ref = teacher_forced(model_f32, prompt, steps)
    same = compare(teacher_forced(model_f32, prompt, steps), ref, steps)
    assert same["top1"] == 1.0 and same["text_logits_cos_min"] > 0.999999  # the comparison itself is sound
    r = compare(teacher_forced(model, prompt, steps), ref, steps)
    # Random tiny weights (hidden 64) are a hard case; the full-size figures are in bench_model.py.
    if mode == "int8":
        assert r["text_logits_cos_min"] >= 0.99 and r["depth_logits_cos_mean"] >= 0.995
        assert min(r["layer_cos_mean"]) >= 0.999
        assert r["text_top1"] >= 0.9 and r["audio_code_top1"] >= 0.85
    else:
        assert r["text_logits_cos_mean"] >= 0.85 and r["depth_logits_cos_mean"] >= 0.85
        assert min(r["layer_cos_mean"]) >= 0.9
        assert r["text_top1"] >= 0.4 and r["audio_code_top1"] >= 0.3


def test_quantized_batched_depthformer_and_backbone_rows(model_q, golden):
    _, model = model_q
    steps, prompt = golden["gen.inter.chat.steps"], golden["prefill.chat.embeddings"]
    with torch.inference_mode():
        hidden, _ = model.lfm(prompt)
        h = hidden[0, -4:]
        codes = steps[steps[:, 1] >= 0][:4]
        batched = depth_logits_forced(model, h, codes)
        single = torch.cat([depth_logits_forced(model, h[i : i + 1], codes[i : i + 1]) for i in range(4)])
        torch.testing.assert_close(batched, single, atol=1e-2, rtol=1e-2)
        # Backbone: 3 rows stepped together with a cache equal each row stepped alone.
        x = prompt[0, :3].view(3, 1, -1)
        cache = model.lfm.new_cache(3, 8)
        together, _ = model.lfm(x, cache)
        alone = [model.lfm(x[i : i + 1], model.lfm.new_cache(1, 8))[0] for i in range(3)]
        torch.testing.assert_close(together, torch.cat(alone), atol=1e-2, rtol=1e-2)


def test_quantized_model_generates_chat(model_q, checkpoint_dir, golden):
    _, model = model_q
    proc = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu")
    chat = build_state(proc, "chat", golden["input.wave_user1"])
    out = list(model.generate_interleaved(**{k: chat[k] for k in INPUT_NAMES}, max_new_tokens=20))
    assert len(out) == 20 and {t.numel() for t in out} <= {1, 8}
    assert any(t.numel() == 8 for t in out)


def test_bfloat16_activations_with_quantized_weights(checkpoint_dir):
    model = LFM2AudioModel.from_pretrained(checkpoint_dir, device="cpu", dtype=torch.bfloat16, quantize="int8")
    with torch.inference_mode():
        hidden, _ = model.lfm(torch.randn(1, 4, 64, dtype=torch.bfloat16))
        assert hidden.dtype == torch.bfloat16 and torch.isfinite(hidden).all()
        assert model.sample_audio_frame(hidden[:, -1]).shape == (1, 8)


def test_plain_linear_is_untouched_without_quantize(model_f32):
    assert isinstance(model_f32.get_submodule("lfm.layers.0.feed_forward.w1"), Linear)
    assert not any(isinstance(m, QUANTIZED) for m in model_f32.modules())


# Command lines ---------------------------------------------------------------------------------------


def test_server_quantize_flag_builds_a_quantized_engine(checkpoint_dir):
    from lfm2audio_server.app import default_engine_factory
    from lfm2audio_server.config import ConfigError, ServerConfig, load_config

    config = load_config(["--model", str(checkpoint_dir), "--quantize", "int8", "--max-sessions", "2"], {})
    assert config.quantize == "int8"
    assert load_config([], {"LFM2AUDIO_QUANTIZE": "int4"}).quantize == "int4"
    with pytest.raises(ConfigError, match="quantize"):
        ServerConfig(quantize="int3")
    engine = default_engine_factory(config.replace(device="cpu"))
    gc.unfreeze()  # the factory froze what loading left alive (a server's objects; not this test process's)
    assert isinstance(engine.model.get_submodule("lfm.layers.0.feed_forward.w13"), MODEL_INT8)
    mimi = engine.processor.mimi  # the engine's audio decoder is quantized too (bf16 activations)
    assert isinstance(mimi.decoder_transformer.layers[0].linear1, Int8Linear)


# The Mimi decoder ---------------------------------------------------------------------------------


def test_int8_mimi_decoder_streams_close_to_float(checkpoint_dir):
    """Every linear layer of the decoder transformer and every large SEANet convolution get int8
    copies; streamed PCM stays close to the float decoder's (and the processor applies it)."""
    from lfm2audio.codec import MimiCodec, MimiConfig
    from lfm2audio.codec.int8 import quantize_decoder_int8

    proc_q = LFM2AudioProcessor.from_pretrained(checkpoint_dir, device="cpu", quantize="int4")
    assert isinstance(proc_q.mimi.decoder_transformer.layers[0].self_attn.in_projs[0], Int8Linear)
    # The LFM2.5 detokenizer's backbone too; its PCM stays close to the float one's.
    detok_q, detok = proc_q.audio_detokenizer, LFM2AudioProcessor.from_pretrained(checkpoint_dir).audio_detokenizer
    assert isinstance(detok_q.lfm.layers[0].feed_forward.w13, Int8Linear)  # w1 and w3 joined
    clip = torch.randint(0, 2048, (1, 8, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = detok.decode(clip), detok_q.decode(clip)
    assert 0 < ((a - b).norm() / a.norm()).item() < 0.1
    # A config whose first SEANet layers are large enough to be quantized (the golden one's are tiny).
    cfg = MimiConfig()
    cfg.transformer.num_layers = 1
    torch.manual_seed(0)
    ref = MimiCodec(cfg).eval()
    with torch.no_grad():
        for name, buf in ref.named_buffers():
            if name.endswith("embedding_sum"):
                buf.normal_()
    q = copy.deepcopy(ref)
    quantize_decoder_int8(q)
    convs = [m for m in q.decoder.modules() if getattr(m, "weight_matmul", None) is not None]
    assert len(convs) >= 2  # the first conv and the first transposed conv at least
    codes = torch.randint(0, 2048, (2, 8, 4), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        sa, sb = ref.decoder_state(2), q.decoder_state(2)
        for i in range(4):
            a, _ = ref.decode_step(codes[:, :, i], sa)
            b, _ = q.decode_step(codes[:, :, i], sb)
            rel = ((a - b).norm() / a.norm()).item()
            assert 0 < rel < 0.05, rel


def test_cli_quantize_flag():
    from lfm2audio.cli import build_parser

    args = build_parser().parse_args(["asr", "--quantize", "int4", "x.wav"])
    assert args.quantize == "int4"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["asr", "--quantize", "int3", "x.wav"])


def test_kernel_bench_quick_run_compares_every_kernel_with_float32(tmp_path):
    # bench/bench_quant_kernels.py: each kernel --quantize can use here runs, and its output is close to float32.
    out = tmp_path / "kernels.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_quant_kernels.py"
    cmd = [sys.executable, str(script), "--quick", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| threads | layer | rows |" in proc.stdout
    results = json.loads(out.read_text())["results"]
    worst: dict[str, float] = {}
    for r in results:
        assert r["ms"] > 0 and r["copies"] >= 1
        worst[r["kernel"]] = max(worst.get(r["kernel"], 0.0), r["rel_error"])
    expected = {"float32", "bfloat16", "int8wo", "int4"} | ({"w8a8"} if w8a8_available() else set())
    expected |= {"w4a8"} if w4a8.available() else set()
    assert set(worst) == expected
    assert worst["float32"] < 1e-6 and worst["bfloat16"] < 0.01
    assert worst["int8wo"] < 0.02 and worst.get("w8a8", 0.0) < 0.02
    assert 0.02 < worst["int4"] < 0.2  # ~0.1 for min/max int4 of a Gaussian weight: visibly coarser than int8


def test_joined_projections_bench_quick_run(checkpoint_dir, tmp_path):
    # bench/bench_joined_projections.py: both models load, the joined one has joined layers, every call is timed.
    out = tmp_path / "joined.json"
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_joined_projections.py"
    cmd = [sys.executable, str(script), "--model", str(checkpoint_dir), "--rounds", "4", "--threads", "1"]
    proc = subprocess.run(cmd + ["--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| depthformer frame |" in proc.stdout and "| backbone step |" in proc.stdout
    report = json.loads(out.read_text())
    assert report["joined_groups"] > 0
    for r in report["results"].values():
        assert len(r["samples_ms"]["joined"]) == len(r["samples_ms"]["separate"]) == 4 and r["ratio_median"] > 0
