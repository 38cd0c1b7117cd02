"""The outbox's group commit: records added together are committed in shared transactions, and
each add() returns only once its own record is durable (a real SQLite file, read back apart)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from cloudach.billing.v1 import billing_pb2 as pb
from cloudach.outbox import UsageOutbox


def stored(path) -> set[str]:
    with sqlite3.connect(path) as db:
        return {row[0] for row in db.execute("SELECT request_id FROM outbox")}


@pytest.fixture
async def outbox(tmp_path):
    opened = UsageOutbox(str(tmp_path / "outbox.db"))
    await opened.open()
    yield opened
    await opened.close()


async def test_records_added_together_share_transactions_and_each_is_durable_when_add_returns(tmp_path, outbox):
    path = tmp_path / "outbox.db"
    commits = 0
    transaction = outbox._db.transaction

    async def counted(statements):
        nonlocal commits
        commits += 1
        return await transaction(statements)

    outbox._db.transaction = counted

    async def add(i: int) -> None:
        await outbox.add(pb.UsageRecord(request_id=f"r{i}"))
        assert f"r{i}" in stored(path)  # durable, by another connection, the moment add() returns

    await asyncio.gather(*(add(i) for i in range(200)))
    assert stored(path) == {f"r{i}" for i in range(200)}
    assert commits < 50, commits  # far fewer transactions than records


async def test_a_failed_group_is_written_record_by_record_and_nothing_is_lost(tmp_path, outbox):
    async def broken(statements):
        raise OSError("disk hiccup")

    outbox._db.transaction = broken  # every group fails: each record is then written alone
    await asyncio.gather(*(outbox.add(pb.UsageRecord(request_id=f"r{i}")) for i in range(20)))
    assert stored(tmp_path / "outbox.db") == {f"r{i}" for i in range(20)}


async def test_a_caller_that_leaves_does_not_take_its_record_with_it(tmp_path, outbox):
    adding = asyncio.create_task(outbox.add(pb.UsageRecord(request_id="left")))
    await asyncio.sleep(0)
    adding.cancel()
    await asyncio.sleep(0.5)
    assert stored(tmp_path / "outbox.db") == {"left"}
