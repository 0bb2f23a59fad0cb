"""Build concept_attention/data/wnid_to_lemma.json from WordNet 3.0's data.noun.

ImageNet-Segmentation names each image by a WordNet id ("n02084071_123"): "n" + the 8-digit byte offset of the
synset's line in data.noun. The evaluation needs the synset's first lemma (the key of the shipped class map), and
WordNet is not a runtime dependency, so the few hundred entries it needs ship as a table.

    apt-get update && apt-get install -y wordnet-base      # provides /usr/share/wordnet/data.noun
    python scripts/build_wnid_table.py                     # rewrites concept_attention/data/wnid_to_lemma.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "concept_attention" / "data"


def read_first_lemmas(data_noun: Path) -> dict[str, str]:
    """wnid -> first lemma ("_" -> " ") for every noun synset; checks that each offset is the line's byte offset."""
    table = {}
    with open(data_noun, "rb") as file:
        offset = 0
        for raw in file:
            if not raw.startswith(b"  "):  # lines starting with two spaces are the license header
                fields = raw.decode("utf-8").split(" ")
                if int(fields[0]) != offset:
                    raise ValueError(f"{data_noun}: synset {fields[0]} is at byte {offset}; not a WordNet data file")
                table[f"n{fields[0]}"] = fields[4].replace("_", " ")
            offset += len(raw)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-noun", type=Path, default=Path("/usr/share/wordnet/data.noun"))
    parser.add_argument("--class-map", type=Path, default=DATA / "imagenet_seg_class_map.json")
    parser.add_argument("--out", type=Path, default=DATA / "wnid_to_lemma.json")
    args = parser.parse_args()
    if not args.data_noun.is_file():
        raise SystemExit(f"{args.data_noun} not found: install WordNet 3.0 (apt-get install -y wordnet-base)")

    wanted = set(json.loads(args.class_map.read_text())["categories"])
    table = {wnid: lemma for wnid, lemma in read_first_lemmas(args.data_noun).items() if lemma in wanted}
    missing = wanted - set(table.values())
    if missing:
        raise SystemExit(f"no noun synset has these first lemmas: {sorted(missing)}")
    args.out.write_text(json.dumps(dict(sorted(table.items())), indent=0) + "\n")
    print(f"wrote {len(table)} synsets ({len(wanted)} class-map lemmas) to {args.out}")


if __name__ == "__main__":
    main()
