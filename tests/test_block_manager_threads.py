"""Threads hammering one kv_paged.BlockManager: no crash, no lost update, invariants intact. The
binding holds the GIL for a whole call and reads every argument before entering C++, so calls are
serialized; the switch interval is set tiny and some arguments run Python (__index__ yielding the
GIL) mid-read to provoke every interleaving the interpreter allows. (The TorchScript class this
replaced released the GIL and segfaulted here.)
"""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest

from kv_paged import BlockManager

NUM_THREADS = 6
STEPS = 1500


class YieldingInt:
    """An int-like whose __index__ yields the GIL: another thread runs while an argument is read."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        time.sleep(0)
        return self.value


def worker(bm: BlockManager, tid: int, errors: list[BaseException], go: threading.Barrier) -> None:
    rng = random.Random(tid)
    base = tid * 1_000_000
    live: list[int] = []
    next_id = base
    go.wait()
    try:
        for step in range(STEPS):
            op = rng.randrange(10)
            try:
                if op < 3 or not live:
                    prompt = [rng.randrange(4) for _ in range(rng.randint(1, 40))]
                    if rng.random() < 0.3:
                        prompt = [YieldingInt(t) for t in prompt]
                    bm.allocate(next_id, prompt, extra_key=f"t{tid}" if step % 2 else None)
                    live.append(next_id)
                    next_id += 1
                elif op < 5:
                    ids = rng.sample(live, rng.randint(1, len(live)))
                    slots, tables, lens = bm.decode_step(ids, [rng.randrange(4) for _ in ids])
                    assert slots.shape[0] == len(ids) == lens.shape[0] == tables.shape[0]
                elif op < 6:
                    bm.fork(rng.choice(live), next_id)
                    live.append(next_id)
                    next_id += 1
                elif op < 8:
                    sid = live.pop(rng.randrange(len(live)))
                    bm.free(YieldingInt(sid) if op == 7 else sid)
                elif op < 9:
                    sid = rng.choice(live)
                    bm.mark_computed([sid], [bm.seq_len(sid)])
                    bm.slot_mapping(sid, 0, bm.seq_len(sid))
                else:
                    bm.take_copies()
                    bm.stats()
            except RuntimeError as e:  # out of blocks: legal under contention, state unchanged
                assert "free or evictable" in str(e), e
        for sid in live:
            bm.free(sid)
    except BaseException as e:  # noqa: BLE001  (reported by the main thread)
        errors.append(e)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_threads_hammering_one_manager(prefix_caching):
    bm = BlockManager(512, 4, enable_prefix_caching=prefix_caching)
    errors: list[BaseException] = []
    go = threading.Barrier(NUM_THREADS + 1)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [
            threading.Thread(target=worker, args=(bm, t, errors, go)) for t in range(NUM_THREADS)
        ]
        for t in threads:
            t.start()
        go.wait()
        while any(t.is_alive() for t in threads):
            bm.check_invariants()  # the main thread audits while the others mutate
            time.sleep(0.001)
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[0]
    bm.take_copies()
    bm.check_invariants()
    s = bm.stats()
    assert s["num_seqs"] == 0 and s["blocks_in_use"] == 0
    assert bm.num_free_blocks == bm.num_blocks
