"""LiveKit Agents with livekit-plugins-openai's RealtimeModel (its defaults: semantic_vad, input
transcription) on the server: AgentSession.run text turns (response.created matched by
metadata.client_event_id) on an agent whose chat context holds system and assistant messages, and, on the
plugin's realtime session, a voice turn with transcription and a barge-in followed by truncate."""

from __future__ import annotations

import asyncio

from conftest import chunks, speech


def _frames(pcm: bytes):
    from livekit import rtc

    return [rtc.AudioFrame(c, 24_000, 1, len(c) // 2) for c in chunks(pcm, ms=20)]


def test_agent_session_run_text_turns(relay_factory):
    from livekit.agents import Agent, AgentSession, ChatContext
    from livekit.plugins import openai as lk_openai

    async def go():
        async with relay_factory() as relay:
            model = lk_openai.realtime.RealtimeModel(base_url=relay.url.replace("/realtime", ""), api_key="sk-local")
            ctx = ChatContext()
            ctx.add_message(role="system", content="The user's name is Ada.")
            ctx.add_message(role="user", content="Hi, I am Ada.")
            ctx.add_message(role="assistant", content="Hello Ada!")
            agent = Agent(instructions="You are a helpful voice assistant.", chat_ctx=ctx)
            async with AgentSession(llm=model) as session:
                await session.start(agent)
                result = await session.run(user_input="What is my name?")
                assert result.events, "AgentSession.run returned no events"
                created = relay.of("response.created")
                assert created and created[-1]["response"]["metadata"]["client_event_id"].startswith("response_create")
                await session.run(user_input="And what did you say?")
            await model.aclose()
            sent = relay.sent_types()
            assert sent.count("conversation.item.create") >= 3  # the chat context: system, user, assistant
            roles = [e["item"].get("role") for e in relay.sent if e.get("type") == "conversation.item.create"]
            assert {"system", "assistant", "user"} <= set(roles)
            relay.assert_no_errors()

    asyncio.run(go())


def test_realtime_session_voice_turn_barge_in_truncate(relay_factory):
    from livekit.plugins import openai as lk_openai

    async def go():
        async with relay_factory() as relay:
            model = lk_openai.realtime.RealtimeModel(base_url=relay.url.replace("/realtime", ""), api_key="sk-local")
            rt = model.session()
            transcripts, generations, errors = [], [], []
            rt.on("input_audio_transcription_completed", lambda ev: transcripts.append(ev))
            rt.on("generation_created", lambda ev: generations.append(ev))
            rt.on("error", lambda ev: errors.append(ev))
            await rt.update_instructions("You are a helpful voice assistant.")
            await relay.wait_for("session.updated")
            for f in _frames(speech("Can you hear me?")):
                rt.push_audio(f)
            await relay.wait_for("response.done")
            await relay.wait_for("conversation.item.input_audio_transcription.completed")
            assert transcripts and transcripts[0].transcript.strip()
            assert generations

            # Barge-in while the next reply streams; LiveKit's agent then truncates the reply to what played.
            n = len(relay.received)
            rt.generate_reply(instructions="Tell a long story.")
            delta = await relay.wait_for("response.output_audio.delta", after=n)
            for f in _frames(speech("Wait, stop.")):
                rt.push_audio(f)
            await relay.wait_for("input_audio_buffer.speech_started", after=n)
            done = await relay.wait_for("response.done", after=n)
            assert done["response"]["status"] == "cancelled"
            rt.truncate(message_id=delta["item_id"], modalities=["audio"], audio_end_ms=160)
            t = await relay.wait_for("conversation.item.truncated", after=n)
            assert t["item_id"] == delta["item_id"] and t["audio_end_ms"] == 160
            await relay.wait_for("response.done", count=2, after=n)
            await rt.aclose()
            await model.aclose()
            assert errors == []
            relay.assert_no_errors()

    asyncio.run(go())
