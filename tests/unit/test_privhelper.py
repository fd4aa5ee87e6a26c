"""The privileged password helper's protocol: verdicts only, refusals for junk, temporary when gone."""

from __future__ import annotations

import asyncio
import os

import pytest

from pymaddy.auth import privhelper


def test_malformed_requests_are_refused_not_crashed() -> None:
    for req in ({}, {"op": "shadow"}, {"op": "shadow", "user": "root", "pass": ""},
                {"op": "shadow", "user": "a:b", "pass": "x"}, {"op": "shadow", "user": "root\n", "pass": "x"},
                {"op": "rm -rf", "user": "root", "pass": "x"}, {"op": "shadow", "user": 1, "pass": "x"}):
        reply = privhelper._check(req)
        assert reply["ok"] is False and reply["temporary"] is False, req


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/etc/shadow"), reason="needs root and /etc/shadow")
def test_spawned_helper_answers_then_reports_its_death() -> None:
    async def run() -> None:
        assert privhelper.spawn()
        cl = privhelper.client()
        assert cl is not None
        try:
            wrong = await cl.check("shadow", "root", "certainly-not-the-root-password")
            assert wrong["ok"] is False and wrong["temporary"] is False
            unknown = await cl.check("shadow", "no-such-user-pymaddy", "x")
            assert unknown["ok"] is False
            both = await asyncio.gather(*(cl.check("shadow", "root", f"guess{i}") for i in range(5)))
            assert all(r["ok"] is False for r in both)  # several in flight, each answered by id
            cl.proc.kill()
            cl.proc.wait(5)
            gone = await cl.check("shadow", "root", "x")
            assert gone == {"ok": False, "temporary": True, "reason": gone["reason"]}
        finally:
            cl.sock.close()
            privhelper._client = None

    asyncio.run(run())
