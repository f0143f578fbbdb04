"""Golden-data helpers: tolerance checks, and ChatStates built exactly as the golden generator did."""

from __future__ import annotations

import torch

from lfm2audio import ChatState, LFM2AudioProcessor

SYSTEM = {
    "asr": "Perform ASR.",
    "chat": "Respond with interleaved text and audio.",
    "tts": "Perform TTS.\nUse the following voice: a calm female voice with clear diction.",
}
TTS_TEXT = "The quick brown fox jumps over the lazy dog."
TURN2_TEXT = "My business specialized in chairs, can you give me something related to that?"
INPUT_NAMES = ["text", "audio_in", "audio_in_lens", "audio_out", "modality_flag"]


def build_state(proc: LFM2AudioProcessor, kind: str, wave: torch.Tensor, *, keep_cache: bool = True) -> ChatState:
    chat = ChatState(proc, keep_cache=keep_cache)
    chat.new_turn("system")
    chat.add_text(SYSTEM[kind])
    chat.end_turn()
    chat.new_turn("user")
    if kind == "tts":
        chat.add_text(TTS_TEXT)
    else:
        chat.add_audio(wave, 16_000)
    chat.end_turn()
    chat.new_turn("assistant")
    return chat


def as_steps(tokens: list[torch.Tensor]) -> torch.Tensor:
    """Yielded tensors as the golden (n, 8) layout: text in column 0 with -1 elsewhere."""
    rows = []
    for t in tokens:
        row = torch.full((8,), -1, dtype=torch.long)
        row[: t.numel()] = t.reshape(-1).cpu()
        rows.append(row)
    return torch.stack(rows) if rows else torch.empty((0, 8), dtype=torch.long)


def assert_close_golden(actual: torch.Tensor, name: str, golden: dict, index: dict) -> None:
    """Compare with golden tensor ``name`` under the tolerance index.json gives it."""
    expected = golden[name]
    actual = actual.detach().cpu()
    tol = index["tensors"][name]["tolerance"]
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    if tol == "exact":
        assert actual.dtype == expected.dtype or not expected.is_floating_point(), f"{name}: dtype {actual.dtype}"
        if expected.dtype == torch.bfloat16 and name.endswith(".audio_in"):
            _assert_bf16_mel_equal(actual, name, golden, index)
            return
        assert torch.equal(actual.to(expected.dtype), expected), f"{name}: not exactly equal"
        return
    a = actual.detach().to(torch.float64)
    e = expected.to(torch.float64)
    err = (a - e).abs()
    bound = tol["atol"] + tol["rtol"] * e.abs()
    worst = (err - bound).max().item()
    assert worst <= 0, f"{name}: max abs err {err.max().item():.3e} exceeds atol {tol['atol']} (+rtol)"


def _assert_bf16_mel_equal(actual: torch.Tensor, name: str, golden: dict, index: dict) -> None:
    """The bf16-rounded mel of a ChatState equals the golden one, up to what the CPU's float32 noise decides.

    The golden marks these tensors exact, but they are float32 mel features
    rounded to bfloat16, and the float32 features themselves depend on the
    CPU's FFT kernels (index.json records the reference's own float32-vs-float64
    discrepancy). On a CPU whose kernels differ from the golden machine's, a
    value within that noise of a bf16 rounding point rounds differently. Such an
    element is accepted only when it is the bf16 rounding of a value within 20x
    the reference's float32 discrepancy (the golden's own tolerance rule) of the
    golden float32 feature; every other element must be bit-identical.
    """
    expected = golden[name]
    actual = actual.to(expected.dtype).cpu()
    diff = actual != expected
    if not diff.any():
        return
    mel = golden["mel.features"][0]
    assert mel.shape == expected.shape, f"{name}: no float32 features of the same audio to judge ties"
    noise = 20 * index["tensors"]["mel.features"]["fp32_vs_fp64"]["max_abs"]
    a, m = actual.float()[diff], mel[diff]
    half_ulp = torch.finfo(torch.bfloat16).eps * m.abs()  # bf16 spacing / 2 is eps/2 * |x|; doubled for safety
    bad = (a - m).abs() > noise + half_ulp
    assert not bad.any(), f"{name}: {int(bad.sum())} of {int(diff.sum())} differing values exceed float32 noise"
