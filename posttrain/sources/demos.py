"""Demonstration experience: teacher-forced prompt + demonstration rows, the counterpart of sources/rollouts.py.

Global batch b of a stage is positions [c, c + batch_size) of a seeded per-epoch order over the data set (c = the
cursor, saved in checkpoints); process r takes its contiguous share [c + r P, c + (r + 1) P), P = batch_size / W.
The cursor advances only on steps that read demonstrations, so a stage that mixes SFT steps with RL steps (SASR)
walks the demonstrations in order; in a demonstration-only stage it is step * batch_size, as before.
"""
from __future__ import annotations

from posttrain.data import EpochSampler, Tokenized, collate_demos
from posttrain.experience import Experience


class DemoBuilder:
    """Demonstration batches of one stage: this process's share of the next global batch."""

    def __init__(self, items: list[Tokenized], pad_id: int, seed: int, batch_size: int, rank: int, world: int):
        self.items, self.pad_id, self.batch_size = items, pad_id, batch_size
        self.rank, self.world = rank, world
        self.sampler = EpochSampler(len(items), seed)
        self.cursor = 0                                            # global position of the next batch
        self.by_row = {item.row: i for i, item in enumerate(items)}   # data row -> item

    def next_batch(self) -> Experience:
        per_rank = self.batch_size // self.world
        idx = self.sampler.indices(self.cursor + self.rank * per_rank, per_rank)
        self.cursor += self.batch_size
        return collate_demos([self.items[i] for i in idx], self.pad_id)

    def rows(self, rows: tuple[int, ...]) -> Experience:
        """This process's contiguous share of the demonstrations of data rows `rows` (a mixer's choice: ReLIFT's
        buffer); rows whose demonstration was dropped as over-long are skipped on every process alike."""
        known = [self.by_row[r] for r in rows if r in self.by_row]
        if len(known) % self.world:
            known = known[: len(known) - len(known) % self.world]      # equal shares on every process
        if not known:
            raise ValueError(f"none of the {len(rows)} demonstration rows asked for is in the data set")
        per_rank = len(known) // self.world
        return collate_demos([self.items[i] for i in known[self.rank * per_rank : (self.rank + 1) * per_rank]],
                             self.pad_id)

    def mini_batches(self, exp: Experience, k: int) -> list[Experience]:
        """k optimizer steps' worth: rows i, i + k, i + 2k, ... (the same global split for any number of processes
        when each process's share is a multiple of k)."""
        return [exp.select(list(range(i, len(exp), k))) for i in range(k)]

    @property
    def epoch(self) -> float:
        return self.cursor / len(self.items)

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = int(state["cursor"])
