"""The runner's persistent block-table tensor matches the lists it mirrors."""

from __future__ import annotations

import random

import torch

from kvpage.worker.page_table_buffer import PageTableBuffer


def test_buffer_tracks_appends_copy_on_write_and_reuse() -> None:
    rng = random.Random(0)
    buf = PageTableBuffer(max_rows=2, initial_width=2, device=torch.device("cpu"))
    tables: dict[int, list[int]] = {}
    next_id = 0
    for _ in range(400):
        op = rng.random()
        if op < 0.2 or not tables:
            tables[next_id] = [rng.randrange(100) for _ in range(rng.randint(1, 5))]
            next_id += 1
        elif op < 0.5:
            seq = rng.choice(list(tables))
            tables[seq].extend(rng.randrange(100) for _ in range(rng.randint(0, 3)))
        elif op < 0.7:
            seq = rng.choice(list(tables))
            tables[seq][-1] = rng.randrange(100)  # copy-on-write of the page being written
        else:
            seq = rng.choice(list(tables))
            del tables[seq]
            buf.release([seq])
        ids = rng.sample(list(tables), k=rng.randint(1, len(tables))) if tables else []
        if not ids:
            continue
        got = buf.gather(ids, [tables[i] for i in ids])
        width = max(len(tables[i]) for i in ids)
        expected = torch.tensor([tables[i] + [0] * (width - len(tables[i])) for i in ids], dtype=torch.int32)
        assert torch.equal(got, expected)
