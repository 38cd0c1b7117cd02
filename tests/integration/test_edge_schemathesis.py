"""Schemathesis against the edge's own /openapi.json (edge and inference_svc over real gRPC, the
fake engine behind them): seeded and bounded, no response may be a 5xx, and every response must
conform to the published schema."""

from __future__ import annotations

import asyncio
import pathlib
import re
import sys

from tests.integration.services import API_KEY, MODEL, edge_over_fake
from tests.fakes import FakeEngine

ST = pathlib.Path(sys.executable).parent / "st"
FUZZ_S = 40


async def test_schemathesis_finds_no_5xx_and_no_response_off_the_schema(registry, auth, tmp_path):
    engine = FakeEngine(steps=[registry.get(MODEL).tokenizer.encode(" ok")] * 3)
    async with edge_over_fake(engine, registry, auth) as url:
        process = await asyncio.create_subprocess_exec(
            # Seeded, and bounded in time (the fuzzing phase runs until --max-time): about 3,000 cases.
            str(ST), "run", f"{url}/openapi.json", "--seed", "20261202", "--workers", "1",
            "--phases", "coverage,fuzzing", "--max-time", str(FUZZ_S),
            "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
            "--header", f"Authorization: Bearer {API_KEY}", "--request-timeout", "30", "--no-color",
            "--generation-database", "none",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path)
        output, _ = await asyncio.wait_for(process.communicate(), FUZZ_S + 60)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", text)
    assert cases and int(cases[1]) > 500 and cases[1] == cases[2], text[-3000:]  # it did fuzz, and all passed
