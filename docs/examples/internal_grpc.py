"""An internal service calling inference_svc over gRPC streaming, as the edge does.

    CLOUDACH_API_KEY=ck-... python docs/examples/internal_grpc.py

1. Exchange an API key for a short-lived signed token (auth_svc's Authenticate); every call to
   inference_svc carries it as `authorization: Bearer <token>`.
2. Stream Generate: two choices, with log probs, guided to a JSON Schema. Events come as one
   Accepted (the prompt's tokens), TokenDelta per piece of text (`index` names the choice), one
   ChoiceFinished per choice, then Finished with the usage of all choices.
3. Cancel: cancelling the call stops the generation in the model.
4. A refused request fails with INVALID_ARGUMENT before Accepted; its status details say which
   field (google.rpc.BadRequest) and why (google.rpc.ErrorInfo).

Prints one JSON object per step.
"""

from __future__ import annotations

import asyncio
import json
import os

import grpc
from google.rpc import error_details_pb2, status_pb2

from cloudach.auth.v1 import auth_pb2, auth_pb2_grpc
from cloudach.inference.v1 import inference_pb2 as pb
from cloudach.inference.v1 import inference_pb2_grpc

AUTH = os.environ.get("CLOUDACH_AUTH_TARGET", "127.0.0.1:50052")
INFERENCE = os.environ.get("CLOUDACH_INFERENCE_TARGET", "127.0.0.1:50051")
MODEL = os.environ.get("CLOUDACH_MODEL", "smollm2-135m-instruct")
COLOUR = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 20}}, "required": ["colour"]}


def ask(text: str, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, messages=[pb.ChatMessage(role=pb.ROLE_USER, content=text)], **kw)


async def token(api_key: str) -> str:
    async with grpc.aio.insecure_channel(AUTH) as channel:
        reply = await auth_pb2_grpc.AuthServiceStub(channel).Authenticate(auth_pb2.AuthenticateRequest(api_key=api_key))
    return reply.token


async def generate(stub, metadata) -> dict:
    request = ask("Name a colour, as JSON.", n=2, logprobs=True, top_logprobs=2,
                  stopping=pb.StoppingCriteria(max_new_tokens=100), sampling=pb.SamplingParameters(seed=7),
                  guide=pb.Guide(type=pb.GUIDE_TYPE_JSON_SCHEMA, text=json.dumps(COLOUR)))
    texts: dict[int, str] = {}
    logprobs: dict[int, float] = {}
    result: dict = {"step": "generate"}
    async for event in stub.Generate(request, metadata=metadata, timeout=120):
        kind = event.WhichOneof("event")
        if kind == "accepted":
            result["prompt_tokens"] = event.accepted.prompt_tokens
        elif kind == "delta":
            d = event.delta
            texts[d.index] = texts.get(d.index, "") + d.text
            logprobs[d.index] = logprobs.get(d.index, 0.0) + sum(t.logprob for t in d.logprobs)
        elif kind == "choice_finished":
            result.setdefault("finish_reasons", {})[event.choice_finished.index] = \
                pb.FinishReason.Name(event.choice_finished.finish_reason)
        elif kind == "finished":
            result["usage"] = {"prompt_tokens": event.finished.usage.prompt_tokens,
                               "completion_tokens": event.finished.usage.completion_tokens}
    return {**result, "texts": texts, "logprobs": logprobs}


async def cancel(stub, metadata) -> dict:
    # Greedy: a sampled answer can end (a short reply) before the fifth delta.
    call = stub.Generate(ask("Count from 1 to 500.", stopping=pb.StoppingCriteria(max_new_tokens=1000),
                             sampling=pb.SamplingParameters(temperature=0)),
                         metadata=metadata, timeout=120)
    deltas = 0
    async for event in call:
        if event.HasField("delta"):
            deltas += 1
            if deltas == 5:
                call.cancel()  # the model stops within a token or two
                break
    return {"step": "cancel", "deltas": deltas, "status": (await call.code()).name}


async def refused(stub, metadata) -> dict:
    try:
        async for _ in stub.Generate(ask("Hi", n=99), metadata=metadata, timeout=30):
            pass
    except grpc.aio.AioRpcError as error:
        details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
        status = status_pb2.Status.FromString(details)
        found = {"step": "refused", "code": error.code().name, "message": error.details()}
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                found["field"] = bad.field_violations[0].field
            elif detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                found["reason"] = info.reason
        return found
    return {"step": "refused", "code": "OK"}


async def main() -> None:
    metadata = (("authorization", f"Bearer {await token(os.environ['CLOUDACH_API_KEY'])}"),)
    async with grpc.aio.insecure_channel(INFERENCE) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for step in (generate, cancel, refused):
            print(json.dumps(await step(stub, metadata)), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
