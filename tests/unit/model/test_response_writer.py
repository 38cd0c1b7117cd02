"""The model's response writer: one thread sends every job's responses in order, and a caller
whose stream broke is cancelled without stopping anyone else's."""

from __future__ import annotations

import numpy as np

from tests.unit.model import triton_fakes as pb
from triton_model.request import Limits, parse
from triton_model.serving import Job, Metrics, ResponseWriter, Step, TritonInputs

LIMITS = Limits(n_vocab=100, max_sequence_tokens=64, max_return_sequences=4, kv_cache_tokens=256)


class BrokenSender(pb.Sender):
    def send(self, response=None, flags=0):
        raise RuntimeError("Unable to send response. Response sender has been closed.")


def job(writer: ResponseWriter, rid: str, sender: pb.Sender) -> Job:
    triton_request = pb.Request(rid, input_ids=np.array([[1, 2, 3]], np.int32),
                                request_output_len=np.array([[8]], np.int32), streaming=np.array([[True]]))
    request = parse(rid, TritonInputs(pb, triton_request), LIMITS)
    return Job(request, triton_request, sender, pb, Metrics(pb, "m"), writer)


def test_responses_go_out_in_order_and_a_broken_caller_is_cancelled_alone():
    writer = ResponseWriter(max_pending=4)  # smaller than the steps: emit() waits for the writer
    fine, broken = job(writer, "fine", pb.Sender()), job(writer, "broken", BrokenSender())
    for token in range(10):
        broken.emit(Step(0, [token]))
        fine.emit(Step(0, [token]))
    assert not fine.cancelled()
    fine.finish(0)
    broken.finish(0)
    assert fine.sender.done.wait(5)
    writer.close()
    assert fine.sender.sequences() == {0: list(range(10))}
    assert [int(r.tensors["sequence_length"][0, 0]) for r in fine.sender.responses[:10]] == list(range(1, 11))
    assert broken.cancelled() and not fine.cancelled()
