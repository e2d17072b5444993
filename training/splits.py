"""Subject-grouped, seeded k-fold splits, written as JSON beside the run.

ACOUSLIC-AI has 300 cases from 281 subjects: splitting by case uuid puts repeat scans of
one mother on both sides. Here every subject lands in exactly one fold; folds are
balanced by number of cases (largest subjects first, each to the currently smallest fold,
ties broken by a seeded shuffle).
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Split:
    """Fold assignment of case uuids. `val_fold` is validation, `test_fold` (optional)
    is held out from both training and validation, the rest train."""
    folds: list[list[str]]
    subject_of: dict[str, str]
    seed: int
    val_fold: int = 0
    test_fold: int | None = None

    @property
    def val(self) -> list[str]:
        return list(self.folds[self.val_fold])

    @property
    def test(self) -> list[str]:
        return [] if self.test_fold is None else list(self.folds[self.test_fold])

    @property
    def train(self) -> list[str]:
        skip = {self.val_fold, self.test_fold}
        return [u for i, f in enumerate(self.folds) if i not in skip for u in f]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self) | {"train": self.train, "val": self.val, "test": self.test},
                                   indent=1))

    @classmethod
    def load(cls, path: Path) -> "Split":
        d = json.loads(Path(path).read_text())
        return cls(d["folds"], d["subject_of"], d["seed"], d["val_fold"], d.get("test_fold"))


def make_split(subject_of: dict[str, str], k: int = 5, seed: int = 0, val_fold: int = 0,
               test_fold: int | None = None) -> Split:
    """Group uuids by subject into k folds (seeded, deterministic)."""
    if k < 2:
        raise ValueError(f"k-fold needs k >= 2, got {k}")
    for f, name in ((val_fold, "val_fold"), (test_fold, "test_fold")):
        if f is not None and not 0 <= f < k:
            raise ValueError(f"{name}={f} outside 0..{k - 1}")
    if test_fold is not None and test_fold == val_fold:
        raise ValueError("test_fold and val_fold must differ")
    groups: dict[str, list[str]] = {}
    for uuid in sorted(subject_of):
        groups.setdefault(subject_of[uuid], []).append(uuid)
    if len(groups) < k:
        raise ValueError(f"{len(groups)} subjects cannot fill {k} folds")
    subjects = sorted(groups)
    random.Random(seed).shuffle(subjects)
    subjects.sort(key=lambda s: -len(groups[s]))  # stable: seeded order within equal sizes
    folds: list[list[str]] = [[] for _ in range(k)]
    for s in subjects:
        smallest = min(range(k), key=lambda i: (len(folds[i]), i))
        folds[smallest].extend(groups[s])
    return Split([sorted(f) for f in folds], dict(subject_of), seed, val_fold, test_fold)
