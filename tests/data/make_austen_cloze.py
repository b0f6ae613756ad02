"""Builds the `austen_cloze` lm-eval task data: 100 sentence-ending items from Pride and Prejudice (public domain).

Each item is one sentence of narration cut before its last words: the context is the beginning, the four choices are
the true ending and three endings of the same word count taken from other sentences of the same text. A language
model that follows the sentence picks the true ending; chance is 25%.

Source: ``tests/data/pride_and_prejudice_eval.txt`` (the beginning of the Project Gutenberg text, never used for
calibration: the bundled calibration text leaves Pride and Prejudice out). Dialogue paragraphs are skipped (a
sentence cut out of a quotation is often unreadable without its neighbours), as are chapter headings and sentences
with italics markers. Everything is drawn from `random.Random(SEED)`, so the output is the same on every run; the
test suite checks that the committed file is exactly what this script writes.

Usage:
    python tests/data/make_austen_cloze.py [--source TEXT] [--output JSONL]   (defaults: SOURCE and OUTPUT below)
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SOURCE = REPO_ROOT / "tests" / "data" / "pride_and_prejudice_eval.txt"
OUTPUT = REPO_ROOT / "optimum_olica" / "resources" / "lm_eval_tasks" / "austen_cloze" / "austen_cloze.jsonl"
SEED = 0
NUM_ITEMS = 100
NUM_CHOICES = 4
MIN_WORDS, MAX_WORDS = 14, 40  # long enough to give context, short enough to stay one clause chain
# A sentence ends at . ! ? followed by a capital, except after these titles ("Mr. Bennet").
ABBREVIATIONS = ("Mr", "Mrs", "Dr", "St", "Esq")
QUOTE_MARKS = ('"', "\u201c", "\u201d")


def narration_sentences(text: str) -> list[str]:
    """The sentences of the paragraphs that contain no quotation, whitespace collapsed, in text order."""
    sentences = []
    for paragraph in text.split("\n\n"):
        paragraph = " ".join(paragraph.split())
        if not paragraph or any(mark in paragraph for mark in QUOTE_MARKS):
            continue
        start = 0
        for match in re.finditer(r"[.!?]\s+(?=[A-Z])", paragraph):
            preceding_word = paragraph[start : match.start()].rsplit(" ", 1)[-1]
            if preceding_word in ABBREVIATIONS:
                continue
            sentences.append(paragraph[start : match.start() + 1])
            start = match.end()
        sentences.append(paragraph[start:])
    return sentences


def usable(sentence: str) -> bool:
    return (
        MIN_WORDS <= len(sentence.split()) <= MAX_WORDS
        and sentence.endswith(".")
        and "_" not in sentence  # Gutenberg italics
        and not sentence.lower().startswith("chapter")
    )


def ending_length(num_words: int) -> int:
    """Words in the ending: about a third of the sentence, between 4 and 10."""
    return min(10, max(4, num_words // 3))


def build_items(text: str, num_items: int = NUM_ITEMS, seed: int = SEED) -> list[dict]:
    rng = random.Random(seed)
    sentences = [sentence for sentence in narration_sentences(text) if usable(sentence)]
    if len(sentences) < num_items:
        raise ValueError(f"Only {len(sentences)} usable sentences in the source; {num_items} items asked for.")
    split = []  # (context, ending, ending word count) per sentence
    for sentence in sentences:
        words = sentence.split()
        cut = len(words) - ending_length(len(words))
        split.append((" ".join(words[:cut]), " ".join(words[cut:]), len(words) - cut))
    chosen = sorted(rng.sample(range(len(split)), num_items))
    items = []
    for item_id, index in enumerate(chosen):
        context, ending, length = split[index]
        # Distractors: endings of other sentences with the same number of words, so length alone gives nothing away.
        pool = sorted({other[1] for j, other in enumerate(split) if j != index and other[2] == length} - {ending})
        endings = rng.sample(pool, NUM_CHOICES - 1) + [ending]
        rng.shuffle(endings)
        items.append({"id": item_id, "context": context, "endings": endings, "label": endings.index(ending)})
    return items


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"plain text to draw from (default {SOURCE})")
    parser.add_argument("--output", type=Path, default=OUTPUT, help=f"JSONL to write (default {OUTPUT})")
    args = parser.parse_args(argv)
    items = build_items(args.source.read_text(encoding="utf-8"))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with open(args.output, "w", encoding="utf-8", newline="\n") as file:
        for item in items:
            file.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {len(items)} items to {args.output}")


if __name__ == "__main__":
    main()
