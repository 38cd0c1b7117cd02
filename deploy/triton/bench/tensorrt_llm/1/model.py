"""Synthetic `tensorrt_llm` model for benchmarks: TensorRT-LLM's contract, no compute.

Each request streams exactly request_output_len tokens for each of its num_return_sequences (the
prompt's own non-special ids, cycled, so they detokenize to text; with return_log_probs a fixed log
prob each, and num_top_log_probs alternatives), at tokens_per_second per request (0: as fast as one thread can send;
the environment variable CLOUDACH_BENCH_TOKENS_PER_S overrides the config). One sender thread
serves every request in order of when its next token is due, so many concurrent streams cost
no threads. Cancelled requests stop at their next token.
"""

from __future__ import annotations

import heapq
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
FIRST_ORDINARY_ID = 17  # SmolLM2's and Llama 3's ids below this include the chat specials


@dataclass
class Stream:
    request: object
    sender: object
    ids: list[int]
    left: int
    streaming: bool
    sent: int = 0
    prompt_tokens: int = 0
    sequences: int = 1
    log_probs: bool = False
    top_log_probs: int = 0


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    return values[0].item() if values.size else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        rate = float(os.environ.get("CLOUDACH_BENCH_TOKENS_PER_S", params.get("tokens_per_second", "0")))
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.due: list[tuple[float, int, Stream]] = []
        self.order = itertools.count()
        self.wake = threading.Condition()
        self.running = True
        self.sender = threading.Thread(target=self._send_forever, name="bench-sender", daemon=True)
        self.sender.start()

    def execute(self, requests):
        now = time.monotonic()
        with self.wake:
            for request in requests:
                sender = request.get_response_sender()
                if _scalar(request, "stop", False):
                    sender.send(pb_utils.InferenceResponse(output_tensors=[]), flags=FINAL)
                    continue
                prompt = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1).tolist()
                ids = [i for i in prompt if i >= FIRST_ORDINARY_ID] or [FIRST_ORDINARY_ID]
                top = int(_scalar(request, "num_top_log_probs", 0) or 0)
                stream = Stream(request, sender, ids, int(_scalar(request, "request_output_len", 16)),
                                bool(_scalar(request, "streaming", False)), prompt_tokens=len(prompt),
                                sequences=int(_scalar(request, "num_return_sequences", 1) or 1),
                                log_probs=bool(_scalar(request, "return_log_probs", False)) or top > 0,
                                top_log_probs=top)
                heapq.heappush(self.due, (now + self.interval, next(self.order), stream))
            self.wake.notify()
        return None

    def finalize(self):
        with self.wake:
            self.running = False
            self.wake.notify()
        self.sender.join(timeout=5)

    def _send_forever(self):
        while True:
            with self.wake:
                while self.running and not self.due:
                    self.wake.wait()
                if not self.running:
                    return
                due_at, _, stream = self.due[0]
                delay = due_at - time.monotonic()
                if delay > 0:
                    self.wake.wait(delay)
                    continue
                heapq.heappop(self.due)
            if self._step(stream):
                next_due = due_at + self.interval if self.interval else time.monotonic()
                with self.wake:
                    heapq.heappush(self.due, (next_due, next(self.order), stream))

    def _step(self, stream: Stream) -> bool:
        """Sends the stream's next token (or all of them, not streaming); False once it is done."""
        if stream.sent % 16 == 0 and stream.request.is_cancelled():
            stream.sender.send(flags=FINAL)
            return False
        count = 1 if stream.streaming else stream.left
        ids = [stream.ids[(stream.sent + k) % len(stream.ids)] for k in range(count)]
        stream.sent += count
        stream.left -= count
        last = stream.left <= 0
        for index in range(stream.sequences):
            response = pb_utils.InferenceResponse(output_tensors=self._tensors(stream, ids, index))
            if last and index == stream.sequences - 1:
                stream.sender.send(response, flags=FINAL)
            else:
                stream.sender.send(response)
        return not last

    @staticmethod
    def _tensors(stream: Stream, ids: list[int], index: int) -> list:
        tensors = [pb_utils.Tensor("output_ids", np.array(ids, dtype=np.int32).reshape(1, 1, -1)),
                   pb_utils.Tensor("sequence_length", np.array([[stream.sent]], dtype=np.int32)),
                   pb_utils.Tensor("sequence_index", np.array([[index]], dtype=np.int32))]
        if stream.log_probs:
            tensors.append(pb_utils.Tensor("output_log_probs", np.full((1, 1, len(ids)), -0.5, dtype=np.float32)))
        if stream.top_log_probs:
            k = stream.top_log_probs
            alternatives = [[stream.ids[(i + j) % len(stream.ids)] for j in range(k)] for i in ids]
            tensors.append(pb_utils.Tensor("top_log_prob_ids", np.array(alternatives, dtype=np.int32).reshape(1, -1, k)))
            tensors.append(pb_utils.Tensor("top_log_probs", np.tile(-0.5 - np.arange(k, dtype=np.float32), (1, len(ids), 1))))
        return tensors
