"""plan_generation's validation and stream_generation's events, over the fake engine."""

import asyncio

import pytest

from cloudach.errors import InvalidArgument, NotFound, Unavailable
from cloudach.inference.v1 import inference_pb2 as pb
from inference_svc.generation import plan_generation, stream_generation
from tests.fakes import FakeEngine

MODEL = "smollm2-135m-instruct"


def request(**kw) -> pb.GenerateRequest:
    kw.setdefault("model", MODEL)
    kw.setdefault("messages", [pb.ChatMessage(role=pb.ROLE_USER, content="Hi")])
    return pb.GenerateRequest(**kw)


@pytest.mark.parametrize(
    "fields, param",
    [
        (dict(model=""), "model"),
        (dict(messages=[]), "messages"),
        (dict(messages=[pb.ChatMessage(role=pb.ROLE_UNSPECIFIED, content="x")]), "messages[0].role"),
        (dict(sampling=pb.SamplingParameters(temperature=2.5)), "sampling.temperature"),
        (dict(sampling=pb.SamplingParameters(temperature=float("nan"))), "sampling.temperature"),
        (dict(sampling=pb.SamplingParameters(top_p=1.5)), "sampling.top_p"),
        (dict(sampling=pb.SamplingParameters(presence_penalty=-3)), "sampling.presence_penalty"),
        (dict(sampling=pb.SamplingParameters(frequency_penalty=2.5)), "sampling.frequency_penalty"),
        (dict(stopping=pb.StoppingCriteria(max_new_tokens=0)), "stopping.max_new_tokens"),
        (dict(stopping=pb.StoppingCriteria(max_new_tokens=100_000)), "stopping.max_new_tokens"),
        (dict(stopping=pb.StoppingCriteria(stop_sequences=["a", "b", "c", "d", "e"])), "stopping.stop_sequences"),
        (dict(stopping=pb.StoppingCriteria(stop_sequences=["ok", ""])), "stopping.stop_sequences[1]"),
        (dict(request_id="x" * 200), "request_id"),
        (dict(sampling=pb.SamplingParameters(logit_bias={49152: 1.0})), "sampling.logit_bias"),  # past the vocabulary
        (dict(sampling=pb.SamplingParameters(logit_bias={5: 101.0})), "sampling.logit_bias"),
        (dict(sampling=pb.SamplingParameters(logit_bias={i: 1.0 for i in range(1025)})), "sampling.logit_bias"),
    ],
)
def test_invalid_requests_name_the_offending_field(registry, fields, param):
    with pytest.raises(InvalidArgument) as raised:
        plan_generation(request(**fields), registry)
    assert raised.value.param == param


def test_the_logit_bias_reaches_the_engine_as_pairs_by_token_id(registry):
    sampling = pb.SamplingParameters(logit_bias={900: -100.0, 12: 2.5})
    assert plan_generation(request(sampling=sampling), registry).engine_request.logit_bias == ((12, 2.5), (900, -100.0))
    assert plan_generation(request(), registry).engine_request.logit_bias == ()


def test_an_unknown_model_is_not_found(registry):
    with pytest.raises(NotFound) as raised:
        plan_generation(request(model="gpt-9"), registry)
    assert raised.value.code == "model_not_found" and raised.value.param == "model"


def test_prompt_plus_max_tokens_beyond_the_context_window_is_refused(registry):
    long = pb.ChatMessage(role=pb.ROLE_USER, content="word " * 1900)
    with pytest.raises(InvalidArgument) as raised:
        plan_generation(request(messages=[long], stopping=pb.StoppingCriteria(max_new_tokens=500)), registry)
    assert raised.value.param == "messages" and raised.value.code == "context_length_exceeded"
    assert "maximum context length is 2048 tokens" in raised.value.message


def test_without_max_tokens_the_default_is_bounded_by_the_room_left(registry):
    long = pb.ChatMessage(role=pb.ROLE_USER, content="word " * 1800)
    plan = plan_generation(request(messages=[long]), registry)
    assert plan.prompt_tokens + plan.engine_request.max_new_tokens == 2048


def test_the_plan_asks_for_the_sampling_requested_and_always_sends_a_seed(registry):
    plan = plan_generation(request(sampling=pb.SamplingParameters(temperature=0)), registry)
    r = plan.engine_request
    assert (r.temperature, r.top_k) == (0.0, 0)  # greedy, said as the API says it; engines translate
    assert r.model == MODEL and r.stop_token_ids == (2,)
    other = plan_generation(request(), registry).engine_request
    assert r.seed != other.seed  # random per request unless the caller sets one
    seeded = plan_generation(request(sampling=pb.SamplingParameters(seed=7)), registry).engine_request
    assert seeded.seed == 7


async def collect(plan, engine):
    return [e async for e in stream_generation(plan, engine, max_request_s=60)]


def text_of(events):
    return "".join(e.delta.text for e in events if e.HasField("delta"))


async def test_every_generated_token_is_counted_and_one_finished_event_ends_the_stream(registry):
    tok = registry.get(MODEL).tokenizer
    ids = tok.encode("Hello there, how are you today?")
    engine = FakeEngine(steps=[[i] for i in ids])
    plan = plan_generation(request(stopping=pb.StoppingCriteria(max_new_tokens=len(ids))), registry)
    events = await collect(plan, engine)
    assert text_of(events) == "Hello there, how are you today?"
    assert [e.HasField("finished") for e in events].count(True) == 1 and events[-1].HasField("finished")
    finished = events[-1].finished
    assert finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert finished.usage.completion_tokens == len(ids)
    assert finished.usage.prompt_tokens == plan.prompt_tokens
    assert sum(e.delta.token_count for e in events if e.HasField("delta")) == len(ids)


async def test_the_end_token_stops_the_stream_and_is_not_shown(registry):
    tok = registry.get(MODEL).tokenizer
    ids = tok.encode("Done.")
    engine = FakeEngine(steps=[ids + [2], tok.encode(" never seen")])
    events = await collect(plan_generation(request(), registry), engine)
    assert text_of(events) == "Done."
    assert events[-1].finished.finish_reason == pb.FINISH_REASON_STOP
    assert events[-1].finished.usage.completion_tokens == len(ids) + 1
    assert engine.cancelled  # the rest of the generation was abandoned


async def test_a_stop_sequence_across_tokens_ends_generation_and_cancels_the_engine(registry):
    tok = registry.get(MODEL).tokenizer
    steps = [[i] for i in tok.encode("one two three four five six")]
    engine = FakeEngine(steps=steps)
    plan = plan_generation(request(stopping=pb.StoppingCriteria(stop_sequences=["e fo"])), registry)
    events = await collect(plan, engine)
    assert text_of(events) == "one two thre"
    finished = events[-1].finished
    assert finished.finish_reason == pb.FINISH_REASON_STOP and finished.matched_stop_sequence == "e fo"
    assert engine.cancelled == [plan.engine_request.request_id]
    assert finished.usage.completion_tokens < len(steps)


async def test_engine_failure_propagates_as_its_own_error(registry):
    tok = registry.get(MODEL).tokenizer
    engine = FakeEngine(steps=[[i] for i in tok.encode("a b c d")], fail_after=2, error=Unavailable("down"))
    with pytest.raises(Unavailable):
        await collect(plan_generation(request(), registry), engine)


async def test_cancelling_the_consumer_cancels_the_engine(registry):
    engine = FakeEngine(steps=[[100]] * 1000, delay_s=0.01)
    plan = plan_generation(request(), registry)
    task = asyncio.create_task(collect(plan, engine))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.cancelled == [plan.engine_request.request_id]


async def test_a_backend_that_overshoots_max_tokens_is_cut_at_the_limit(registry):
    tok = registry.get(MODEL).tokenizer
    engine = FakeEngine(steps=[tok.encode(" one two three")] * 10)
    plan = plan_generation(request(stopping=pb.StoppingCriteria(max_new_tokens=4)), registry)
    events = await collect(plan, engine)
    finished = events[-1].finished
    assert finished.usage.completion_tokens == 4 and finished.finish_reason == pb.FINISH_REASON_LENGTH
    assert text_of(events) == tok_text(tok, (tok.encode(" one two three") * 2)[:4])


def tok_text(tok, ids):
    return b"".join(tok.token_bytes[i] for i in ids).decode()


@pytest.mark.parametrize("fields, param", [
    (dict(n=9), "n"),  # past the model's max_choices (8)
    (dict(top_logprobs=21, logprobs=True), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),  # without logprobs
    (dict(prompt="raw"), "prompt"),  # a prompt and messages
    (dict(prompt="", messages=[]), "prompt"),
])
def test_choices_log_probs_and_raw_prompts_are_checked(registry, fields, param):
    with pytest.raises(InvalidArgument) as raised:
        plan_generation(request(**fields), registry)
    assert raised.value.param == param


def test_a_raw_prompt_skips_the_chat_template(registry):
    tok = registry.get(MODEL).tokenizer
    plan = plan_generation(request(messages=[], prompt="Once upon a time"), registry)
    assert plan.engine_request.input_ids == tok.encode("Once upon a time")


async def test_each_choice_streams_its_own_text_and_ends_with_its_own_reason(registry):
    tok = registry.get(MODEL).tokenizer
    ids = tok.encode("one two three")
    engine = FakeEngine(steps=[[i] for i in ids])
    plan = plan_generation(request(n=3, stopping=pb.StoppingCriteria(max_new_tokens=len(ids))), registry)
    assert plan.engine_request.n == 3
    events = await collect(plan, engine)
    for index in range(3):
        assert "".join(e.delta.text for e in events if e.HasField("delta") and e.delta.index == index) == "one two three"
    ends = [e.choice_finished for e in events if e.HasField("choice_finished")]
    assert sorted(c.index for c in ends) == [0, 1, 2]
    assert all(c.finish_reason == pb.FINISH_REASON_LENGTH and c.completion_tokens == len(ids) for c in ends)
    assert events[-1].finished.usage.completion_tokens == 3 * len(ids)  # the prompt once, every choice's tokens
    assert events[-1].finished.usage.prompt_tokens == plan.prompt_tokens


async def test_log_probs_come_with_the_text_they_complete_and_concatenate_to_it(registry):
    from tests.fakes import FAKE_LOG_PROB

    tok = registry.get(MODEL).tokenizer
    text = "Hé, naïve café ☕ done"
    ids = tok.encode(text)
    engine = FakeEngine(steps=[[i] for i in ids] + [[2]])
    plan = plan_generation(request(logprobs=True, top_logprobs=2), registry)
    events = await collect(plan, engine)
    deltas = [e.delta for e in events if e.HasField("delta")]
    entries = [t for d in deltas for t in d.logprobs]
    assert len(entries) == len(ids)  # the end token is not part of the content
    assert b"".join(t.bytes for t in entries).decode() == text == "".join(d.text for d in deltas)
    assert all(t.logprob == FAKE_LOG_PROB and len(t.top_logprobs) == 2 for t in entries)
    assert entries[0].top_logprobs[1].logprob == FAKE_LOG_PROB - 1


async def test_a_stop_sequence_drops_the_log_probs_of_the_tokens_it_holds_back(registry):
    tok = registry.get(MODEL).tokenizer
    engine = FakeEngine(steps=[[i] for i in tok.encode("one two three four")])
    plan = plan_generation(request(logprobs=True, stopping=pb.StoppingCriteria(stop_sequences=[" three"])), registry)
    events = await collect(plan, engine)
    entries = [t for e in events if e.HasField("delta") for t in e.delta.logprobs]
    assert b"".join(t.bytes for t in entries).decode() == text_of(events) == "one two"


def test_n_times_max_tokens_past_the_models_memory_is_refused_naming_n(registry):
    import dataclasses

    from inference_svc.registry import ModelRegistry

    small = ModelRegistry([dataclasses.replace(registry.get(MODEL), max_request_tokens=1000)])
    with pytest.raises(InvalidArgument) as raised:
        plan_generation(request(n=4, stopping=pb.StoppingCriteria(max_new_tokens=250)), small)
    assert raised.value.param == "n" and "at most 1000" in raised.value.message
    assert plan_generation(request(n=4, stopping=pb.StoppingCriteria(max_new_tokens=200)), small).engine_request.n == 4


def test_a_prompt_too_long_for_any_tokenization_is_refused_without_tokenizing(registry):
    spec = registry.get(MODEL)
    huge = pb.ChatMessage(role=pb.ROLE_USER, content="x" * (spec.context_window * spec.longest_token_bytes + 1))
    with pytest.raises(InvalidArgument) as raised:
        plan_generation(request(messages=[huge]), registry)
    assert raised.value.code == "context_length_exceeded" and "characters long" in raised.value.message
