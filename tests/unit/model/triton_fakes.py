"""Just enough of Triton's Python-backend API (triton_python_backend_utils) to drive our model's
serving half and generators in-process: requests with inputs, senders that record responses."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1


class TritonError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class Tensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self._name, self._value = name, value

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._value


class InferenceResponse:
    def __init__(self, output_tensors=(), error: TritonError | None = None) -> None:
        self.tensors = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


class _Metric:
    def __init__(self) -> None:
        self.value = 0.0
        self.peak = 0.0

    def increment(self, by: float) -> None:
        self.value += by

    def set(self, value: float) -> None:
        self.value = value
        self.peak = max(self.peak, value)


class MetricFamily:
    COUNTER, GAUGE = "counter", "gauge"

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name
        self.metrics: dict[tuple, _Metric] = {}

    def Metric(self, labels: dict) -> _Metric:  # noqa: N802 - Triton's name
        return self.metrics.setdefault(tuple(sorted(labels.items())), _Metric())


@dataclass
class Sender:
    responses: list[InferenceResponse] = field(default_factory=list)
    finals: int = 0
    done: threading.Event = field(default_factory=threading.Event)

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if response is not None:
            self.responses.append(response)
        if flags & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            self.finals += 1
            self.done.set()

    def sequences(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for r in self.responses:
            if "output_ids" in r.tensors:
                index = int(r.tensors["sequence_index"].reshape(-1)[0])
                out.setdefault(index, []).extend(r.tensors["output_ids"].reshape(-1).tolist())
        return out

    def error(self) -> str | None:
        return next((r.error.message() for r in self.responses if r.error is not None), None)


class Request:
    def __init__(self, request_id: str, **inputs) -> None:
        self._id = request_id
        self.inputs = {k: np.asarray(v) for k, v in inputs.items()}
        self.sender = Sender()
        self.cancel = threading.Event()

    def request_id(self) -> str:
        return self._id

    def get_response_sender(self) -> Sender:
        return self.sender

    def is_cancelled(self) -> bool:
        return self.cancel.is_set()


def get_input_tensor_by_name(request: Request, name: str):
    value = request.inputs.get(name)
    return None if value is None else Tensor(name, value)
