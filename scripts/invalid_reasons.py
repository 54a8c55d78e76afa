"""Why the invalid molecules of a `moldiff sample` SD file are invalid: the atom RDKit rejected,
by element and by the valence it had under EDM's distance-table bonds.

    python scripts/invalid_reasons.py out/a38659_300/samples.sdf

Reads the ``reason`` SD tag that `moldiff sample` writes on every record ("invalid: Explicit valence
for atom # 2 C, 5, is greater than permitted; ...") and prints the record count, the invalid count
and one line per (element, valence), most frequent first; other reasons for invalidity are counted
under their first words. A file without ``reason`` tags, or unreadable, gives one line on stderr and
exit status 2.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter

VALENCE = re.compile(r"Explicit valence for atom # \d+ ([A-Z][a-z]?), (\d+), is greater than permitted")


def count(path: str) -> tuple[int, int, Counter]:
    """``(records, invalid records, Counter of (element, valence) or (reason, ""))``."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    records = invalid = 0
    reasons: Counter = Counter()
    supplier = Chem.SDMolSupplier(path, sanitize=False, removeHs=False)
    for mol in supplier:
        if mol is None or not mol.HasProp("reason"):
            raise ValueError(f"{path}: record {records} has no 'reason' tag (not a moldiff sample file?)")
        records += 1
        reason = mol.GetProp("reason")
        if not reason.startswith("invalid"):
            continue
        invalid += 1
        m = VALENCE.search(reason)
        reasons[(m.group(1), m.group(2)) if m else (" ".join(reason.split(";")[0].split()[:4]), "")] += 1
    if records == 0:
        raise ValueError(f"{path}: no records")
    return records, invalid, reasons


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="invalid_reasons.py", description=__doc__.split("\n\n")[0])
    p.add_argument("sdf", help="samples.sdf written by `moldiff sample`")
    args = p.parse_args(argv)
    try:
        records, invalid, reasons = count(args.sdf)
    except (OSError, ValueError) as exc:
        print(f"invalid_reasons.py: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.sdf}: {records} records, {invalid} invalid")
    for (element, valence), n in reasons.most_common():
        print(f"{n:6d}  {element} with {valence} bonds" if valence else f"{n:6d}  {element}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
