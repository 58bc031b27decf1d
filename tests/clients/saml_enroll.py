#!/usr/bin/env python3
"""A user's whole journey without a browser: open the gateway's enrollment page, get sent
to the IdP, sign in, come back through the ACS, enroll a device.

Usage: saml_enroll.py GATEWAY_URL USER PASSWORD DEVICE_NAME [PUBLIC_KEY] [--tamper]

With --tamper, one character of the SAMLResponse's decoded XML (the user's group) is
changed before it is posted: the gateway must refuse the login.

Prints one JSON object: the ACS status, the enrollment status, the profile text (from
the page's <pre id="profile">), and the devices page as seen after the login.
"""

import base64
import html
import json
import re
import sys

import requests

from saml_login import idp_login


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    base, user, password, name = args[:4]
    public_key = args[4] if len(args) > 4 else ""
    s = requests.Session()
    s.trust_env = False
    action, response, relay = idp_login(s, base + "/enroll", user, password)
    if "--tamper" in sys.argv:
        xml = base64.b64decode(response).decode()
        xml = xml.replace(">sre<", ">srf<", 1).replace(">developers<", ">developerz<", 1)
        response = base64.b64encode(xml.encode()).decode()
    data = {"SAMLResponse": response}
    if relay is not None:
        data["RelayState"] = relay
    r = s.post(action, data=data, timeout=10)
    out = {"acs_status": r.history[0].status_code if r.history else r.status_code,
           "page": r.text, "url": r.url}
    if r.status_code != 200 or "csrf" not in r.text:
        print(json.dumps(out))
        return
    csrf = html.unescape(re.search(r'name="csrf" value="([^"]+)"', r.text).group(1))
    e = s.post(base + "/enroll", data={"csrf": csrf, "name": name, "public_key": public_key},
               timeout=10)
    out["enroll_status"] = e.status_code
    m = re.search(r'<pre id="profile">(.*?)</pre>', e.text, re.S)
    out["profile"] = html.unescape(m.group(1)) if m else None
    out["enroll_page"] = e.text
    # A forged CSRF token is refused.
    f = s.post(base + "/enroll", data={"csrf": "x" * len(csrf), "name": name + "-2",
                                        "public_key": ""}, timeout=10)
    out["forged_csrf_status"] = f.status_code
    out["devices_page"] = s.get(base + "/enroll", timeout=10).text
    print(json.dumps(out))


if __name__ == "__main__":
    main()
