"""`flamingo-export serve --ray --replicas 2` on a local Ray instance bound to 127.0.0.1: both
replicas answer correctly, the same demonstrations reach one replica (prefix-cache hits), and
after a replica process is killed Ray replaces it and requests are answered again.

What Ray does when a replica dies (Ray 2.60): the controller notices the dead actor and starts
a new replica (a new PID); a request routed to the dead one before the routers learn of it may
fail (the ingress answers 500), later ones are answered (this test retries until a live replica
answers and both replicas are back).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import time
from pathlib import Path

import pytest

from .conftest import chat_messages, http

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("ray") is None,
        reason="Ray is not installed (pip install -c constraints.txt -e '.[ray]')",
    ),
]


def _ask(server, ep, query: str = "query.png") -> tuple[str, str, int]:
    """(answer, replica, cached_tokens) of one 4-shot chat."""
    r = http(server, "POST", "/v1/chat/completions",
             {"model": "m", "messages": chat_messages(ep, query=query)})  # fmt: skip
    assert r.status == 200, r.text
    body = r.json()
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    return body["choices"][0]["message"]["content"], r.headers["x-flamingo-replica"], cached


def _pid(replica: str) -> int:
    return int(replica.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def ray_server(server_factory, demo_export: Path):
    return server_factory(
        demo_export, "--ray", "--replicas", "2", "--threads", "1", "--max-batch-size", "4",
        timeout=240,
    )  # fmt: skip


def test_two_replicas_answer_and_keep_demonstrations_together(ray_server, episodes) -> None:
    replicas = {}
    for i in range(12):  # 12 demonstration sets: both replicas get some (p of not: 2^-11)
        ep = episodes(i)
        answer, replica, _ = _ask(ray_server, ep)
        assert answer == ep.answer or i >= 4, (i, answer, ep.answer)  # held-out: 95% right
        replicas[i] = replica
    assert len(set(replicas.values())) == 2, replicas
    for i in (0, 1, 2):  # the same demonstrations, other queries: the same replica, cached
        for query in ("demo_0.png", "demo_1.png"):
            _, replica, cached = _ask(ray_server, episodes(i), query)
            assert replica == replicas[i] and cached > 0


def test_a_killed_replica_is_replaced(ray_server, episodes) -> None:
    ep = episodes(0)
    expected, victim, _ = _ask(ray_server, ep)
    os.kill(_pid(victim), signal.SIGKILL)  # one replica process, by its PID
    deadline = time.monotonic() + 180
    seen: set[str] = set()
    failures = 0
    while time.monotonic() < deadline:
        r = http(ray_server, "POST", "/v1/chat/completions",
                 {"model": "m", "messages": chat_messages(ep)})  # fmt: skip
        if r.status == 200:
            assert r.json()["choices"][0]["message"]["content"] == expected
            seen.add(r.headers["x-flamingo-replica"])
            if victim not in seen and any(_pid(s) != _pid(victim) for s in seen):
                new = {s for s in seen if s != victim}
                # the demonstrations' replica is now a live one; both replicas are back
                others = {_ask(ray_server, episodes(i))[1] for i in range(12)}
                if len(others) == 2 and victim not in others:
                    return
                assert new
        else:
            failures += 1
        time.sleep(0.5)
    raise AssertionError(f"not answered by a live replica in time (failures {failures})")
