"""The OpenAI Agents SDK's realtime agent (agents.realtime, its default model settings: semantic_vad,
input transcription, pcm16) on the server: a voice turn, a barge-in with truncate, a text turn."""

from __future__ import annotations

import asyncio

from conftest import chunks, speech


def test_voice_turn_barge_in_and_text_turn(relay_factory):
    from agents.realtime import RealtimeAgent, RealtimeRunner

    async def go():
        async with relay_factory() as relay:
            agent = RealtimeAgent(name="assistant", instructions="You are a friendly assistant. Answer briefly.")
            runner = RealtimeRunner(agent)
            session = await runner.run(model_config={"url": relay.url, "api_key": "sk-local"})
            seen: list[str] = []

            async def events():
                async for ev in session:
                    seen.append(ev.type)

            async with session:
                reader = asyncio.create_task(events())
                updated = await relay.wait_for("session.updated")
                td = updated["session"]["audio"]["input"]["turn_detection"]
                assert td["type"] == "semantic_vad"
                assert updated["session"]["instructions"].startswith("You are a friendly assistant")

                # A voice turn: server VAD ends it, a reply follows, the user's words are transcribed.
                for c in chunks(speech("What is the weather like today?")):
                    await session.send_audio(c)
                await relay.wait_for("response.done")
                done_t = await relay.wait_for("conversation.item.input_audio_transcription.completed")
                assert done_t["transcript"].strip()

                # Barge-in: the user speaks while the next reply streams; the SDK truncates what was unheard.
                n = len(relay.received)
                await session.send_message("Tell me a long story about a dragon.")
                await relay.wait_for("response.output_audio.delta", after=n)
                for c in chunks(speech("Stop, wait a moment please.")):
                    await session.send_audio(c)
                await relay.wait_for("input_audio_buffer.speech_started", after=n)
                cancelled = await relay.wait_for("response.done", after=n)
                assert cancelled["response"]["status"] == "cancelled"
                await relay.wait_for("conversation.item.truncated", after=n)
                assert "conversation.item.truncate" in relay.sent_types()
                await relay.wait_for("response.done", count=2, after=n)  # the reply to the barge-in

                # A text turn.
                n = len(relay.received)
                await session.send_message("Thanks, bye.")
                done = await relay.wait_for("response.done", after=n)
                assert done["response"]["status"] in ("completed", "incomplete")
                await asyncio.sleep(0.3)
                reader.cancel()
            relay.assert_no_errors()
            assert "error" not in seen

    asyncio.run(go())
