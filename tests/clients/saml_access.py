#!/usr/bin/env python3
"""Just-in-time access on the sign-on pages without a browser: sign in at the IdP, then
act on /access as that user.

Usage: saml_access.py GATEWAY_URL USER PASSWORD ACTION [ARGS...]
  request NETWORK PORT DURATION REASON   files a request (PORT may be "")
  approve ID | deny ID REASON            decides a pending request
  forged ID                              posts an approval with a forged CSRF token
  show                                   only reads the page

Prints one JSON object: the status of the action's POST (absent for show), the page it
led to, and /access as seen afterwards.
"""

import html
import json
import re
import sys

from saml_login import sign_in


def main():
    base, user, password, action = sys.argv[1:5]
    rest = sys.argv[5:]
    s, r = sign_in(base, "/access", user, password)
    out = {"login_url": r.url, "login_status": r.status_code}
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    if r.status_code != 200 or not m:
        out["page"] = r.text
        print(json.dumps(out))
        return
    csrf = html.unescape(m.group(1))
    post = None
    if action == "request":
        network, port, duration, reason = rest
        post = s.post(base + "/access/request", data={
            "csrf": csrf, "network": network, "dst": "", "port": port,
            "duration": duration, "reason": reason}, timeout=10, allow_redirects=False)
    elif action in ("approve", "deny"):
        post = s.post(base + "/access/decide", data={
            "csrf": csrf, "id": rest[0], "decision": action,
            "reason": rest[1] if len(rest) > 1 else ""}, timeout=10, allow_redirects=False)
    elif action == "forged":
        post = s.post(base + "/access/decide", data={
            "csrf": "x" * len(csrf), "id": rest[0], "decision": "approve", "reason": ""},
            timeout=10, allow_redirects=False)
    if post is not None:
        out["status"] = post.status_code
        out["answer"] = post.text
    out["page"] = s.get(base + "/access", timeout=10).text
    print(json.dumps(out))


if __name__ == "__main__":
    main()
