"""Mimi codec: golden parity (tiny checkpoint), streaming equivalence, batched streams, loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from golden_chat import assert_close_golden
from safetensors.torch import load_file, save_file

from lfm2audio.codec import MimiCheckpointError, MimiCodec, MimiConfig, MimiDecoderState, MimiEncoderState, load_mimi

MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
FS = 1920
# Streaming vs whole clip, batched vs alone: the same arithmetic up to float32 rounding.
ATOL, RTOL = 1e-5, 1e-4


@pytest.fixture(scope="module")
def tiny_config(checkpoint_dir: Path) -> MimiConfig:
    return MimiConfig.from_json(checkpoint_dir / "mimi_config.json")


@pytest.fixture(scope="module")
def codec(checkpoint_dir: Path, tiny_config: MimiConfig) -> MimiCodec:
    return load_mimi(checkpoint_dir / MIMI_FILE, tiny_config)


def random_codec(tiny_config: MimiConfig, context: int, seed: int = 0) -> MimiCodec:
    """Tiny Mimi with random weights and a short attention context, so that the KV window
    wraps after a few frames; layer scales raised so that the transformer matters."""
    cfg = MimiConfig.from_dict(tiny_config.to_dict())
    cfg.transformer.context = context
    torch.manual_seed(seed)
    model = MimiCodec(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_scale" in name:
                p.fill_(0.5)
        for name, b in model.named_buffers():
            if name.endswith("embedding_sum"):
                b.normal_()
    return model


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# Golden parity ------------------------------------------------------------------------------


def test_decode_golden(codec: MimiCodec, golden: dict, golden_index: dict) -> None:
    wav = codec.decode(golden["mimi.decode.codes"])
    assert_close_golden(wav, "mimi.decode.wave", golden, golden_index)


def test_stream_decode_golden(codec: MimiCodec, golden: dict, golden_index: dict) -> None:
    codes = golden["mimi.decode.codes"]
    state = codec.decoder_state(1)
    frames = []
    for t in range(codes.shape[-1]):
        pcm, state = codec.decode_step(codes[:, :, t], state)
        assert pcm.shape == (1, FS)
        frames.append(pcm)
    assert_close_golden(torch.cat(frames, dim=-1)[:, None], "mimi.stream.wave", golden, golden_index)


def test_encode_golden(codec: MimiCodec, golden: dict, golden_index: dict) -> None:
    wav = golden["mimi.encode.wave"]
    assert_close_golden(codec.encode_to_latent(wav), "mimi.encode.latent", golden, golden_index)
    assert_close_golden(codec.encode(wav), "mimi.encode.codes", golden, golden_index)


def test_stream_encode_matches_golden_and_clip(codec: MimiCodec, golden: dict) -> None:
    wav = golden["mimi.encode.wave"]
    state = codec.encoder_state(1)
    codes = []
    for t in range(wav.shape[-1] // FS):
        c, state = codec.encode_step(wav[:, 0, t * FS : (t + 1) * FS], state)
        assert c.shape == (1, 8)
        codes.append(c)
    assert torch.equal(torch.stack(codes, dim=-1), golden["mimi.encode.codes"])


def test_encode_pads_partial_frame(codec: MimiCodec, golden: dict) -> None:
    wav = golden["mimi.encode.wave"][..., : 10 * FS + 7]
    padded = torch.nn.functional.pad(wav, (0, FS - 7))
    codes = codec.encode(wav)
    assert codes.shape == (1, 8, 11)
    assert torch.equal(codes, codec.encode(padded))


def direct_transformer(tr: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Whole-sequence transformer written out from moshi's definitions, independent of the
    implementation under test: query t attends to keys t-context+1 .. t, RoPE on interleaved pairs."""
    cfg = tr.cfg
    B, T, C = x.shape
    H, D = cfg.num_heads, cfg.d_model // cfg.num_heads
    freqs = torch.exp(torch.arange(D // 2, dtype=torch.float32) * (-math.log(cfg.max_period) * 2 / D))
    angles = torch.arange(T, dtype=torch.float32)[:, None] * freqs
    cos, sin = angles.cos(), angles.sin()

    def rope(t: torch.Tensor) -> torch.Tensor:
        a, b = t.unflatten(-1, (D // 2, 2)).unbind(-1)
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

    delta = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    allowed = (delta >= 0) & (delta < cfg.context)
    for layer in tr.transformer.layers:
        h = torch.nn.functional.layer_norm(x, (C,), layer.norm1.weight, layer.norm1.bias, 1e-5)
        q, k, v = (h @ layer.self_attn.in_projs[0].weight.t()).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        att = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(D)
        att = att.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        o = (att @ v).transpose(1, 2).reshape(B, T, C) @ layer.self_attn.out_projs[0].weight.t()
        x = x + layer.layer_scale_1.scale * o
        h = torch.nn.functional.layer_norm(x, (C,), layer.norm2.weight, layer.norm2.bias, 1e-5)
        ff = torch.nn.functional.gelu(h @ layer.linear1.weight.t()) @ layer.linear2.weight.t()
        x = x + layer.layer_scale_2.scale * ff
    return x


@pytest.mark.parametrize("context,steps", [(3, 12), (250, 300)])
def test_transformer_matches_direct_formula(tiny_config: MimiConfig, context: int, steps: int) -> None:
    """The windowed, incremental transformer equals the plain formula, in one call or two steps at a time."""
    tr = random_codec(tiny_config, context=context).decoder_transformer
    x = torch.randn(2, steps, tiny_config.transformer.d_model, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = direct_transformer(tr, x)
        close(tr.step(x, tr.stream_state(2, steps, x.device, x.dtype)), want)
        state = tr.stream_state(2, 2, x.device, x.dtype)
        close(torch.cat([tr.step(x[:, t : t + 2], state) for t in range(0, steps, 2)], dim=1), want)


# Batched streams -------------------------------------------------------------------------------


def test_batched_streams_with_resets_equal_alone(codec: MimiCodec) -> None:
    """4 rows of one state; each row runs streams started at different frames (reset_rows),
    row 2 restarts mid-way; every stream equals the same codes decoded alone."""
    g = torch.Generator().manual_seed(7)
    n_frames = 14
    starts = {0: [0], 1: [3], 2: [2, 8], 3: [5]}  # row -> frames where a new stream starts
    garbage = torch.randint(0, 2048, (4, 8, n_frames), generator=g)  # fed to rows before their start
    streams = {}  # (row, start) -> codes of that stream
    for row, ss in starts.items():
        bounds = [*ss, n_frames]
        for a, b in zip(bounds, bounds[1:], strict=False):
            streams[(row, a)] = torch.randint(0, 2048, (8, b - a), generator=g)

    state = codec.decoder_state(4)
    out = torch.zeros(4, n_frames * FS)
    current = {}
    for t in range(n_frames):
        new_rows = [row for row, ss in starts.items() if t in ss]
        if new_rows:
            state.reset_rows(new_rows)
            current.update({row: t for row in new_rows})
        codes = garbage[:, :, t].clone()
        for row, start in current.items():
            codes[row] = streams[(row, start)][:, t - start]
        pcm, state = codec.decode_step(codes, state)
        out[:, t * FS : (t + 1) * FS] = pcm

    for (row, start), codes in streams.items():
        alone = codec.decode(codes[None])[0, 0]
        close(out[row, start * FS : (start + codes.shape[1]) * FS], alone)


def test_state_select_and_cat(codec: MimiCodec) -> None:
    """Compacting rows (a stream ends) and appending a fresh row keep every stream intact."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 2048, (3, 8, 9), generator=g)
    late = torch.randint(0, 2048, (1, 8, 5), generator=g)
    state = codec.decoder_state(3)
    outs = [[] for _ in range(3)]
    for t in range(4):
        pcm, state = codec.decode_step(codes[:, :, t], state)
        for r in range(3):
            outs[r].append(pcm[r])
    # Row 1 finishes: keep rows 0 and 2; then a new stream joins as a third row.
    state = state.select([0, 2])
    assert isinstance(state, MimiDecoderState) and state.batch_size == 2
    state = MimiDecoderState.cat([state, codec.decoder_state(1)])
    late_out = []
    for t in range(4, 9):
        step_codes = torch.stack([codes[0, :, t], codes[2, :, t], late[0, :, t - 4]])
        pcm, state = codec.decode_step(step_codes, state)
        outs[0].append(pcm[0])
        outs[2].append(pcm[1])
        late_out.append(pcm[2])
    for r in (0, 2):
        close(torch.cat(outs[r]), codec.decode(codes[r : r + 1])[0, 0])
    close(torch.cat(late_out), codec.decode(late)[0, 0])


def test_long_stream_past_context(codec: MimiCodec) -> None:
    """140 frames = 280 transformer steps > context 250: frame-by-frame still equals the whole clip."""
    codes = torch.randint(0, 2048, (1, 8, 140), generator=torch.Generator().manual_seed(13))
    state = codec.decoder_state(1)
    stream = torch.cat([codec.decode_step(codes[:, :, t], state)[0] for t in range(codes.shape[-1])], dim=-1)
    close(stream, codec.decode(codes)[:, 0])


def test_step_subset_of_rows(tiny_config: MimiConfig) -> None:
    """Rows without a frame this step can sit out: step a sub-batch, write it back."""
    model = random_codec(tiny_config, context=3, seed=2)
    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 2048, (3, 8, 10), generator=g)
    state = model.decoder_state(3)
    pos = [0, 0, 0]
    outs: list[list[torch.Tensor]] = [[], [], []]
    schedule = [[0, 1, 2], [0, 2], [1], [0, 1, 2], [2], [0, 1], [0, 1, 2], [1, 2], [0, 1, 2], [0, 1, 2], [0, 2]]
    for rows in schedule:
        sub = state.select(rows)
        step_codes = torch.stack([codes[r, :, pos[r]] for r in rows])
        pcm, sub = model.decode_step(step_codes, sub)
        state.assign_rows(rows, sub)
        for j, r in enumerate(rows):
            outs[r].append(pcm[j])
            pos[r] += 1
    for r in range(3):
        close(torch.cat(outs[r]), model.decode(codes[r : r + 1, :, : pos[r]])[0, 0])


def test_window_wraps_rows_at_different_positions(tiny_config: MimiConfig) -> None:
    """Attention context of 3 steps (the KV window wraps every 2 frames), streams started at
    different frames, decode_step and multi-frame decode_chunk: all equal the whole clip."""
    model = random_codec(tiny_config, context=3)
    g = torch.Generator().manual_seed(5)
    n = 12
    codes = torch.randint(0, 2048, (3, 8, n), generator=g)
    whole = model.decode(codes)[:, 0]
    for r in range(3):  # batched whole clip == each row alone
        close(whole[r], model.decode(codes[r : r + 1])[0, 0])

    starts = [0, 1, 4]
    state = model.decoder_state(3)
    out = torch.zeros(3, n * FS)
    for t in range(n + max(starts)):
        step_codes = torch.zeros(3, 8, dtype=torch.long)
        for r, s in enumerate(starts):
            if t == s:
                state.reset_rows(torch.arange(3) == r)  # bool mask form
            if s <= t < s + n:
                step_codes[r] = codes[r, :, t - s]
        pcm, state = model.decode_step(step_codes, state)
        for r, s in enumerate(starts):
            if s <= t < s + n:
                out[r, (t - s) * FS : (t - s + 1) * FS] = pcm[r]
    close(out, whole)

    # Chunks larger than the state was sized for are split internally.
    state = model.decoder_state(3)
    parts = [model.decode_chunk(codes[:, :, a : a + 5], state)[0] for a in range(0, n, 5)]
    close(torch.cat(parts, dim=1), whole)


def test_streaming_encode_batched_rows(tiny_config: MimiConfig) -> None:
    """Streaming encode of rows started at different frames equals whole-clip encode (latent
    close, codes exact), with a context short enough for the window to wrap."""
    model = random_codec(tiny_config, context=3, seed=1)
    g = torch.Generator().manual_seed(11)
    n = 8
    wav = 0.3 * torch.randn(3, 1, n * FS, generator=g)
    ref_latent = model.encode_to_latent(wav)
    ref_codes = model.encode(wav)
    starts = [0, 2, 3]
    state = model.encoder_state(3)
    assert isinstance(state, MimiEncoderState)
    latent = torch.zeros_like(ref_latent)
    codes = torch.zeros_like(ref_codes)
    for t in range(n + max(starts)):
        frame = 0.3 * torch.randn(3, FS, generator=g)  # noise for rows not (yet) streaming
        for r, s in enumerate(starts):
            if t == s:
                state.reset_rows([r])
            if s <= t < s + n:
                frame[r] = wav[r, 0, (t - s) * FS : (t - s + 1) * FS]
        emb, _ = model.encode_latent_chunk(frame, state)
        c = model.quantizer.encode(emb)[:, :, 0]
        for r, s in enumerate(starts):
            if s <= t < s + n:
                latent[r, :, t - s] = emb[r, 0]
                codes[r, :, t - s] = c[r]
    close(latent, ref_latent)
    assert torch.equal(codes, ref_codes)
    # encode_step on the same audio, one row at a time, gives the same codes.
    state = model.encoder_state(1)
    step_codes = [model.encode_step(wav[:1, 0, t * FS : (t + 1) * FS], state)[0] for t in range(n)]
    assert torch.equal(torch.stack(step_codes, dim=-1), ref_codes[:1])


# Loading and structure -------------------------------------------------------------------------


def test_bad_checkpoint_is_reported(tmp_path: Path, checkpoint_dir: Path, tiny_config: MimiConfig) -> None:
    state = load_file(str(checkpoint_dir / MIMI_FILE))
    missing = "decoder.model.14.conv.conv.bias"
    misshaped = "quantizer.rvq_first.input_proj.weight"
    del state[missing]
    state[misshaped] = torch.zeros(3, 3, 1)
    state["extra.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    with pytest.raises(MimiCheckpointError) as err:
        load_mimi(bad, tiny_config)
    msg = str(err.value)
    assert missing in msg and misshaped in msg and "extra.weight" in msg
    assert "missing" in msg and "unexpected" in msg and "mis-shaped" in msg
    # The tiny file does not fit the official sizes either.
    with pytest.raises(MimiCheckpointError):
        load_mimi(checkpoint_dir / MIMI_FILE)


def test_official_config_matches_manifest(golden_dir: Path) -> None:
    manifest = json.loads((golden_dir / "manifest" / "mimi_state_dict.json").read_text())
    with torch.device("meta"):  # shapes only, no memory
        model = MimiCodec(MimiConfig())
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    want = [(t["name"], t["shape"], t["dtype"]) for t in manifest["tensors"]]
    assert got == want
    assert MimiConfig.from_json(golden_dir / "manifest" / "mimi_config_full.json") == MimiConfig()


def test_tiny_config_from_json(tiny_config: MimiConfig) -> None:
    assert tiny_config.seanet.dimension == 32 and tiny_config.seanet.n_filters == 4
    assert tiny_config.transformer.num_layers == 2 and tiny_config.transformer.num_heads == 4
    assert tiny_config.quantizer.dimension == 8 and tiny_config.quantizer.n_q == 32
    assert tiny_config.frame_size == FS and tiny_config.resample_stride == 2


def test_invalid_codes_are_rejected(codec: MimiCodec) -> None:
    codes = torch.zeros(1, 8, dtype=torch.long)
    codes[0, 3] = 2048  # end-of-audio code
    with pytest.raises(ValueError, match="codes must lie"):
        codec.decode_step(codes, codec.decoder_state(1))
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(1, 9, 2, dtype=torch.long))  # more codebooks than active


def test_codebook_cache_follows_weights(codec: MimiCodec, golden: dict) -> None:
    """Editing codebook statistics in place (or reloading) is picked up by decode."""
    codes = golden["mimi.decode.codes"][:, :, :3]
    before = codec.decode_latent(codes)
    book = codec.quantizer.rvq_first.vq.layers[0]._codebook
    saved = book.embedding_sum.clone()
    try:
        with torch.no_grad():
            book.embedding_sum.mul_(2.0)
        assert not torch.allclose(codec.decode_latent(codes), before)
    finally:
        with torch.no_grad():
            book.embedding_sum.copy_(saved)
    close(codec.decode_latent(codes), before)


def test_loads_and_decodes_inside_inference_mode(checkpoint_dir, golden):
    """A codec first loaded under torch.inference_mode (as a server does) still decodes."""
    from lfm2audio.codec import MimiConfig, load_mimi

    with torch.inference_mode():
        codec = load_mimi(
            checkpoint_dir / "tokenizer-e351c8d8-checkpoint125.safetensors",
            config=MimiConfig.from_json(checkpoint_dir / "mimi_config.json"),
        )
        wave = codec.decode(golden["mimi.decode.codes"])
    torch.testing.assert_close(wave, golden["mimi.decode.wave"], atol=1e-5, rtol=1e-4)
