#!/usr/bin/env python3
"""The second factor without a browser: sign in at the IdP, then answer /mfa.

Usage: saml_totp.py GATEWAY_URL USER PASSWORD ACTION [ARG]
  setup            expects the setup page: reads the key, answers its current code
  code SECRET      answers the current code of SECRET (base32)
  send CODE        answers CODE as given (a replay, a wrong code, a recovery code)

Prints one JSON object: the page /mfa showed (its kind: "setup" or "code"), the key
(setup), the code sent, the answer's status and text, the recovery codes it listed, and
whether /enroll is then reachable as signed in.
"""

import base64
import hashlib
import hmac
import html
import json
import re
import struct
import sys
import time

from saml_login import sign_in


def totp(secret_b32, at=None):
    key = base64.b32decode(secret_b32 + "=" * (-len(secret_b32) % 8))
    counter = int((time.time() if at is None else at) // 30)
    h = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    o = h[-1] & 0x0F
    return "%06d" % ((struct.unpack(">I", h[o:o + 4])[0] & 0x7FFFFFFF) % 1000000)


def main():
    base, user, password, action = sys.argv[1:5]
    arg = sys.argv[5] if len(sys.argv) > 5 else None
    s, r = sign_in(base, "/enroll", user, password)
    out = {"after_login": r.url, "login_status": r.status_code}
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    if "/mfa" not in r.url or not m:
        out["page"] = r.text
        print(json.dumps(out))
        return
    csrf = html.unescape(m.group(1))
    key = re.search(r'<code id="secret">([A-Z2-7]+)</code>', r.text)
    out["kind"] = "setup" if key else "code"
    if action == "setup":
        out["secret"] = key.group(1) if key else None
        code = totp(key.group(1)) if key else "000000"
    elif action == "code":
        code = totp(arg)
    else:
        code = arg
    out["code"] = code
    a = s.post(base + "/mfa", data={"csrf": csrf, "code": code}, timeout=10,
               allow_redirects=False)
    out["status"] = a.status_code
    out["answer"] = a.text
    out["recovery"] = re.findall(r"<li><code>([^<]+)</code></li>", a.text)
    out["signed_in"] = "Your devices" in s.get(base + "/enroll", timeout=10).text
    print(json.dumps(out))


if __name__ == "__main__":
    main()
