"""pipecat's OpenAIRealtimeLLMService (which treats every error event but two as fatal) in a pipeline on the
server, with semantic_vad and input transcription: a first reply from the context, a voice turn, a
barge-in (pipecat truncates the reply on speech_started) and a text turn."""

from __future__ import annotations

import asyncio

from conftest import chunks, speech


def test_pipeline_voice_barge_in_and_text_turns(relay_factory):
    from pipecat.frames.frames import EndFrame, InputAudioRawFrame, LLMMessagesAppendFrame, LLMRunFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.aggregators.llm_context import LLMContext
    from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
    from pipecat.services.openai.realtime import events
    from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
    from pipecat.workers.runner import WorkerRunner

    async def go():
        async with relay_factory() as relay:
            props = events.SessionProperties(
                audio=events.AudioConfiguration(
                    input=events.AudioInput(
                        transcription=events.InputAudioTranscription(model="gpt-4o-transcribe"),
                        turn_detection=events.SemanticTurnDetection(eagerness="high"),
                    )
                )
            )
            llm = OpenAIRealtimeLLMService(
                api_key="sk-local",
                base_url=relay.url,
                settings=OpenAIRealtimeLLMService.Settings(session_properties=props),
            )
            context = LLMContext(messages=[{"role": "system", "content": "You are a helpful assistant."}])
            pair = LLMContextAggregatorPair(context)
            pipeline = Pipeline([pair.user(), llm, pair.assistant()])
            worker = PipelineWorker(
                pipeline, params=PipelineParams(audio_in_sample_rate=24_000), idle_timeout_secs=None
            )
            runner = WorkerRunner(handle_sigint=False)
            running = asyncio.create_task(runner.run(worker))

            async def say(text: str) -> None:
                for c in chunks(speech(text), ms=20):
                    await worker.queue_frame(InputAudioRawFrame(audio=c, sample_rate=24_000, num_channels=1))
                    await asyncio.sleep(0)

            try:
                await worker.queue_frames([LLMRunFrame()])
                await relay.wait_for("session.updated")
                await relay.wait_for("response.done")  # the reply to the initial context

                n = len(relay.received)
                await say("Hello, how are you today?")
                await relay.wait_for("response.done", after=n)
                t = await relay.wait_for("conversation.item.input_audio_transcription.completed", after=n)
                assert t["transcript"].strip()

                # Barge-in while a reply streams: the server cancels it, pipecat truncates it.
                n = len(relay.received)
                # Appended messages go to the service (the user aggregator keeps those it sees for itself).
                await llm.queue_frame(
                    LLMMessagesAppendFrame([{"role": "user", "content": "Tell me a long story."}], run_llm=True)
                )
                await relay.wait_for("response.output_audio.delta", after=n)
                await say("Stop please.")
                await relay.wait_for("input_audio_buffer.speech_started", after=n)
                await relay.wait_for("conversation.item.truncated", after=n)
                assert "conversation.item.truncate" in relay.sent_types()
                await relay.wait_for("response.done", count=2, after=n)

                n = len(relay.received)
                await llm.queue_frame(LLMMessagesAppendFrame([{"role": "user", "content": "Thank you."}], run_llm=True))
                done = await relay.wait_for("response.done", after=n)
                assert done["response"]["status"] in ("completed", "incomplete")
            finally:
                await worker.queue_frame(EndFrame())
                try:
                    await asyncio.wait_for(running, 20)
                except TimeoutError:
                    running.cancel()
            relay.assert_no_errors()

    asyncio.run(go())
