"""Batching on a four-GPU box (issue 18), against the real stack: uvicorn, PostgreSQL, Redis, four Celery workers on
slots 0-3 with HDM_MAX_BATCH=8, two plain keys and an admin key. Workers start idle; jobs are queued while the
workers that got them wait at their slot lease (db_probe.claims_held), so the test, not timing, decides when they
claim. What ran where is read from the database (jobs.worker, result.batch)."""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from db_probe import JobRow, TableLock, claims_held, connect, idle_in_transaction, job_rows, wait_final
from service_stack import API_KEY, OTHER_KEY, Stack, own_database, stack_env

SLOTS = [0, 1, 2, 3]
SMALL = {"width": 32, "height": 32, "steps": 3, "guidance_scale": 3.0}
SENTENCE = "a red circle on the blue square with a green ring at the top"  # prompts: its first k words


@pytest.fixture(scope="module")
def four(
    tmp_path_factory: pytest.TempPathFactory,
    assets: dict[str, Path],
    pg_admin: Any,
    redis_url: str,
    queue_prefix: str,
) -> Iterator[tuple[Stack, dict[int, subprocess.Popen[bytes]]]]:
    tmp = tmp_path_factory.mktemp("four-gpu-stack")
    with own_database(pg_admin) as url:
        env = stack_env(tmp, assets, url, redis_url, queue_prefix + "f")
        # a paused worker's lease stays fresh for the test; a forced cancel comes after 3 s
        env.update(
            HDM_SLOTS="0,1,2,3", HDM_MAX_BATCH="8", HDM_STALE_AFTER_S="120", HDM_FORCE_CANCEL_AFTER_S="3"
        )
        s = Stack(env, tmp, API_KEY)
        try:
            s.migrate()
            s.start_api()
            workers = {slot: s.start_worker(slot) for slot in SLOTS}
            _wait_ready(tmp, len(SLOTS))
            yield s, workers
        finally:
            s.stop()


def _words(k: int) -> str:
    return " ".join(SENTENCE.split(" ")[:k])


def _wait_ready(workdir: Path, n: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while sum("ready." in p.read_text(errors="replace") for p in workdir.glob("*-worker*.log")) < n:
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.2)


def _tokens(assets: dict[str, Path], prompt: str) -> int:
    from transformers import AutoTokenizer  # the text encoder's tokenizer, read by the test on its own

    return len(AutoTokenizer.from_pretrained(assets["te"])(prompt, add_special_tokens=False)["input_ids"])


def _post(s: Stack, prompt: str, seed: int, key: str = API_KEY, **kw: Any) -> str:
    with s.client(key) as c:
        r = c.post("/v1/images", json={"prompt": prompt, "seed": seed, **SMALL, **kw})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])


def _wait_all(s: Stack, ids: list[str], timeout: float = 180) -> None:
    wait_final(s.env["HDM_DATABASE_URL"], ids, timeout)


def _slot_of(row: JobRow) -> int:
    m = re.match(r"slot(\d+)-", row.worker or "")
    assert m, row
    return int(m.group(1))


def _table(rows: list[JobRow], tokens: dict[str, int], t0: float) -> str:
    lines = ["job                       tokens  slot  batch              size  start_s  end_s  status"]
    for r in sorted(rows, key=lambda r: (r.started_at, r.id)):
        assert r.started_at is not None and r.finished_at is not None
        lines.append(
            f"{r.id:<25} {tokens[r.id]:>6}  {_slot_of(r):>4}  {r.batch_id or '-':<18} {r.batch_size or 0:>4}"
            f"  {r.started_at.timestamp() - t0:>7.2f}  {r.finished_at.timestamp() - t0:>5.2f}  {r.status}"
        )
    return "\n".join(lines)


def _batches(rows: list[JobRow]) -> dict[str, list[JobRow]]:
    out: dict[str, list[JobRow]] = {}
    for r in rows:
        assert r.batch_id, r
        out.setdefault(r.batch_id, []).append(r)
    return out


def test_jobs_of_different_lengths_spread_over_the_idle_workers(four: Any, assets: dict[str, Path]) -> None:
    s, _ = four
    prompts = [_words(k) for k in range(1, 9)]
    tokens_of = [_tokens(assets, p) for p in prompts]
    assert len(set(tokens_of)) == 8, tokens_of  # premise: eight different text lengths
    with claims_held(s.env["HDM_DATABASE_URL"], SLOTS) as held:
        ids = [_post(s, p, seed=10 + i, key=(API_KEY, OTHER_KEY)[i % 2]) for i, p in enumerate(prompts)]
        held.wait_for(4)  # every worker got a job and waits to claim it; the other four are queued
        t0 = time.time()
    _wait_all(s, ids)
    rows = job_rows(s.env["HDM_DATABASE_URL"], ids)
    tokens = dict(zip(ids, tokens_of, strict=True))
    print("\n" + _table(rows, tokens, t0))
    assert all(r.status == "succeeded" and r.attempts == 1 for r in rows), rows
    batches = _batches(rows)
    for members in batches.values():  # one network forward: one text length per batch
        assert len({tokens[r.id] for r in members}) == 1, members
    assert {_slot_of(r) for r in rows} == set(SLOTS)  # every worker ran jobs
    spans: dict[int, list[tuple[float, float]]] = {}
    for members in batches.values():
        start = min(r.started_at.timestamp() for r in members if r.started_at)
        end = max(r.finished_at.timestamp() for r in members if r.finished_at)
        spans.setdefault(_slot_of(members[0]), []).append((start, end))
    for slot, own in spans.items():
        own.sort()
        for (a_start, _), (_, b_end) in itertools.pairwise(own):
            for other, theirs in spans.items():  # nobody sat idle while this worker ran two batches in a row
                if other != slot:
                    assert any(s0 < b_end and e0 > a_start for s0, e0 in theirs), (slot, other, spans)


@contextlib.contextmanager
def _three_busy(s: Stack, workers: dict[int, subprocess.Popen[bytes]]) -> Iterator[int]:
    """Three workers each run a long job of their own (paused mid-sampling, slot lease held); yields the free slot.
    Their jobs are cancelled afterwards."""
    db = s.env["HDM_DATABASE_URL"]
    long = {"steps": 200, "width": 64, "height": 64}
    with claims_held(db, SLOTS) as held:
        blockers = [_post(s, _words(9 + i), seed=i, **long) for i in range(3)]
        held.wait_for(3)
    for j in blockers:
        s.wait_job(j, statuses=("running",), timeout=120, pred=lambda job: job["progress"]["step"] >= 1)
    busy = [_slot_of(r) for r in job_rows(db, blockers)]
    _pause(db, [workers[slot] for slot in busy])
    assert all(r.status == "running" for r in job_rows(db, blockers)), "a long job ended before the test"
    try:
        (free,) = set(SLOTS) - set(busy)
        yield free
    finally:
        for slot in busy:
            os.killpg(workers[slot].pid, signal.SIGCONT)
        with s.client() as c:
            for j in blockers:
                c.post(f"/v1/images/{j}/cancel")
        _wait_all(s, blockers)


def _pause(db: str, procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGSTOP the workers' process groups between two transactions: a worker stopped inside one would hold its row
    locks (and every writer after it) until it resumes."""
    for _ in range(50):
        for p in procs:
            os.killpg(p.pid, signal.SIGSTOP)
        time.sleep(0.3)
        if idle_in_transaction(db, older_than_s=0.2) == 0:
            return
        for p in procs:
            os.killpg(p.pid, signal.SIGCONT)
        time.sleep(0.1)
    raise AssertionError("could not pause the workers between transactions")


def test_jobs_of_one_length_run_as_one_batch_on_the_free_worker(four: Any, assets: dict[str, Path]) -> None:
    s, workers = four
    db = s.env["HDM_DATABASE_URL"]
    prompts = ["a red circle", "a blue square", "a green circle", "a red square"] * 2
    assert len({_tokens(assets, p) for p in prompts}) == 1  # premise: one text length
    with _three_busy(s, workers) as free:
        with claims_held(db, SLOTS) as held:
            ids = [_post(s, p, seed=100 + i, key=(API_KEY, OTHER_KEY)[i % 2]) for i, p in enumerate(prompts)]
            held.wait_for(1)
            t0 = time.time()
        _wait_all(s, ids)
    rows = job_rows(db, ids)
    print("\n" + _table(rows, {j: _tokens(assets, p) for j, p in zip(ids, prompts, strict=True)}, t0))
    assert all(r.status == "succeeded" and r.attempts == 1 for r in rows), rows
    assert len({r.batch_id for r in rows}) == 1 and rows[0].batch_size == 8
    assert {_slot_of(r) for r in rows} == {free}


def test_cancel_of_the_first_job_after_its_rows_finished_leaves_the_batch(
    four: Any, assets: dict[str, Path]
) -> None:
    s, workers = four
    db = s.env["HDM_DATABASE_URL"]
    prompts = ["a red circle", "a blue square", "a green circle", "a red square"] * 2
    with _three_busy(s, workers) as free:
        # the batch samples, then waits at writing its first job's image rows: every row of the batch is done
        with TableLock(db, "images", "DELETE FROM images%") as rows_lock:
            with claims_held(db, SLOTS) as held:
                ids = [
                    _post(s, p, seed=200 + i, key=(API_KEY, OTHER_KEY)[i % 2]) for i, p in enumerate(prompts)
                ]
                held.wait_for(1)
            rows_lock.wait_for(1)
            running = [r for r in job_rows(db, ids) if r.status == "running"]
            assert len(running) == 8  # all claimed, sampled, and waiting at the first job's image rows
            first = _primary(db, free)
            pool = _pool_children(workers[free])
            assert _cancel(s, first) in (200, 202)
            # past HDM_FORCE_CANCEL_AFTER_S the maintenance loop ends it; it must not terminate the batch's process
            (ended,) = wait_final(db, [first], timeout=60)
            assert ended.status == "cancelled", ended
        _wait_all(s, ids, timeout=120)
    rows = {r.id: r for r in job_rows(db, ids)}
    assert rows[first].status == "cancelled"
    others = [r for j, r in rows.items() if j != first]
    assert all(r.status == "succeeded" and r.attempts == 1 for r in others), others
    assert (
        len({r.batch_id for r in others}) == 1 and others[0].batch_size == 8
    )  # the cancelled job's batch too
    assert _pool_children(workers[free]) == pool  # the worker's process was not replaced


def _cancel(s: Stack, job_id: str) -> int:
    for key in (API_KEY, OTHER_KEY):  # the job's own key (another key's answer is 404)
        with s.client(key) as c:
            r = c.post(f"/v1/images/{job_id}/cancel")
        if r.status_code != 404:
            return r.status_code
    return 404


def _primary(db: str, slot: int) -> str:
    with connect(db) as conn:
        row = conn.execute("SELECT job_id FROM gpu_leases WHERE slot = %s", (slot,)).fetchone()
    assert row and row[0], row
    return str(row[0])


def _pool_children(proc: subprocess.Popen[bytes]) -> list[int]:
    from service_stack import children

    return sorted(children(proc.pid))
