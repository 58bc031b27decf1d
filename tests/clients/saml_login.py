#!/usr/bin/env python3
"""Drives a SAML SP-initiated login through a real IdP without a browser.

Usage: saml_login.py LOGIN_URL USER PASSWORD [--issuer ENTITY_ID]

LOGIN_URL is where the SP redirects the browser (the IdP's SSO URL with a SAMLRequest),
or the SP's own /saml/login (the redirect is followed). With --issuer, the AuthnRequest's
Issuer is rewritten first (to obtain a response addressed to another SP).

Prints one JSON object: {"action": ACS URL, "SAMLResponse": ..., "RelayState": ...}.
Cookies are kept across the requests, as a browser would.
"""

import base64
import html
import json
import re
import sys
import urllib.parse
import zlib

import requests


def rewrite_issuer(url, issuer):
    u = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
    out = []
    for k, v in q:
        if k == "SAMLRequest":
            xml = zlib.decompress(base64.b64decode(v), -15).decode()
            xml, n = re.subn(r"(<(?:\w+:)?Issuer[^>]*>)[^<]*(</(?:\w+:)?Issuer>)",
                             lambda m: m.group(1) + issuer + m.group(2), xml)
            if n != 1:
                sys.exit(f"no Issuer to rewrite in the AuthnRequest: {xml}")
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            v = base64.b64encode(c.compress(xml.encode()) + c.flush()).decode()
        out.append((k, v))
    return urllib.parse.urlunsplit(u._replace(query=urllib.parse.urlencode(out)))


def idp_login(s, url, user, password, issuer=None):
    """Follows `url` to the IdP's login form, signs in; (ACS URL, SAMLResponse, RelayState)."""
    if issuer:
        # Follow the SP's redirect by hand to rewrite the request on the way.
        if "SAMLRequest=" not in url:
            r = s.get(url, allow_redirects=False, timeout=10)
            if r.status_code in (301, 302, 303, 307):
                url = r.headers["Location"]
        if "SAMLRequest=" not in url:
            sys.exit(f"no SAMLRequest to rewrite in {url}")
        url = rewrite_issuer(url, issuer)
    r = s.get(url, timeout=10)
    m = re.search(r'name="AuthState" value="([^"]+)"', r.text)
    if not m:
        sys.exit(f"no login form at {r.url} ({r.status_code}): {r.text[:2000]}")
    r = s.post(r.url, data={"username": user, "password": password,
                            "AuthState": html.unescape(m.group(1))}, timeout=10)
    resp = re.search(r'name="SAMLResponse" value="([^"]+)"', r.text)
    action = re.search(r'<form[^>]*action="([^"]+)"', r.text)
    if not resp or not action:
        sys.exit(f"no SAMLResponse after the login ({r.status_code}): {r.text[:2000]}")
    relay = re.search(r'name="RelayState" value="([^"]*)"', r.text)
    return (html.unescape(action.group(1)), html.unescape(resp.group(1)),
            html.unescape(relay.group(1)) if relay else None)


def sign_in(base, path, user, password):
    """A fresh browser session signed in through the SP's `path` (sent to the IdP, back
    through the ACS): (session, the page the ACS led to)."""
    s = requests.Session()
    s.trust_env = False
    action, response, relay = idp_login(s, base + path, user, password)
    data = {"SAMLResponse": response}
    if relay is not None:
        data["RelayState"] = relay
    return s, s.post(action, data=data, timeout=10)


def main():
    url, user, password = sys.argv[1:4]
    issuer = None
    if "--issuer" in sys.argv:
        issuer = sys.argv[sys.argv.index("--issuer") + 1]
    s = requests.Session()
    s.trust_env = False
    action, response, relay = idp_login(s, url, user, password, issuer)
    print(json.dumps({"action": action, "SAMLResponse": response, "RelayState": relay}))


if __name__ == "__main__":
    main()
