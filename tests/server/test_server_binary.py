"""Binary WebSocket audio, both ways: raw PCM16 and Opus (length-prefixed raw packets)."""

from __future__ import annotations

import numpy as np
from rt_client import Client, run, setup, synthetic_speech, tone

from lfm2audio_server.audio import (
    FORMAT_OPUS,
    FORMAT_PCM16,
    HEADER_SIZE,
    OpusFrameEncoder,
    OpusPacketDecoder,
    pack_packets,
    unpack_frame,
    unpack_packets,
)


async def _collect_frames(c: Client) -> tuple[dict, list[tuple[int, int, int, bytes]]]:
    done = await c.wait_for("response.done")
    return done, [unpack_frame(b) for b in c.binary]


def test_binary_pcm16_in_and_out(server):
    async def go():
        async with await Client.connect(server.url) as c:
            upd = await setup(
                c,
                max_output_tokens=40,
                lfm2audio={"binary_input": {"format": "pcm16", "rate": 16000}, "binary_output": {"format": "pcm16"}},
            )
            assert upd["session"]["lfm2audio"]["binary_input"] == {"format": "pcm16", "rate": 16000}
            x = (tone(1.0, 16_000) * 32767).astype("<i2")
            for i in range(0, len(x), 1600):
                await c.send_raw(x[i : i + 1600].tobytes())
            await c.send("input_audio_buffer.commit")
            await c.wait_for("input_audio_buffer.committed")
            await c.send("response.create")
            created = await c.wait_for("response.created")
            index = created["response"]["lfm2audio"]["response_index"]
            done, frames = await _collect_frames(c)
            assert frames, "no binary audio frames"
            assert not c.of("response.output_audio.delta")  # binary replaces the JSON deltas
            assert c.of("response.output_audio_transcript.delta")  # text stays JSON
            assert [f[2] for f in frames] == list(range(len(frames)))
            for fmt, resp_index, _, payload in frames:
                assert fmt == FORMAT_PCM16 and resp_index == index and len(payload) == 3840
            assert done["response"]["usage"]["output_token_details"]["audio_tokens"] == len(frames)
            assert len(c.binary[0]) == HEADER_SIZE + 3840

    run(go())


def test_binary_opus_in_and_out(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await setup(
                c,
                max_output_tokens=40,
                lfm2audio={"binary_input": {"format": "opus"}, "binary_output": {"format": "opus"}},
            )
            # A browser would send WebCodecs packets; here sphn encodes 24 kHz speech into 40 ms packets.
            enc = OpusFrameEncoder(24_000)
            speech = synthetic_speech(1.0, 24_000)
            for i in range(0, len(speech) - 1919, 1920):
                packets = enc.encode(speech[i : i + 1920])
                if packets:
                    await c.send_raw(pack_packets(packets))
            await c.send("input_audio_buffer.commit")
            await c.wait_for("input_audio_buffer.committed")
            await c.send("response.create")
            done, frames = await _collect_frames(c)
            assert frames and all(f[0] == FORMAT_OPUS for f in frames)
            dec = OpusPacketDecoder(24_000)
            total = 0
            for _, _, _, payload in frames:
                packets = unpack_packets(payload)
                assert 1 <= len(packets) <= 3
                total += len(dec.decode(packets))
            # Every frame decodes to about 80 ms of 24 kHz audio.
            assert abs(total - 1920 * len(frames)) <= 1920
            assert done["response"]["status"] in ("completed", "incomplete")
            # The input went through: the user turn had audio positions.
            assert done["response"]["usage"]["input_tokens"] > 20

    run(go())


def test_binary_before_declared_then_switch_back_to_json(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await setup(c, max_output_tokens=8)
            await c.send_raw(np.zeros(320, "<i2").tobytes())
            err = await c.wait_for("error")
            assert err["error"]["code"] == "binary_audio_not_configured"
            # Declare, then undeclare: binary is refused again, JSON audio still works.
            await setup(c, lfm2audio={"binary_input": {"format": "pcm16"}})
            await c.send_raw(np.zeros(320, "<i2").tobytes())
            await setup(c, lfm2audio={"binary_input": None, "binary_output": None})
            await c.send_raw(np.zeros(320, "<i2").tobytes())
            err = await c.wait_for("error")
            assert err["error"]["code"] == "binary_audio_not_configured"
            await c.send("input_audio_buffer.commit")  # the 20 ms sent while declared are there
            await c.wait_for("input_audio_buffer.committed")
            await c.send("response.create")
            await c.wait_for("response.done")
            assert c.of("response.output_audio.delta") and not c.binary

    run(go())
