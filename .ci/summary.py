"""Turn trial's closing line into the plain 'N passed, N failed, N skipped' line CI reads."""

import re
import sys

text = sys.stdin.read()
match = None
for match in re.finditer(r"^(PASSED|FAILED) \(([^)]*)\)\s*$", text, re.M):
    pass
if match is None:
    print("0 passed, 1 failed")  # trial never reached its summary (import error, crash, ...)
    sys.exit(0)
counts = dict((k, int(v)) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2)))
passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get("unexpectedSuccesses", 0)
print(f"{passed} passed, {failed} failed, {counts.get('skips', 0)} skipped")
