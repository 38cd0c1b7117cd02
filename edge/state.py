"""What the edge's handlers share, held in the application under one typed key."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from cloudach.inference.v1.inference_pb2_grpc import InferenceServiceStub
from edge.auth import StaticKeys
from edge.config import EdgeConfig
from edge.http import Admission


@dataclass
class EdgeState:
    config: EdgeConfig
    keys: StaticKeys
    admission: Admission
    #: set while the app runs (see app.inference_channel)
    inference: InferenceServiceStub = field(default=None)  # type: ignore[assignment]


STATE = web.AppKey("state", EdgeState)
