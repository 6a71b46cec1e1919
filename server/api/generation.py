"""GenerationService (gRPC): hand the request to the shared core, relay its events as responses.

Validation, submission, deadlines, metrics and the log line live in ``server.api.core`` (the
same path HTTP requests take); this module only maps core events and errors onto the proto.
Thread domain: the grpc.aio event loop.
"""

from __future__ import annotations

import asyncio

from adapterserve.v1 import adapterserve_pb2 as pb
from adapterserve.v1 import adapterserve_pb2_grpc as pb_grpc
from server.api.core import GenerationCore, GenerationError
from server.engine.request import FinishEvent, TokenEvent


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    def __init__(self, core: GenerationCore, model_info: pb.ModelInfo):
        self.core = core
        self.model_info = model_info

    async def GetModelInfo(self, request, context):
        return self.model_info

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        out = pb.GenerateResponse(adapter_id=request.adapter_id)
        async for event, request_id in self._run(request, context):
            if isinstance(event, TokenEvent):
                out.text += event.text
                out.token_ids.extend(event.token_ids)
                out.logprobs.extend(await self._logprobs(event))
            else:
                out.finish_reason = pb.FinishReason.Value(event.reason.value)
                out.usage.CopyFrom(pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens))
                out.timings.CopyFrom(_timings(event))
                out.request_id = request_id
        return out

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        async for event, request_id in self._run(request, context):
            if isinstance(event, TokenEvent):
                yield pb.GenerateStreamResponse(
                    text=event.text, token_ids=event.token_ids, logprobs=await self._logprobs(event),
                    request_id=request_id, adapter_id=request.adapter_id)
            else:
                yield pb.GenerateStreamResponse(
                    finish_reason=pb.FinishReason.Value(event.reason.value),
                    usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
                    timings=_timings(event), request_id=request_id, adapter_id=request.adapter_id)

    async def _run(self, request: pb.GenerateRequest, context):
        """Yield (event, request_id) pairs; abort the call with the core's status on failure."""
        gen = None
        try:
            gen = await self.core.start(request, api="grpc", timeout_s=context.time_remaining())
            async for event in gen.events():
                yield event, gen.request_id
        except GenerationError as e:
            await context.abort(e.code, e.message)
        finally:
            if gen is not None:
                gen.cancel()  # a no-op once finished; else the call went away mid-stream

    async def _logprobs(self, event: TokenEvent) -> list[pb.TokenLogprob]:
        """Logprob messages with each token's text, named on the core's text pool (not the event loop)."""
        if not event.logprobs:
            return []
        return await asyncio.get_running_loop().run_in_executor(self.core.text_pool, self._logprob_messages, event)

    def _logprob_messages(self, event: TokenEvent) -> list[pb.TokenLogprob]:
        tok = self.core.tokenizer.token_text
        return [
            pb.TokenLogprob(token_id=lp.token_id, token=tok(lp.token_id), logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, token=tok(t), logprob=v) for t, v in lp.top])
            for lp in event.logprobs
        ]


def _timings(ev: FinishEvent) -> pb.Timings:
    return pb.Timings(queue_ms=ev.queue_s * 1000, time_to_first_token_ms=(ev.ttft_s or 0.0) * 1000,
                      total_ms=ev.total_s * 1000)
