"""Non-comment lines in configs/ and the share of them that appear verbatim (stripped) in 3+ files."""
import sys
from collections import Counter
from pathlib import Path
root = Path(sys.argv[1] if len(sys.argv) > 1 else "configs")
files = {}
for p in sorted(root.rglob("*.yaml")):
    lines = [l.strip() for l in p.read_text().splitlines()]
    files[p] = [l for l in lines if l and not l.startswith("#")]
in_files = Counter()
for lines in files.values():
    for l in set(lines):
        in_files[l] += 1
total = sum(len(v) for v in files.values())
shared = sum(1 for v in files.values() for l in v if in_files[l] >= 3)
print(f"{len(files)} files, {total} non-comment lines, {shared} ({100*shared/total:.1f} %) appear in >= 3 files")
