#!/usr/bin/env python3
"""Times the console's audit search through its own route, signed in through the IdP.

Usage: console_bench.py BASE USER PASSWORD PATH N

Signs in through BASE/saml/login?return=/console (SAML, as a browser would), then GETs BASE+PATH N times, one
after the other, and prints {"ms": [...], "rows": R}: each answer's wall time in ms
(request sent to the last byte read) and the rows the first page showed. Every answer
must be 200 and hold the results table.
"""

import json
import re
import sys
import time

from saml_login import sign_in


def main():
    base, user, password, path, n = sys.argv[1:6]
    s, r = sign_in(base, "/saml/login?return=/console", user, password)
    if r.status_code != 200 or "Overview" not in r.text:
        sys.exit(f"not signed in: {r.status_code} {r.text[:500]}")
    times = []
    rows = None
    for _ in range(int(n)):
        t0 = time.perf_counter()
        r = s.get(base + path, timeout=60)
        body = r.text
        times.append((time.perf_counter() - t0) * 1000.0)
        if r.status_code != 200 or 'id="results"' not in body:
            sys.exit(f"search failed: {r.status_code} {body[:800]}")
        m = re.search(r'id="row-count">(\d+)<', body)
        rows = int(m.group(1)) if m else None
    print(json.dumps({"ms": times, "rows": rows}))


if __name__ == "__main__":
    main()
